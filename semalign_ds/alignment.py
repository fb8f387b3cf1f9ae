"""Semantic bases and the alignment map (docs/method.md, section 3).

The semantic basis of a model is S = pinv(W) in R^{d x V} with unit columns: column i is token i's direction in
latent space. Decomposing a unit source state u on the source basis by cosine and recomposing on the target basis
with the same coefficients is a = S_t S_s^T u = M u, so M (d_t x d_s) is computed once and no V-sized coefficient
vector is ever formed per token.

How M is computed (`alignment_map`) without ever holding a V x d matrix in the basis dtype: for W [V, d],
pinv(W) = G^+ W^T with the Gram matrix G = W^T W (d x d), so column i of S is G^+ w_i / ||G^+ w_i|| and

    semantic:       M = sum_i G_t^+ w_t,i w_s,i^T G_s^+ / (n_t,i n_s,i) = G_t^+ C G_s^+,  n_i = ||G^+ w_i||
    least squares:  M = pinv(W_t) W_s = G_t^+ (W_t^T W_s)

where C = sum_i w_t,i w_s,i^T / (n_t,i n_s,i) is accumulated over blocks of vocabulary rows, like the Gram
matrices. Three passes over the vocabulary: the Gram matrices, the column norms n_i (whose maximum over all V
tokens the zero-row rule needs before anything is normalised), then C. Each pass is a sum over row blocks, so a
rank can do a contiguous share of the blocks (`share`) and the partial sums are all-reduced between passes;
`alignment_map` takes the rank, the world size and the all-reduce as arguments, and `phase` passes them.

G^+ comes from an eigendecomposition of G (eigenvalues = squared singular values of W), always in float64: forming
G squares W's condition number, so in float32 its small eigenvalues would be rounding (the norms and C passes run
in the basis dtype). torch.linalg.pinv(W) in the basis dtype keeps the directions with sigma > rtol * sigma_max,
rtol = max(V, d) * eps(dtype); here G^+ keeps those with sigma^2 > max(rtol^2, rtol64) * sigma_max^2, the second
term being the rounding of the float64 G itself (a sum of V products per entry), below which an eigenvalue is
indistinguishable from zero. So the result is torch.linalg.pinv's on rank-deficient heads (zero or duplicated
columns: sigma at rounding level, dropped by both), on every head in float32 (where pinv's own cutoff is the
larger one, (V eps32)^2 > V eps64 for any V; G^+ has float64's accuracy), and in float64 on every head whose
condition number is below 1 / sqrt(rtol64) (1.3e5 at V = 262144, 2.1e6 at V = 1031); a float64 head with singular values between
rtol64 * sigma_max and sqrt(rtol64) * sigma_max has directions that pinv keeps (amplified by up to 1 / sigma)
and this drops.
"""
from __future__ import annotations

import os

import torch


def semantic_basis(weight: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """S = pinv(W) with unit-length columns; weight: [V, d] LM head (padding rows already trimmed).

    A token whose head row is zero (padding embeddings are often initialised so) has no direction: its column
    is left at zero instead of normalising rounding noise to unit length. This forms V x d matrices: for small
    heads and tests; `alignment_map` never does."""
    basis = torch.linalg.pinv(weight.to(dtype))
    norms = basis.norm(dim=0, keepdim=True)
    empty = norms <= norms.max() * EMPTY_RTOL
    return torch.where(empty, torch.zeros((), dtype=dtype), basis / norms.clamp(min=torch.finfo(dtype).tiny))


EMPTY_RTOL = 1e-6  # a basis column shorter than this times the longest one is a zero head row: no direction
BLOCK_BYTES = 64 * 2 ** 20  # default block: one float64 tile of the wider head takes at most this


def default_block(d_t: int, d_s: int) -> int:
    """Vocabulary rows per block: a float64 tile [block, max(d_t, d_s)] (the Gram pass's) is at most BLOCK_BYTES
    (64 MiB: large enough for full-speed matrix products, small next to the heads themselves)."""
    return max(1, BLOCK_BYTES // (8 * max(d_t, d_s)))


def share(vocab: int, block: int, rank: int = 0, world: int = 1) -> tuple[int, int]:
    """Rows [lo, hi) that rank `rank` of `world` handles: a contiguous run of whole blocks (shares differ by at
    most one block; a rank may get none when there are fewer blocks than ranks)."""
    if block < 1:
        raise ValueError(f"block must be a positive number of vocabulary rows, got {block}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of a world of {world}: a rank must lie in 0..world-1")
    n = -(-vocab // block)
    return min(rank * n // world * block, vocab), min((rank + 1) * n // world * block, vocab)


def _blocks(rows, block):
    lo, hi = rows
    for a in range(lo, hi, block):
        yield a, min(a + block, hi)


def _tile(weight, a, b, dtype, device, first=0):
    # rows [a, b) of a head whose row 0 is vocabulary row `first`: a view when the head is already in this dtype
    # and on this device, else a block-sized copy
    return weight[a - first:b - first].detach().to(device=device, dtype=dtype)


def gram(weight: torch.Tensor, rows, block: int, device=None, first: int = 0) -> torch.Tensor:
    """sum over rows [lo, hi) of w_i w_i^T (d x d, float64 whatever the basis dtype: the module docstring says
    why): this share's part of G = W^T W. first: the vocabulary row that weight[0] is (a head's rows held alone)."""
    device = weight.device if device is None else device
    g = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=device)
    for a, b in _blocks(rows, block):
        x = _tile(weight, a, b, torch.float64, device, first)
        g.addmm_(x.T, x)
    return g


def gram_pinv(g: torch.Tensor, vocab: int, dtype=torch.float64) -> torch.Tensor:
    """G^+ in `dtype` of the whole float64 Gram matrix G = W^T W of a head with `vocab` rows, so that
    pinv(W) = G^+ W^T. Eigenvalues at or below max(rtol^2, rtol64) * lambda_max, rtol = max(vocab, d) * eps(dtype),
    are dropped: pinv's cutoff in `dtype`, or G's own rounding (module docstring)."""
    if not torch.isfinite(g).all():
        raise ValueError("the LM head has non-finite values (inf or NaN): the alignment map needs a finite head; "
                         "check the checkpoint, or the dtype it was loaded in")
    lam, q = torch.linalg.eigh(g)
    size = max(vocab, g.shape[0])
    rtol = max((size * torch.finfo(dtype).eps) ** 2, size * torch.finfo(torch.float64).eps)
    keep = lam > rtol * lam[-1].clamp(min=0)
    q = q[:, keep]
    return ((q / lam[keep]) @ q.T).to(dtype)


def norms(weight: torch.Tensor, p: torch.Tensor, rows, block: int, dtype=torch.float64, device=None,
          first: int = 0) -> torch.Tensor:
    """||G^+ w_i|| for the rows [lo, hi): the lengths of those columns of pinv(W) (P = G^+ symmetric)."""
    device = p.device if device is None else device
    out = torch.empty(rows[1] - rows[0], dtype=dtype, device=device)
    for a, b in _blocks(rows, block):
        out[a - rows[0]:b - rows[0]] = (_tile(weight, a, b, dtype, device, first) @ p).norm(dim=1)
    return out


def unit_scale(norms_t: torch.Tensor, norms_s: torch.Tensor, max_t, max_s) -> torch.Tensor:
    """1 / (n_t,i n_s,i): what token i's product w_t,i w_s,i^T is weighted by so that both basis columns are unit
    vectors; 0 where either column is empty (a zero head row: the rule of `semantic_basis`, against the longest
    column over the whole vocabulary)."""
    tiny = torch.finfo(norms_t.dtype).tiny
    empty = (norms_t <= max_t * EMPTY_RTOL) | (norms_s <= max_s * EMPTY_RTOL)
    return torch.where(empty, torch.zeros((), dtype=norms_t.dtype),
                       1 / (norms_t.clamp(min=tiny) * norms_s.clamp(min=tiny)))


def cross(weight_t: torch.Tensor, weight_s: torch.Tensor, rows, block: int, scale: torch.Tensor | None = None,
          dtype=torch.float64, device=None, first_s: int = 0) -> torch.Tensor:
    """sum over rows [lo, hi) of scale_i w_t,i w_s,i^T (d_t x d_s; scale indexed from lo, None: 1): this share's
    part of C (semantic) or of W_t^T W_s (least squares)."""
    device = weight_t.device if device is None else device
    c = torch.zeros(weight_t.shape[1], weight_s.shape[1], dtype=dtype, device=device)
    for a, b in _blocks(rows, block):
        x = _tile(weight_t, a, b, dtype, device)
        if scale is not None:
            x = x * scale[a - rows[0]:b - rows[0], None]
        c.addmm_(x.T, _tile(weight_s, a, b, dtype, device, first_s))
    return c


def alignment_map(weight_t: torch.Tensor, weight_s: torch.Tensor, dtype=torch.float64,
                  kind="semantic", *, block: int | None = None, device=None, rank: int = 0, world: int = 1,
                  reduce_sum=None, source_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """M in R^{d_t x d_s}, in float32: the semantic-basis map S_t S_s^T (kind "semantic", the paper), or the
    least-squares logit-matching map pinv(W_t) W_s (kind "least_squares": W_t M u is the target-space state whose
    logits are closest to the source's logit lens W_s u, exact when the pair shares its head).

    Computed through the d x d Gram matrices over blocks of `block` vocabulary rows (module docstring), in `dtype`
    on `device` (default: the target head's); the heads stay in their own dtype and only one block at a time is
    converted. Over several ranks: rank `rank` of `world` does its `share` of the blocks and `reduce_sum` (an
    in-place all-reduce sum over the ranks, e.g. distributed.all_reduce_sum) completes each partial sum; every
    rank then returns the same M. Returned on the target head's device.

    source_rows=(lo, hi): weight_s holds only the source head's rows [lo, hi) (its vocab_parallel.Rows), the ranks'
    rows cover the vocabulary once, and each rank does its own rows instead of its `share`."""
    if source_rows is not None and weight_s.shape[0] != source_rows[1] - source_rows[0]:
        raise ValueError(f"the source head's rows {source_rows} do not match its {weight_s.shape[0]} rows held")
    if source_rows is None and weight_t.shape[0] != weight_s.shape[0]:
        raise ValueError(f"vocabularies differ: target head {weight_t.shape[0]} rows, source {weight_s.shape[0]}")
    if kind not in ("semantic", "least_squares"):
        raise ValueError(f"unknown alignment map {kind!r}: semantic or least_squares")
    if world > 1 and reduce_sum is None:
        raise ValueError(f"alignment_map on {world} ranks needs reduce_sum, the all-reduce of the partial sums")
    vocab, d_t, d_s = weight_t.shape[0], weight_t.shape[1], weight_s.shape[1]
    device = weight_t.device if device is None else torch.device(device)
    block = default_block(d_t, d_s) if block is None else block
    rows = share(vocab, block, rank, world) if source_rows is None else tuple(source_rows)
    first = rows[0] if source_rows is not None else 0  # the vocabulary row of weight_s[0]
    reduce_sum = (lambda t: t) if reduce_sum is None else reduce_sum
    p_t = gram_pinv(reduce_sum(gram(weight_t, rows, block, device)), vocab, dtype)
    if kind == "least_squares":
        m = p_t @ reduce_sum(cross(weight_t, weight_s, rows, block, None, dtype, device, first))
        return m.float().to(weight_t.device)
    p_s = gram_pinv(reduce_sum(gram(weight_s, rows, block, device, first)), vocab, dtype)
    n_t = norms(weight_t, p_t, rows, block, dtype, device)
    n_s = norms(weight_s, p_s, rows, block, dtype, device, first)
    # the longest column over all ranks, through the sum all-reduce: each rank fills its own row
    longest = torch.zeros(world, 2, dtype=dtype, device=device)
    if len(n_t):
        longest[rank] = torch.stack([n_t.max(), n_s.max()])
    longest = reduce_sum(longest).amax(dim=0)
    scale = unit_scale(n_t, n_s, longest[0], longest[1])
    del n_t, n_s
    c = reduce_sum(cross(weight_t, weight_s, rows, block, scale, dtype, device, first))
    return (p_t @ c @ p_s).float().to(weight_t.device)


def alignment_cost(vocab: int, d_t: int, d_s: int, dtype_bytes: int = 8, block: int | None = None,
                   kind: str = "semantic") -> dict:
    """Memory and arithmetic of `alignment_map` on one rank, for the dry run (the heads themselves not counted;
    over R ranks the V-proportional flops divide by R, the d^3 ones do not).

    flops (semantic)      = 4 V (d_t^2 + d_s^2)      Gram matrices and column norms
                          + 2 V d_t d_s              C
                          + 11 (d_t^3 + d_s^3)       eigh (about 9 d^3) and G^+ (2 d^3)
                          + 2 d_t d_s (d_t + d_s)    M = G_t^+ C G_s^+
    flops (least_squares) = 2 V d_t^2 + 2 V d_t d_s + 11 d_t^3 + 2 d_t^2 d_s
    peak_bytes            = 8 (6 D^2 + b D) + dtype_bytes (d_t^2 + d_s^2 + 3 d_t d_s + 3 V + 3 b D),
                            D = max(d_t, d_s), b = min(block, V)
      an upper bound: the float64 Gram matrix, eigh's eigenvectors and workspace and G^+ of the wider head, and
      a float64 Gram tile; G^+ of both heads, C and M, the column norms and the scale, three block tiles in the
      basis dtype (dtype_bytes). block defaults to `default_block`.
    """
    if kind not in ("semantic", "least_squares"):
        raise ValueError(f"unknown alignment map {kind!r}: semantic or least_squares")
    block = min(default_block(d_t, d_s) if block is None else block, vocab)
    wide = max(d_t, d_s)
    if kind == "semantic":
        flops = (4 * vocab * (d_t ** 2 + d_s ** 2) + 2 * vocab * d_t * d_s + 11 * (d_t ** 3 + d_s ** 3)
                 + 2 * d_t * d_s * (d_t + d_s))
    else:
        flops = 2 * vocab * d_t ** 2 + 2 * vocab * d_t * d_s + 11 * d_t ** 3 + 2 * d_t ** 2 * d_s
    peak = (8 * (6 * wide ** 2 + block * wide)
            + dtype_bytes * (d_t ** 2 + d_s ** 2 + 3 * d_t * d_s + 3 * vocab + 3 * block * wide))
    return {"peak_bytes": int(peak), "flops": float(flops)}


def source_direction(h: torch.Tensor, final_norm=None) -> torch.Tensor:
    """u = n_s(h) / ||n_s(h)|| (logit-lens normalised when final_norm is given), in float32."""
    if final_norm is not None:
        h = final_norm(h)
    h = h.float()
    return h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def align(m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """a = M u for a batch of unit source states u [N, d_s] -> [N, d_t]."""
    return u @ m.T


def phase(s, head_t, head_s):
    """The alignment map of the run: alignment.safetensors when intact, else computed by every rank (each its
    share of the vocabulary: the rows of the source head it holds, head_s being its vocab_parallel.Rows; partial
    sums all-reduced) and saved by rank 0."""
    from semalign_ds import distributed, rundir
    path = s.rd.path("alignment.safetensors")
    stale = s.main and not rundir.intact(path)  # rank 0 checks; every rank's load_tensors below checks it again
    if distributed.broadcast_object(stale):
        if s.main and os.path.exists(path):
            print(f"{path} is damaged or has no checksum: recomputing it", flush=True)
        dtype = torch.float64 if s.cfg.basis_dtype == "float64" else torch.float32
        m = alignment_map(head_t.detach(), head_s.weight, dtype, s.cfg.alignment_map, device=s.device,
                          rank=distributed.rank(), world=distributed.world(), reduce_sum=distributed.all_reduce_sum,
                          source_rows=(head_s.lo, head_s.hi) if head_s.parallel else None)
        if s.main:
            rundir.save_tensors(path, {"M": m})
    distributed.barrier()
    return rundir.load_tensors(path)["M"].to(s.device)
