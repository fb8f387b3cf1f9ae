"""The training objectives, as one registry (docs/method.md, sections 5 and 8).

A layer objective scores target layer k against what the cache holds for it; an output objective scores the last
layer's output. Each is one small object holding
- its loss on explicit tensors (`Inputs`), summed over the batch's loss positions,
- the cache entries it reads (`keys`, named as the cache names them: "aligned.3", "source_final", ...) and what the
  cache must hold for it (`cache`),
- its cost in LM-head projections per loss position (`heads`: forward, backward; the unit of budget.cost).
`recipe(cfg)` turns a config into the objectives of a run. The cache, the training loop, the budget and the dry run
ask the recipe; nothing else reads `method` or `layer_objective`. Adding a layer objective is a class here, a line
in LAYER_OBJECTIVES, its tests and a paragraph in docs/method.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from semalign_ds.losses import fisher_quadratic_loss, fisher_topk_loss, linear_kl_loss


@dataclass
class Inputs:
    """What a loss may read of one batch, at its n loss positions."""
    x: torch.Tensor  # n_t(h) of the scored layer [n, d_t]: the target's states as its head reads them
    rows: dict  # the batch's cached rows, by cache key
    head: Optional[torch.Tensor] = None  # W_t [V, d_t]
    norm: Optional[Callable] = None  # n_t: aligned targets are read through it, as x is
    residual: Optional[torch.Tensor] = None  # h_out - h_in of the scored layer (objectives with uses_residual)
    counts: Optional[torch.Tensor] = None  # loss positions per sequence of the batch
    labels: Optional[torch.Tensor] = None  # the next token of every loss position
    source_head: Optional[torch.Tensor] = None  # W_s [V, d_s]
    projection: Optional[torch.nn.Module] = None  # the layer-wise baseline's learned map, width d_t -> d_s


def _acc(dtype):
    return torch.promote_types(dtype, torch.float32)


class LayerObjective:
    name = ""  # the config's layer_objective
    term = ""  # what the metrics call its value
    uses_residual = False  # reads h_out - h_in, not only x
    cache: dict = {}  # what the cache must hold besides the aligned states (cache.contents)

    def __init__(self, temperature=1.0, backend="auto"):
        self.temperature, self.backend = temperature, backend

    def topk(self, k, tail):
        """The objective on a cached top-k support of k entries (fisher_topk > 0); itself where it has none."""
        return self

    def keys(self, k):
        return (f"aligned.{k}",)

    def heads(self, vocab):
        return 0, 0

    def loss(self, inp: Inputs, k: int) -> torch.Tensor:
        raise NotImplementedError

    def extra(self, inp: Inputs, k: int) -> dict:
        """Further summed quantities to log beside the loss (divided by the batch's count like it)."""
        return {}

    def trainable(self, width_t, width_s):
        """A module trained with the layer (the layer-wise projection), or None."""
        return None


class Fisher(LayerObjective):
    """tau^2/2 * (sum_v p*_v delta_v^2 - (sum_v p*_v delta_v)^2), delta = W_t (x - n_t(a)) / tau, p* =
    softmax(W_t n_t(a) / tau): the second-order expansion of tau^2 KL(p* || softmax(W_t x / tau))."""
    name = term = "fisher"

    def topk(self, k, tail):
        return FisherTopK(k, self.temperature, tail)

    def heads(self, vocab):
        return 2, 1  # W x and W y forward, the gradient back through W

    def loss(self, inp, k):
        y = inp.norm(inp.rows[f"aligned.{k}"].to(inp.x.dtype))
        return fisher_quadratic_loss(inp.x, y, inp.head, self.temperature, reduction="sum", backend=self.backend)


class DiagFisher(LayerObjective):
    """The diagonal reading of the Fisher surrogate: tau^2/2 * sum_v p*_v delta_v^2, i.e. diag(p*) in place of the
    softmax Fisher diag(p*) - p* p*^T. Unlike the full surrogate it is not shift-invariant in delta: moving every
    logit by the same amount costs tau^2/2 * c^2."""
    name = term = "diag_fisher"

    def heads(self, vocab):
        return 2, 1

    def loss(self, inp, k):
        y = inp.norm(inp.rows[f"aligned.{k}"].to(inp.x.dtype))
        return diag_fisher_loss(inp.x, y, inp.head, self.temperature)


def diag_fisher_loss(x, y, weight, temperature=1.0, chunk_rows=None):
    """Summed tau^2/2 * sum_v p*_v delta_v^2 over the rows of x, y [n, d] with weight [V, d]. Row blocks of
    [rows, V] logits are recomputed in the backward (activation checkpointing), so no [n, V] tensor is kept; x - y
    is formed in float32 before the projection, as the Fisher loss forms it (docs/method.md, "Fused losses")."""
    rows = chunk_rows or max(1, (1 << 22) // max(weight.shape[0], 1))
    total = x.new_zeros((), dtype=_acc(x.dtype))
    for a in range(0, x.shape[0], rows):
        total = total + checkpoint(_diag_fisher_block, x[a:a + rows], y[a:a + rows], weight, temperature,
                                   use_reentrant=False)
    return total


def _diag_fisher_block(x, y, weight, tau):
    acc = _acc(x.dtype)
    w = weight.to(acc)
    delta = ((x.to(acc) - y.to(acc)) @ w.T) / tau
    p = torch.softmax((y.to(acc) @ w.T) / tau, dim=-1)
    return tau * tau / 2 * (p * delta.square()).sum()


class FisherTopK(LayerObjective):
    """The Fisher surrogate on the top-k support of p* that the cache holds (docs/method.md, "Top-k Fisher")."""
    name, term = "fisher", "fisher"

    def __init__(self, k, temperature=1.0, tail="renormalize"):
        super().__init__(temperature)
        self.k, self.tail = k, tail
        self.cache = {"topk": (k, temperature)}

    def keys(self, k):
        return tuple(f"topk_{name}.{k}" for name in ("ids", "z", "tail"))

    def heads(self, vocab):
        return self.k / vocab, self.k / vocab  # the k gathered rows of W, forward and back

    def loss(self, inp, k):
        r = inp.rows
        return fisher_topk_loss(inp.x, inp.head, r[f"topk_ids.{k}"], r[f"topk_z.{k}"], r[f"topk_tail.{k}"],
                                self.temperature, self.tail, reduction="sum")

    def extra(self, inp, k):
        return {"tail_mass": inp.rows[f"topk_tail.{k}"].sum()}  # the mass outside the support


class Cosine(LayerObjective):
    """v1: 1 - cos(x, n_t(a)), the layer output against the aligned state, both as the head reads them."""
    name = term = "cosine"

    def loss(self, inp, k):
        acc = _acc(inp.x.dtype)
        y = inp.norm(inp.rows[f"aligned.{k}"].to(inp.x.dtype))
        return (1 - F.cosine_similarity(inp.x.to(acc), y.to(acc), dim=-1)).sum()


class Geometry(LayerObjective):
    """v2: token-token geometry of the layer's residual h_out - h_in against the aligned source residual of the
    pair span, a^(k) - a^(k-1) (a^(0) = M u^(0), the aligned embeddings), per sequence."""
    name = term = "geometry"
    uses_residual = True
    cache = {"aligned_input": True}

    def keys(self, k):
        return f"aligned.{k}", f"aligned.{k - 1}"

    def loss(self, inp, k):
        reference = inp.rows[f"aligned.{k}"] - inp.rows[f"aligned.{k - 1}"]
        return geometry_loss(inp.residual, reference, inp.counts)


class LayerWise(LayerObjective):
    """The layer-wise baseline (TinyBERT-style): 1 - cos(P x, u), u the unit source state of the paired layer
    (unaligned), P a projection d_t -> d_s learned with the layer."""
    name, term = "layerwise", "cosine"
    cache = {"source_states": True}

    def keys(self, k):
        return (f"source.{k}",)

    def loss(self, inp, k):
        cos = F.cosine_similarity(inp.projection(inp.x).float(), inp.rows[f"source.{k}"].float(), dim=-1)
        return (1 - cos).sum()

    def trainable(self, width_t, width_s):
        return torch.nn.Linear(width_t, width_s, bias=False)


def geometry_loss(r, r_star, counts):
    """Token-token residual geometry, summed over sequences weighted by their T (so that dividing by the batch's
    position count gives a token-weighted mean): per sequence of T rows of r [n, d] and r* [n, d'], centre each over
    its tokens, normalise rows, G = r r^T, and T * ||G - G*||_F^2 / T^2."""
    acc = _acc(r.dtype)
    total = r.new_zeros((), dtype=acc)
    for a, b in zip(r.to(acc).split(counts.tolist()), r_star.to(acc).split(counts.tolist())):
        if a.shape[0] == 0:
            continue
        total = total + (_gram(a) - _gram(b)).square().sum() / a.shape[0]
    return total


def _gram(r):
    r = r - r.mean(dim=0, keepdim=True)
    r = r / r.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return r @ r.T


# --- output objectives --------------------------------------------------------------------------------------------
class KL:
    """tau^2 KL(softmax(W_s n_s(h_s) / tau) || softmax(W_t x / tau)) at the output."""
    name = "kl"
    keys = ("source_final",)

    def __init__(self, temperature=1.0, backend="auto"):
        self.temperature, self.backend = temperature, backend

    def heads(self, vocab, width_t, width_s):
        return 1 + width_s / width_t, 1  # both heads forward (the source's at its width), the target's back

    def loss(self, inp):
        x_s = inp.rows["source_final"].to(inp.x.dtype)
        return linear_kl_loss(inp.x, inp.head, x_s, inp.source_head, self.temperature, reduction="sum",
                              backend=self.backend)


class CrossEntropy:
    """The labels' cross-entropy (the next token of each loss position)."""
    name = "ce"
    keys = ()

    def heads(self, vocab, width_t, width_s):
        return 1, 1

    def loss(self, inp):
        return F.cross_entropy((inp.x @ inp.head.T).float(), inp.labels, reduction="sum")


# the config's layer_objective names (method semalign); the layer-wise baseline and top-k are chosen by recipe()
LAYER_OBJECTIVES = {"fisher": Fisher, "cosine": Cosine, "geometry": Geometry, "diag_fisher": DiagFisher}


@dataclass(frozen=True)
class Recipe:
    """The objectives of a run. Stage k < L_t trains on `layer`; the last stage on the weighted `output` terms plus
    final_layer_weight times `exact_layer` (which is `layer` but for top-k, whose support the cache holds only for
    the layer stages); the joint phase on the output terms plus a weight times `exact_layer` of layers 1..L_t - 1."""
    layer: Optional[LayerObjective]
    exact_layer: Optional[LayerObjective]
    output: tuple = field(default_factory=tuple)  # ((weight, output objective), ...)
    final_layer_weight: float = 0.0

    def objective(self, final):
        return self.exact_layer if final else self.layer

    @property
    def uses_source_head(self):
        return any(isinstance(o, KL) for _, o in self.output)

    def keys(self, k, final):
        """The cache entries stage k reads (the last stage: final)."""
        keys = list(self.layer.keys(k)) if self.layer is not None and not final else []
        if final:
            if self.final_layer_weight > 0:
                keys += self.exact_layer.keys(k)
            keys += [key for _, o in self.output for key in o.keys]
        return tuple(dict.fromkeys(keys))

    def joint_keys(self, n_layers):
        keys = [key for k in range(1, n_layers) for key in self.exact_layer.keys(k)]
        return tuple(dict.fromkeys(keys + list(self.keys(n_layers, True))))

    def stage_loss(self, inp: Inputs, k, final, normalizer):
        """(loss, parts) of stage k on one batch: summed terms divided by `normalizer` (the global batch's loss
        positions). Layer stages: the layer objective. The last stage: the weighted output terms, plus
        final_layer_weight times the layer objective."""
        norm = float(normalizer)
        parts, layer_value = {}, None
        if not final or self.final_layer_weight > 0:
            objective = self.objective(final)
            layer_value = objective.loss(inp, k) / norm
            parts[objective.term] = layer_value
            parts.update({name: v / norm for name, v in objective.extra(inp, k).items()})
        if not final:
            return layer_value, _floats(parts)
        loss = 0
        for weight, objective in self.output:
            parts[objective.name] = objective.loss(inp) / norm
            loss = loss + weight * parts[objective.name]
        if self.final_layer_weight > 0:
            loss = loss + self.final_layer_weight * layer_value
        return loss, _floats(parts)

    def layer_heads(self, vocab):
        return self.layer.heads(vocab) if self.layer is not None else (0, 0)

    def step_heads(self, kind, final, vocab, width_t, width_s, n_layers=1, joint_weight=0.0):
        """(head projections forward, backward) per loss position of one training step, in units of the target
        head (what budget.cost counts). kind: "stage" (one frontier stage; final: the last), "whole" (output KD or
        fine-tuning: the output terms only) or "joint" (the output terms and, while joint_weight > 0, the exact
        layer objective of layers 1..n_layers - 1)."""
        if kind == "stage" and not final:
            return self.layer_heads(vocab)
        fwd = bwd = 0
        for weight, objective in self.output:
            f, b = objective.heads(vocab, width_t, width_s)
            fwd, bwd = fwd + f, bwd + b
        terms = (self.final_layer_weight > 0 and kind != "whole") + (
            n_layers - 1 if kind == "joint" and joint_weight > 0 else 0)
        if terms and self.exact_layer is not None:
            f, b = self.exact_layer.heads(vocab)
            fwd, bwd = fwd + terms * f, bwd + terms * b
        return fwd, bwd


def recipe(cfg) -> Recipe:
    """The objectives a config asks for: the one place that reads method and layer_objective."""
    tau, backend = cfg.temperature, cfg.loss_backend
    kl = KL(tau, backend)
    ce = ((cfg.ce_weight, CrossEntropy()),) if cfg.ce_weight > 0 else ()
    if cfg.method == "finetune":
        return Recipe(None, None, ((1.0, CrossEntropy()),))
    if cfg.method == "output_kd":
        return Recipe(None, None, ((1.0, kl),) + ce)
    if cfg.method == "layerwise":
        layer = exact = LayerWise()
    else:
        exact = LAYER_OBJECTIVES[cfg.layer_objective](tau, backend)
        layer = exact.topk(cfg.fisher_topk, cfg.topk_tail) if cfg.fisher_topk > 0 else exact
    return Recipe(layer, exact, ((1.0, kl),) + ce, cfg.fisher_weight)


def cache_contents(cfg) -> dict:
    """What a run's cache holds besides the aligned states: runs whose configs give the same contents (and agree on
    the source, data and alignment) have identical caches."""
    out = {"source_states": False, "topk": None, "aligned_input": False}
    r = recipe(cfg)
    for objective in {id(o): o for o in (r.layer, r.exact_layer) if o is not None}.values():
        out.update(objective.cache)
    return out


def _floats(parts):
    return {name: float(v.detach()) if torch.is_tensor(v) else float(v) for name, v in parts.items()}
