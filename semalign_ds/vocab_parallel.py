"""The source's vocabulary matrices over ZeRO-3 ranks, never gathered whole (docs/architecture.md, "Vocabulary
rows on every rank").

A ZeRO-3 rank r of R holds the slice [r P, (r + 1) P) of every flattened parameter, P = ceil(numel / R): of a
[V, d] LM head or embedding that is a run of whole rows whenever P is a multiple of d (V divisible by R, as for
every large vocabulary). Gathering such a matrix for each forward moves V x d values to every rank and holds them
there; instead each rank keeps its rows (`Rows`, a view of its partition) and the ranks exchange only
per-token values:

- `embed`: every rank looks up all ranks' token ids in its rows (zeros elsewhere) and a sum all-reduce completes
  the [tokens, d] embeddings, each rank keeping its own.
- `nll`: every rank projects all ranks' states x [N, d] on its rows, logits [N, V / R]; the softmax's maximum
  and normaliser and the target's logit are all-reduced per token, so each token's -log p(target) is exact. The
  backward forms (p - onehot) g on its rows, multiplies by them and sums the [N, d] result over the ranks: the
  gradient of every token's state, each rank keeping its own.

On one rank (or a head held whole) the same code runs without collectives. Every call is collective when the
rows are `parallel`: all ranks make it, in the same order (ZeRO-3's forwards are lockstepped anyway).
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

    @property
    def hi(self):
        return self.lo + self.weight.shape[0]


def rows_of(param: torch.Tensor, vocab: int | None = None, device=None) -> Rows:
    """This rank's rows of a [V, d] parameter cut to its first `vocab` rows: all of them when it is whole; of a
    ZeRO-3 partitioned one, a view of the partition when that is whole rows, else (a partition that splits a row)
    an even share of rows copied out of one gather."""
    partitioned = hasattr(param, "ds_id")
    total, width = param.ds_shape if partitioned else param.shape
    vocab = total if vocab is None else min(vocab, total)
    part, world, rank = getattr(param, "ds_tensor", None), distributed.world(), distributed.rank()
    if not partitioned:
        lo, weight = 0, param.detach()[:vocab]
    elif part.numel() % width == 0:
        n = part.numel() // width
        lo = min(rank * n, vocab)
        weight = part.detach().view(n, width)[:min(n, vocab - lo)]
    else:
        from semalign_ds import engines
        share = -(-vocab // world)
        lo = min(rank * share, vocab)
        with engines.gathered([param]):
            weight = param.detach()[lo:min(lo + share, vocab)].clone()
    if device is not None:
        weight = weight.to(device)
    return Rows(weight, lo, vocab, parallel=partitioned and world > 1)


def source_rows(adapter, vocab=None, device=None, zero3=False) -> Rows:
    """This rank's rows of a source's LM head (its first `vocab` rows); under ZeRO-3 (zero3) the adapter's
    forwards take their embeddings from this rank's rows too (the head's when the two are tied), so that neither
    matrix is gathered."""
    head = rows_of(adapter.head.weight, vocab, device)
    if zero3:
        tied = adapter.embed_tokens.weight is adapter.head.weight
        adapter.embedding_lookup = functools.partial(embed, head if tied else rows_of(adapter.embed_tokens.weight,
                                                                                      None, device))
    return head


def whole(rows: Rows) -> torch.Tensor:
    """The whole [vocab, d] matrix on every rank (collective when parallel): for writing it, not for computing."""
    if not rows.parallel:
        return rows.weight
    return distributed.all_gather_rows(rows.weight)[0]


def embed(rows: Rows, ids: torch.Tensor) -> torch.Tensor:
    """The rows of `ids` [...]: [..., d], looked up across the ranks when parallel."""
    if not rows.parallel:
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
    return _NLL.apply(x, targets, rows)


class _NLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, targets, rows):
        w = rows.weight
        xs, counts = _gather(x, rows)
        ts = _gather(targets, rows)[0]
        acc = torch.promote_types(x.dtype, torch.float32)
        z = (xs @ w.T).to(acc)  # [N, V / R]: this rank's logits of every rank's tokens
        m = z.amax(dim=1) if z.shape[1] else z.new_full((z.shape[0],), float("-inf"))
        _reduce(m, rows, distributed.all_reduce_max)
        mine = ((ts >= rows.lo) & (ts < rows.hi)).nonzero()[:, 0]
        picked = torch.zeros_like(m)
        picked[mine] = z[mine, ts[mine] - rows.lo] - m[mine]
        _reduce(picked, rows, distributed.all_reduce_sum)  # the target's logit - max, from the rank that holds it
        z.sub_(m[:, None]).exp_()
        total = _reduce(z.sum(dim=1), rows, distributed.all_reduce_sum)
        z.div_(total[:, None])  # softmax over the whole vocabulary, this rank's columns
        out = torch.log(total) - picked
        start = sum(counts[:distributed.rank()]) if rows.parallel else 0
        ctx.rows, ctx.start, ctx.n, ctx.dtype = rows, start, x.shape[0], x.dtype
        ctx.save_for_backward(z, ts, mine)
        return out[start:start + x.shape[0]]

    @staticmethod
    def backward(ctx, grad):
        p, ts, mine = ctx.saved_tensors
        rows = ctx.rows
        g = _gather(grad.to(p.dtype), rows)[0]
        p[mine, ts[mine] - rows.lo] -= 1
        p.mul_(g[:, None])
        # the softmax tail of real LM logits is denormal floats, several times slower in the matmul below
        p.masked_fill_(p.abs() < 1e-30, 0.0)
        dx = p.to(rows.weight.dtype) @ rows.weight  # this rank's part of every token's gradient
        _reduce(dx, rows, distributed.all_reduce_sum)
        return dx[ctx.start:ctx.start + ctx.n].to(ctx.dtype), None, None


def _gather(t, rows):
    return distributed.all_gather_rows(t) if rows.parallel else (t, [t.shape[0]])


def _reduce(t, rows, op):
    return op(t) if rows.parallel else t
