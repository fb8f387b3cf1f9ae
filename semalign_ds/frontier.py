"""Frontier training, shallow to deep (METHOD.md, section 5).

Stage k trains target layer k alone. Its input is the frontier: the output of the already-trained layers below it
for every position of every sequence, computed once per stage by running the just-finished layer over the previous
frontier (stage 1 starts from the embeddings). A stage therefore costs one layer's forward and backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from semalign_ds.data import index_batches
from semalign_ds.losses import fisher_quadratic_loss, fisher_topk_loss, linear_kl_loss


class Frontier:
    """Residual-stream states of the sequences `members` (all of them on one rank), stored flat [positions, d] in
    the order of `members`."""

    def __init__(self, states, offsets, members):
        self.offsets, self.members = offsets, list(members)
        lengths = offsets[1:] - offsets[:-1]
        self.start = {}
        at = 0
        for i in self.members:
            self.start[i] = at
            at += int(lengths[i])
        self.states = states
        if states.shape[0] != at:
            raise ValueError(f"frontier of {states.shape[0]} positions for sequences holding {at}")

    @classmethod
    @torch.no_grad()
    def of_embeddings(cls, adapter, data, members, pad_id, batch_size, device, dtype=torch.float32):
        """The stage-1 frontier: the target's embeddings of the member sequences."""
        total = int((data.lengths[list(members)]).sum()) if len(members) else 0
        frontier = cls(torch.empty(total, adapter.width, dtype=dtype), data.offsets, members)
        for idx in index_batches(len(frontier.members), batch_size):
            idx = [frontier.members[j] for j in idx]
            ids, _, _ = data.batch(idx, pad_id)
            frontier.put(idx, adapter.embed(ids.to(device)))
        return frontier

    def _span(self, i):
        a = self.start[i]
        return a, a + int(self.offsets[i + 1] - self.offsets[i])

    def batch(self, indices):
        """Right-padded states [B, T, d] of the given (member) sequences."""
        spans = [self._span(i) for i in indices]
        length = max(b - a for a, b in spans)
        out = self.states.new_zeros((len(spans), length, self.states.shape[1]))
        for row, (a, b) in enumerate(spans):
            out[row, :b - a] = self.states[a:b]
        return out

    def put(self, indices, padded):
        """Store a right-padded batch [B, T, d] back as the rows of sequences `indices`."""
        padded = padded.to(device="cpu", dtype=self.states.dtype)
        for row, i in enumerate(indices):
            a, b = self._span(i)
            self.states[a:b] = padded[row, :b - a]

    @torch.no_grad()
    def advance(self, fn, data, pad_id, batch_size, device, show=False):
        """The next frontier: fn(h [B, T, d], attention [B, T]) -> [B, T, d] over every member sequence."""
        new = Frontier(torch.empty_like(self.states), self.offsets, self.members)
        for idx in tqdm(index_batches(len(self.members), batch_size), desc="frontier", disable=not show,
                        leave=False):
            idx = [self.members[j] for j in idx]
            _, attn, _ = data.batch(idx, pad_id)
            new.put(idx, fn(self.batch(idx).to(device), attn.to(device)))
        return new


def stage_loss(adapter, k, n_layers, h_in, attn, loss_mask, targets, head_weight, cfg, ids=None, normalizer=None,
               projection=None):
    """The stage-k objective on one batch (k is 1-based): target layer k on the frontier h_in, then objective()."""
    ctx = adapter.context(h_in, attn)
    h_out = adapter.layer(k - 1, h_in, ctx)
    x = adapter.norm(h_out[loss_mask])
    labels = ids[:, 1:][loss_mask[:, :-1]] if ids is not None else None
    residual = (h_out - h_in)[loss_mask] if cfg.layer_objective == "geometry" else None
    return objective(x, targets, k == n_layers, adapter.norm, head_weight, cfg, labels, normalizer, projection,
                     residual, loss_mask.sum(1))


def objective(x, targets, final, final_norm, head_weight, cfg, labels=None, normalizer=None, projection=None,
              residual=None, counts=None):
    """Loss of normed target states x [n, d_t] at a batch's loss positions, summed and divided by `normalizer`
    (default n; on several ranks, the count of the whole global batch).

    targets (rows matching x): "aligned" [n, d_t] (SemAlign's a^(k)), or "source" [n, d_s] (the unit source state,
    for the layer-wise baseline, through `projection`); at the output, "source_final" [n, d_s] and "source_head".
    Layer stages: layer_term(); the output stage: KL to the source's output distribution, plus fisher_weight times
    the layer objective and ce_weight times the label cross-entropy.
    """
    tau, backend = cfg.temperature, cfg.loss_backend
    norm = float(normalizer if normalizer is not None else max(x.shape[0], 1))
    parts = {}
    if not final or cfg.fisher_weight > 0:
        name, value = layer_term(x, targets, final_norm, head_weight, cfg, projection, residual, counts)
        parts[name] = value / norm
        if "tail" in targets:  # the top-k support's mass outside, summed over ranks: the global batch's mean
            parts["tail_mass"] = targets["tail"].sum() / norm
    layer_term_value = next(iter(parts.values()), None)
    if not final:
        return layer_term_value, _floats(parts)
    parts["kl"] = linear_kl_loss(x, head_weight, targets["source_final"].to(x.dtype), targets["source_head"], tau,
                                 reduction="sum", backend=backend) / norm
    loss = parts["kl"]
    if cfg.fisher_weight > 0:
        loss = loss + cfg.fisher_weight * layer_term_value
    if cfg.ce_weight > 0:
        parts["ce"] = F.cross_entropy((x @ head_weight.T).float(), labels, reduction="sum") / norm
        loss = loss + cfg.ce_weight * parts["ce"]
    return loss, _floats(parts)


def layer_term(x, targets, final_norm, head_weight, cfg, projection=None, residual=None, counts=None):
    """(name, summed loss) of one layer at its loss positions, by method and layer_objective:
    layerwise: 1 - cos(P x, u); fisher: the Fisher-weighted quadratic loss on W_t x vs W_t n_t(a); cosine (v1):
    1 - cos(x, n_t(a)), the layer output against the aligned state, both as the head reads them; geometry (v2):
    geometry_loss of the layer's residual against the aligned source residual a^(k) - a^(k-1), per sequence."""
    if cfg.method == "layerwise":
        cos = F.cosine_similarity(projection(x).float(), targets["source"].float(), dim=-1)
        return "cosine", (1 - cos).sum()
    if cfg.layer_objective == "geometry":
        reference = targets["aligned"] - targets["aligned_in"]
        return "geometry", geometry_loss(residual, reference, counts)
    if "ids" in targets:  # the top-k support of p*, cached (fisher_topk)
        return "fisher", fisher_topk_loss(x, head_weight, targets["ids"], targets["z"], targets["tail"],
                                          cfg.temperature, cfg.topk_tail, reduction="sum")
    y = final_norm(targets["aligned"].to(x.dtype))
    if cfg.layer_objective == "cosine":
        acc = torch.promote_types(x.dtype, torch.float32)
        return "cosine", (1 - F.cosine_similarity(x.to(acc), y.to(acc), dim=-1)).sum()
    return "fisher", fisher_quadratic_loss(x, y, head_weight, cfg.temperature, reduction="sum",
                                           backend=cfg.loss_backend)


def geometry_loss(r, r_star, counts):
    """Token-token residual geometry (v2), summed over sequences weighted by their T (so that dividing by the
    batch's position count gives a token-weighted mean): per sequence of T rows of r [n, d] and r* [n, d'],
    centre each over its tokens, normalise rows, G = r r^T, and T * ||G - G*||_F^2 / T^2."""
    acc = torch.promote_types(r.dtype, torch.float32)
    total = r.new_zeros((), dtype=acc)
    for a, b in zip(r.to(acc).split(counts.tolist()), r_star.to(acc).split(counts.tolist())):
        if a.shape[0] == 0:
            continue
        g, g_star = (_gram(m) for m in (a, b))
        total = total + (g - g_star).square().sum() / a.shape[0]
    return total


def _gram(r):
    r = r - r.mean(dim=0, keepdim=True)
    r = r / r.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return r @ r.T


def _floats(parts):
    return {name: float(v.detach()) for name, v in parts.items()}
