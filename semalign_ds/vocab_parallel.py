"""The source's vocabulary matrices over ZeRO-3 ranks, never gathered whole (docs/architecture.md, "Vocabulary
rows on every rank").

A ZeRO-3 rank r of R holds the slice [r P, (r + 1) P) of every flattened parameter, P = ceil(numel / R): of a
[V, d] LM head or embedding that is a run of whole rows whenever P is a multiple of d (V divisible by R, as for
every large vocabulary). Gathering such a matrix for each forward moves V x d values to every rank and holds them
there; instead each rank keeps its rows (`Rows`, a view of its partition) and the ranks exchange only
per-token values:

- `embed`: every rank looks up all ranks' token ids in its rows (zeros elsewhere) and a sum all-reduce completes
  the [tokens, d] embeddings, each rank keeping its own.
- `nll`: each rank's states x [N_r, d] in turn are broadcast from it and projected by every rank on its rows,
  logits [N_r, V / R]; the softmax's maximum and normaliser and the target's logit are all-reduced per token, so
  each token's -log p(target) is exact. It runs in chunks of rows (logits of CHUNK_BYTES at most), and when the
  states need a gradient each chunk forms (p - onehot) on its rows and multiplies by them; the [N_r, d] results,
  summed into rank r, are its tokens' gradients for an upstream gradient of one; the backward scales them. A rank
  holds its own positions and one other rank's at a time, whatever the number of ranks.

On one rank (or a head held whole) the same code runs without collectives. Every call is collective when the
rows are `parallel`: all ranks make it, in the same order (ZeRO-3's forwards are lockstepped anyway). Where the
ranks share a host and the matrices are in a shared file (shared_weights.share_rows), each rank reads every rank's
rows in place instead (`Rows.mapped`): the lookup as on one rank, the NLL over the whole vocabulary a block of
rows at a time (`_streamed`), no collective, so ranks need not keep step.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from semalign_ds import distributed


@dataclasses.dataclass
class Rows:
    """Rows [lo, lo + len(weight)) of a [vocab, d] matrix; parallel: the others are on the other ranks."""
    weight: torch.Tensor
    lo: int
    vocab: int
    parallel: bool = False
    mapped: object = None  # parallel rows in a shared file: a function (lo, hi) -> rows [lo, hi), read in place

    @property
    def hi(self):
        return self.lo + self.weight.shape[0]

    @property
    def collective(self):
        """Whether using these rows takes every rank (each call made by all, in the same order)."""
        return self.parallel and self.mapped is None

    def local(self):
        """Rows to use on this rank alone: these when not parallel, else every rank's, read in place."""
        return Rows(self.mapped(0, self.vocab), 0, self.vocab) if self.parallel and self.mapped else self


def rows_of(param: torch.Tensor, vocab: int | None = None, device=None) -> Rows:
    """This rank's rows of a [V, d] parameter cut to its first `vocab` rows: all of them when it is whole; of a
    ZeRO-3 partitioned one, a view of the partition when that is whole rows, else (a partition that splits a row)
    an even share of rows copied out of one gather."""
    partitioned = hasattr(param, "ds_id")
    total, width = param.ds_shape if partitioned else param.shape
    vocab = total if vocab is None else min(vocab, total)
    part, world, rank = getattr(param, "ds_tensor", None), distributed.world(), distributed.rank()
    mapped = None
    if not partitioned:
        lo, weight = 0, param.detach()[:vocab]
    elif part.numel() % width == 0:
        n = part.numel() // width
        lo = min(rank * n, vocab)
        weight = part.detach().view(n, width)[:min(n, vocab - lo)]
        shared = distributed.shared_rows()
        mapped = shared.reader(param) if shared is not None and world > 1 else None
    else:
        from semalign_ds import engines
        share = -(-vocab // world)
        lo = min(rank * share, vocab)
        with engines.gathered([param]):
            weight = param.detach()[lo:min(lo + share, vocab)].clone()
    if device is not None:
        weight = weight.to(device)
    return Rows(weight, lo, vocab, parallel=partitioned and world > 1, mapped=mapped)


def source_rows(adapter, vocab=None, device=None, zero3=False) -> Rows:
    """This rank's rows of a source's LM head (its first `vocab` rows); under ZeRO-3 (zero3) the adapter's
    forwards take their embeddings from this rank's rows too (the head's when the two are tied), so that neither
    matrix is gathered."""
    head = rows_of(adapter.head.weight, vocab, device)
    if zero3:
        tied = adapter.embed_tokens.weight is adapter.head.weight
        embedding = head if tied else rows_of(adapter.embed_tokens.weight, None, device)
        if embedding.collective != head.collective:  # both read in place or neither: ranks apart meet no collective
            head.mapped = embedding.mapped = None
        adapter.embedding_lookup = functools.partial(embed, embedding)
    return head


def whole(rows: Rows) -> torch.Tensor:
    """The whole [vocab, d] matrix on every rank (collective when parallel): for writing it, not for computing."""
    if not rows.collective:
        return rows.local().weight
    return distributed.all_gather_rows(rows.weight)[0]


def embed(rows: Rows, ids: torch.Tensor) -> torch.Tensor:
    """The rows of `ids` [...]: [..., d], looked up across the ranks when parallel."""
    if not rows.collective:
        rows = rows.local()
        return torch.nn.functional.embedding(ids - rows.lo, rows.weight)
    flat, counts = distributed.all_gather_rows(ids.reshape(-1))
    mine = (flat >= rows.lo) & (flat < rows.hi)
    out = rows.weight.new_zeros(flat.shape[0], rows.weight.shape[1])
    out[mine] = rows.weight[flat[mine] - rows.lo]
    distributed.all_reduce_sum(out)
    start = sum(counts[:distributed.rank()])
    return out[start:start + ids.numel()].view(*ids.shape, -1)


def nll(x: torch.Tensor, targets: torch.Tensor, rows: Rows) -> torch.Tensor:
    """-log softmax(x W^T)[target] per row of x [n, d] (targets [n]), in float32 or wider; differentiable in x."""
    if x.shape[0] != targets.shape[0]:
        raise ValueError(f"nll: {x.shape[0]} states and {targets.shape[0]} targets; give one target per state")
    return _NLL.apply(x, targets, rows)


CHUNK_BYTES = 128 * 2**20  # the most one chunk of float32 logits takes
BLOCK_BYTES = 32 * 2**20  # the most of a matrix read in place (Rows.mapped) that one NLL block maps


def chunk_rows(columns):
    """Rows of x per chunk of the NLL: its logits [rows, columns] in float32 within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(1, columns)))


class _NLL(torch.autograd.Function):
    """Chunks of rows at a time, so that the logits never exist for all N rows at once; when x needs a gradient,
    each chunk's (p - onehot) W is formed right away and kept ([N, d], not the [N, V / R] softmax), and the backward
    only scales it by the upstream gradient (d nll_i / d x_i does not depend on it): no collective there. When the
    rows are parallel, the ranks' positions go one rank's at a time: broadcast from it, projected on every rank's
    rows, and their gradient parts summed into it, so that a rank holds its own positions and one other rank's,
    never every rank's."""

    @staticmethod
    def forward(ctx, x, targets, rows):
        acc = torch.promote_types(x.dtype, torch.float32)
        grad = ctx.needs_input_grad[0]
        x, targets = x.detach().contiguous(), targets.contiguous()
        dx = x.new_empty(x.shape, dtype=acc) if grad else None
        if rows.parallel and not rows.collective:  # every rank's rows read in place: no collective
            out = _streamed(x, targets, rows, acc, dx)
        else:
            out = _by_rank(x, targets, rows, acc, dx)
        if grad:
            ctx.save_for_backward(dx)
            ctx.dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        dx, = ctx.saved_tensors
        return (dx * grad.to(dx.dtype)[:, None]).to(ctx.dtype), None, None


def _by_rank(x, targets, rows, acc, dx=None):
    """-log p(target) of this rank's positions and, into dx, their gradient: when the rows are parallel, each
    rank's positions in turn, broadcast from it, projected on every rank's rows, their gradient parts summed into
    it (the same order and chunks on every rank: their collectives pair up)."""
    me = distributed.rank() if rows.parallel else 0
    counts = distributed.row_counts(x.shape[0]) if rows.parallel else [x.shape[0]]
    out = torch.empty(x.shape[0], dtype=acc, device=x.device)
    for r, n in enumerate(counts):
        if n == 0:
            continue
        xr, tr = (x, targets) if r == me else (x.new_empty((n, x.shape[1])), targets.new_empty(n))
        if rows.parallel:
            distributed.broadcast_(xr, r)
            distributed.broadcast_(tr, r)
        dr = (dx if r == me else x.new_empty((n, x.shape[1]), dtype=acc)) if dx is not None else None
        nll_r = _positions(xr, tr, rows, acc, dr)
        if r == me:
            out.copy_(nll_r)
        if dx is not None and rows.parallel:
            distributed.reduce_sum_to(dr, r)
    return out


def _positions(x, t, rows, acc, dx=None):
    """-log p(t) of one rank's positions x [n, d] over the whole vocabulary, and, into dx, this rank's part of
    their gradient ((p - onehot) on its rows, times its rows)."""
    w = rows.weight
    out = torch.empty(x.shape[0], dtype=acc, device=x.device)
    step = chunk_rows(w.shape[0])
    for a in range(0, x.shape[0], step):
        b = min(a + step, x.shape[0])
        tc = t[a:b]
        z = (x[a:b] @ w.T).to(acc)  # [chunk, V / R]: this rank's logits of these positions
        m = z.amax(dim=1) if z.shape[1] else z.new_full((z.shape[0],), float("-inf"))
        _reduce(m, rows, distributed.all_reduce_max)
        mine = ((tc >= rows.lo) & (tc < rows.hi)).nonzero()[:, 0]
        picked = torch.zeros_like(m)
        picked[mine] = z[mine, tc[mine] - rows.lo] - m[mine]
        _reduce(picked, rows, distributed.all_reduce_sum)  # the target's logit - max, from the rank holding it
        z.sub_(m[:, None]).exp_()
        total = _reduce(z.sum(dim=1), rows, distributed.all_reduce_sum)
        out[a:b] = torch.log(total) - picked
        if dx is not None:
            z.div_(total[:, None])  # softmax over the whole vocabulary, this rank's columns
            z[mine, tc[mine] - rows.lo] -= 1
            # the softmax tail of real LM logits is denormal floats, several times slower in the matmul below
            z.masked_fill_(z.abs() < 1e-30, 0.0)
            dx[a:b] = z.to(w.dtype) @ w
    return out


def _streamed(x, t, rows, acc, dx=None):
    """-log p(t) of positions x [n, d] over the whole vocabulary of rows read in place (rows.mapped), a block of
    rows (BLOCK_BYTES) at a time, and into dx their gradient, in one pass (online log-sum-exp): each position's
    running maximum m and normaliser, its target logit, and sum_j exp(z_j - m) W_j, rescaled by exp(m_old - m_new)
    whenever the maximum rises; at the end dx = that sum / normaliser - W_target, (p - onehot) W. A rank maps one
    block of the matrix at a time and holds its logits, not the other ranks' rows whole (at 1.5B and 2 ranks that
    held 144 MiB more at attribution's peak), and projects the positions once per block, as one rank does."""
    n, d = x.shape
    per = max(1, BLOCK_BYTES // (d * rows.weight.element_size()))
    step = chunk_rows(per)
    m = torch.full((n,), float("-inf"), dtype=acc, device=x.device)
    total = torch.zeros(n, dtype=acc, device=x.device)
    picked = torch.zeros(n, dtype=acc, device=x.device)
    if dx is not None:
        dx.zero_()
        target_rows = torch.zeros_like(dx)
    for lo in range(0, rows.vocab, per):
        hi = min(lo + per, rows.vocab)
        w = rows.mapped(lo, hi)
        for a in range(0, n, step):
            b = min(a + step, n)
            z = (x[a:b] @ w.T).to(acc)
            tc = t[a:b]
            mine = ((tc >= lo) & (tc < hi)).nonzero()[:, 0]
            picked[a + mine] = z[mine, tc[mine] - lo]
            new = torch.maximum(m[a:b], z.amax(dim=1))
            scale = torch.exp(m[a:b] - new)  # 0 at the first block (m = -inf)
            z.sub_(new[:, None]).exp_()
            total[a:b] = total[a:b] * scale + z.sum(dim=1)
            m[a:b] = new
            if dx is not None:
                z.masked_fill_(z < 1e-30, 0.0)  # denormal floats: see _positions
                dx[a:b] = dx[a:b] * scale[:, None] + z.to(w.dtype) @ w
                target_rows[a + mine] = w[tc[mine] - lo].to(acc)
        del w  # the other ranks' pages of this block are unmapped with it
    if dx is not None:
        dx.div_(total[:, None]).sub_(target_rows)
    return torch.log(total) + m - picked


def _reduce(t, rows, op):
    return op(t) if rows.parallel else t
