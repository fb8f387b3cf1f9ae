"""Fused vocabulary projection + Fisher-weighted quadratic loss (Triton).

Per counted row n, with z = W x, z* = W y, delta = (z - z*) / tau, p* = softmax(z* / tau) (docs/method.md, section 5):
    loss_n  = tau^2 / 2 * Var_{p*}(delta)
    dloss/dx = tau * sum_v p*_v (delta_v - mu) W_v,   mu = E_{p*}[delta]
    dloss/dW_v = tau * p*_v (delta_v - mu) x        (through z only: z* = W y is a constant target)

Design (forward: loss and grad_x in one pass over V; backward: a second pass only for a trainable W)

* One program owns BLOCK_M rows (and, for small batches, one of `splits` slices of V). It streams over vocabulary
  blocks of BLOCK_V: the two projections W(x - y) and W y are tl.dot's over d in BLOCK_K steps, then the running
  statistics of the block merge into the row's (max m, sum S, mean mu, variance) with online max rescaling.
  Projecting x - y (formed in float32) rather than subtracting two logits keeps delta accurate when x is close
  to y, which is where training ends up.
* The gradient needs sum_v p_v (delta_v - mu) W_v with mu known only at the end. Carried as two accumulators,
  normalised by the running S and centred on the running mean:
      G  = tau * sum p (delta - mu_run) W,   G0 = sum p W
  a block moves the centre by `shift` and rescales by w = alpha * S_old / S_new:
      G  <- w * (G - tau * shift * G0) + dot(tau * p_b * (delta_b - mu_new), W_b)
      G0 <- w * G0 + dot(p_b, W_b)
  Centring before the operands are rounded to bf16/fp16 matters: with the uncentred form of docs/method.md
  (G1 - mu * G0), a common offset of delta across the vocabulary (a direction of x - y on which W is nearly
  constant) is rounded to 8 bits and then cancelled, and the gradient error grows with offset / spread.
  FLOPs: 8 * N * V * d (two projections, two accumulations); a stats pass followed by a gradient pass would
  redo both projections (10 * N * V * d) to save G0.
* G and G0 are [BLOCK_M, d] float32: at d = 4096 that is 2 MiB per program, beyond registers and shared memory,
  so they live in global memory (G is the output buffer itself) and are updated in BLOCK_D column chunks. Read
  and written once per vocabulary block, they would cost 16 * BLOCK_M * d bytes per 8 * BLOCK_M * BLOCK_V * d
  FLOPs, 1/64 byte per FLOP at BLOCK_V = 128: about 200 TFLOP/s from HBM on an H100, a third of its bf16 rate
  (and BLOCK_V = 256 does not fit the registers). So the kernel works in two phases per SUB vocabulary blocks:
  phase 1 computes each block's logits and statistics and stages its two operand tiles (already rounded to the
  operand dtype, exactly what would enter the dot) and the per-row (w, shift) in a per-program scratch of
  SUB * BLOCK_M * BLOCK_V elements (L2-resident: ~128 KiB a program); phase 2 reads each G/G0 chunk once, replays
  the SUB updates in registers, and writes it once. Numerics are those of the one-block-at-a-time recurrence;
  the accumulator traffic drops SUB-fold (SUB = 4 on a GPU). The scratch is written and read back by different
  threads of the program, hence the barriers.
* The weight gradient needs the final (lse, mu) of every row, so it is a second kernel over V, run in backward
  (where grad_output is known, which also makes reduction="none" work with a trainable weight): each program
  owns BLOCK_V rows of dW (no atomics, deterministic), recomputes the two projections per row block and adds
  coef^T @ x into a float32 dW in BLOCK_D chunks. That read-modify-write (8 * BLOCK_V * d bytes per row block)
  is not staged like the forward's: SemAlign trains with the head frozen, so this path is the rarer one.
* No [N, V] buffer is ever written: memory is O(N d + V d) plus the staging scratch, O(N * SUB * BLOCK_V).
* Register use and shared memory of every GPU config were checked by compiling for sm_90 (kernels/_common.py,
  autotune); the kernels have not yet been timed on a GPU (kernels/bench.py is ready for it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from semalign_ds.kernels import _common as C

# (kwargs, num_warps, num_stages) for H100 (C.autotune says how they were checked). wgmma wants BLOCK_M a multiple
# of 64 and the registers hold two [BLOCK_M, BLOCK_V] float32 logit tiles, so 8 warps; BLOCK_V = 128 halves the
# read-modify-write traffic of the [BLOCK_M, d] accumulators relative to 64. (64, 256) and (128, 128) spill.
_FWD_HALF = [
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, BLOCK_D=128, SUB=4), 8, 3),
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, BLOCK_D=64, SUB=4), 8, 3),
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, BLOCK_D=64, SUB=4), 8, 4),
    (dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=64, BLOCK_D=64, SUB=4), 4, 3),
]
# float32 operands go through 3xTF32 unless torch allows TF32: these still spill a little under 3xTF32 (none
# under TF32); float32 is for checking, bf16 for training.
_FWD_F32 = [
    (dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, BLOCK_D=64, SUB=4), 8, 2),
    (dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, BLOCK_D=32, SUB=4), 4, 3),
]
_FWD_INTERP = dict(BLOCK_M=32, BLOCK_V=128, BLOCK_K=32, BLOCK_D=32, SUB=3)  # 1000 columns: 3 + 3 + 2 blocks
# dW: BLOCK_M is the reduction depth of coef^T @ x, so larger row blocks mean fewer dW read-modify-writes.
_DW_HALF = [
    (dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=64, BLOCK_D=128), 8, 3),
    (dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=64, BLOCK_D=64), 8, 3),
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, BLOCK_D=128), 8, 3),
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, BLOCK_D=64), 8, 3),
]
_DW_F32 = [
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, BLOCK_D=32), 8, 2),
    (dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, BLOCK_D=64), 8, 2),
]
_DW_INTERP = dict(BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, BLOCK_D=32)


@C.autotune(_FWD_HALF, _FWD_F32, _FWD_INTERP, key=["D", "V"])
@triton.jit
def _fisher_fwd_kernel(XD, Y, W, STATS, G, G0, STAGE_OP, STAGE_SC, M, V, D, swv, swd, inv_tau, tau,
                       OP: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SUB: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    # this program's slice of the vocabulary: whole BLOCK_V blocks, possibly empty
    per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits) * BLOCK_V
    v_lo = split * per_split
    v_hi = tl.minimum(V, v_lo + per_split)
    # partial accumulators of this split: [splits, M, D] float32, contiguous
    acc_off = split.to(tl.int64) * M * D + rows64[:, None] * D
    # this program's staging area: SUB x (coef, p) tiles [BLOCK_M, BLOCK_V] and SUB x (w_old, shift) [BLOCK_M]
    prog = (pid_m * n_splits + split).to(tl.int64)
    stage_op = STAGE_OP + prog * (2 * SUB * BLOCK_M * BLOCK_V)
    stage_sc = STAGE_SC + prog * (2 * SUB * BLOCK_M)
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    lane = tl.arange(0, BLOCK_M)

    zero = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols_d = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols_d[None, :] < D)
        tl.store(G + acc_off + cols_d[None, :], zero, mask=ok)
        tl.store(G0 + acc_off + cols_d[None, :], zero, mask=ok)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    mu = tl.zeros([BLOCK_M], dtype=tl.float32)
    var = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v_sb in range(v_lo, v_hi, SUB * BLOCK_V):
        n_sub = tl.minimum(SUB, tl.cdiv(v_hi - v_sb, BLOCK_V))
        # phase 1, per vocabulary block: logits, running statistics, and the accumulation operands, staged
        for j in range(0, n_sub):
            vs = v_sb + j * BLOCK_V + tl.arange(0, BLOCK_V)
            v_ok = vs < v_hi
            w_rows = W + vs.to(tl.int64) * swv
            # projections: delta = W (x - y) / tau and z* / tau, [BLOCK_M, BLOCK_V]
            dz = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
            zs = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                xm = row_ok[:, None] & k_ok[None, :]
                xd = tl.load(XD + rows64[:, None] * D + ks[None, :], mask=xm, other=0.0).to(OP)
                y = tl.load(Y + rows64[:, None] * D + ks[None, :], mask=xm, other=0.0).to(OP)
                wt = tl.load(w_rows[None, :] + ks[:, None] * swd, mask=k_ok[:, None] & v_ok[None, :], other=0.0)
                wt = wt.to(OP)
                dz = tl.dot(xd, wt, dz, input_precision=PREC)
                zs = tl.dot(y, wt, zs, input_precision=PREC)
            delta = dz * inv_tau
            zs = tl.where(v_ok[None, :], zs * inv_tau, float("-inf"))

            # merge the block into the running statistics (weights relative to the new max)
            m_new = tl.maximum(m, tl.max(zs, axis=1))
            e = tl.exp(zs - m_new[:, None])
            alpha = tl.exp(m - m_new)
            s_new = alpha * s + tl.sum(e, axis=1)
            w_old = alpha * s / s_new
            mu_new = w_old * mu + tl.sum(e * delta, axis=1) / s_new
            cent = delta - mu_new[:, None]
            var = w_old * (var + (mu - mu_new) * (mu - mu_new)) + tl.sum(e * cent * cent, axis=1) / s_new
            p = e / s_new[:, None]
            tl.store(stage_op + (2 * j) * BLOCK_M * BLOCK_V + tile, (tau * p * cent).to(OP))
            tl.store(stage_op + (2 * j + 1) * BLOCK_M * BLOCK_V + tile, p.to(OP))
            tl.store(stage_sc + (2 * j) * BLOCK_M + lane, w_old)
            tl.store(stage_sc + (2 * j + 1) * BLOCK_M + lane, tau * (mu_new - mu))
            m, s, mu = m_new, s_new, mu_new
        tl.debug_barrier()  # staged tiles written by all threads before any reads them back

        # phase 2, per column chunk of the accumulators: one read and one write for SUB vocabulary blocks,
        # replaying the blocks' updates in registers
        for d0 in range(0, D, BLOCK_D):
            cols_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = cols_d < D
            ok = row_ok[:, None] & d_ok[None, :]
            g = tl.load(G + acc_off + cols_d[None, :], mask=ok, other=0.0)
            g0 = tl.load(G0 + acc_off + cols_d[None, :], mask=ok, other=0.0)
            for j in range(0, n_sub):
                vs = v_sb + j * BLOCK_V + tl.arange(0, BLOCK_V)
                wd = tl.load(W + vs.to(tl.int64)[:, None] * swv + cols_d[None, :] * swd,
                             mask=(vs < v_hi)[:, None] & d_ok[None, :], other=0.0).to(OP)
                coef = tl.load(stage_op + (2 * j) * BLOCK_M * BLOCK_V + tile)
                p = tl.load(stage_op + (2 * j + 1) * BLOCK_M * BLOCK_V + tile)
                w_old = tl.load(stage_sc + (2 * j) * BLOCK_M + lane)
                shift = tl.load(stage_sc + (2 * j + 1) * BLOCK_M + lane)
                g = tl.dot(coef, wd, w_old[:, None] * (g - shift[:, None] * g0), input_precision=PREC)
                g0 = tl.dot(p, wd, w_old[:, None] * g0, input_precision=PREC)
            tl.store(G + acc_off + cols_d[None, :], g, mask=ok)
            tl.store(G0 + acc_off + cols_d[None, :], g0, mask=ok)
        tl.debug_barrier()  # staged tiles read by all threads before the next blocks overwrite them

    # per split: log-sum-exp of z*/tau, mean and variance of delta under p*; [splits, 3, M]
    st = STATS + split.to(tl.int64) * 3 * M + rows64
    tl.store(st, m + tl.log(tl.maximum(s, 1e-30)), mask=row_ok)  # -inf for an empty slice
    tl.store(st + M, mu, mask=row_ok)
    tl.store(st + 2 * M, var, mask=row_ok)


@C.autotune(_DW_HALF, _DW_F32, _DW_INTERP, key=["D", "V"])
@triton.jit
def _fisher_dw_kernel(X, XD, Y, W, LSE, MU, SCALE, DW, M, V, D, swv, swd, inv_tau, tau,
                      OP: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dW[v] = sum_n scale_n * tau * p*_nv (delta_nv - mu_n) x_n for this program's BLOCK_V vocabulary rows."""
    vs = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vs < V
    w_rows = W + vs.to(tl.int64) * swv
    dw_rows = DW + vs.to(tl.int64)[:, None] * D

    zero = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(dw_rows + cols_d[None, :], zero, mask=v_ok[:, None] & (cols_d[None, :] < D))

    for r0 in range(0, M, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        # logits transposed, [BLOCK_V, BLOCK_M], so that coef is already the left operand of coef^T @ x
        dz = tl.zeros([BLOCK_V, BLOCK_M], dtype=tl.float32)
        zs = tl.zeros([BLOCK_V, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            xm = k_ok[:, None] & row_ok[None, :]
            xd = tl.load(XD + rows64[None, :] * D + ks[:, None], mask=xm, other=0.0).to(OP)
            y = tl.load(Y + rows64[None, :] * D + ks[:, None], mask=xm, other=0.0).to(OP)
            w = tl.load(w_rows[:, None] + ks[None, :] * swd, mask=v_ok[:, None] & k_ok[None, :], other=0.0)
            w = w.to(OP)
            dz = tl.dot(w, xd, dz, input_precision=PREC)
            zs = tl.dot(w, y, zs, input_precision=PREC)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        mu = tl.load(MU + rows, mask=row_ok, other=0.0)
        scale = tl.load(SCALE + rows, mask=row_ok, other=0.0)  # 0 on padding rows: they add nothing
        p = tl.where(v_ok[:, None], tl.exp(zs * inv_tau - lse[None, :]), 0.0)
        coef = ((tau * scale)[None, :] * p * (dz * inv_tau - mu[None, :])).to(OP)
        for d0 in range(0, D, BLOCK_D):
            cols_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = cols_d < D
            x = tl.load(X + rows64[:, None] * D + cols_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0).to(OP)
            ok = v_ok[:, None] & d_ok[None, :]
            acc = tl.load(dw_rows + cols_d[None, :], mask=ok, other=0.0)
            acc = tl.dot(coef, x, acc, input_precision=PREC)
            tl.store(dw_rows + cols_d[None, :], acc, mask=ok)


def _forward(xd, y, w, tau, splits, op):
    """Counted rows only: xd = x - y and y, [M, d] contiguous. Returns lse, mu, var [M] and grad_x [M, d]
    (float32, before the reduction's scale)."""
    rows, d = xd.shape
    vocab = w.shape[0]
    stats = torch.empty((splits, 3, rows), dtype=torch.float32, device=xd.device)
    g = torch.empty((splits, rows, d), dtype=torch.float32, device=xd.device)
    g0 = torch.empty((splits, rows, d), dtype=torch.float32, device=xd.device)
    stage_op, stage_sc = C.staging(_fisher_fwd_kernel, rows, splits, op, xd.device)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), splits)  # noqa: E731
    _fisher_fwd_kernel[grid](xd, y, w, stats, g, g0, stage_op, stage_sc, rows, vocab, d, w.stride(0), w.stride(1),
                             1.0 / tau, tau, OP=op, PREC=C.dot_precision(op))
    lse, mu, var = stats.unbind(1)
    if splits == 1:
        return lse[0], mu[0], var[0], g[0]
    # merge the vocabulary slices: weights of each slice in the full softmax, then the same rules as the kernel
    lse_all = torch.logsumexp(lse, dim=0)
    wj = torch.exp(lse - lse_all)                              # [splits, M]; 0 for an empty slice
    mu_all = (wj * mu).sum(0)
    var_all = (wj * (var + (mu - mu_all) ** 2)).sum(0)
    grad = (wj[..., None] * (g + tau * (mu - mu_all)[..., None] * g0)).sum(0)
    return lse_all, mu_all, var_all, grad


def _weight_grad(x, xd, y, w, tau, lse, mu, scale, op):
    rows, d = x.shape
    vocab = w.shape[0]
    dw = torch.empty((vocab, d), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
    _fisher_dw_kernel[grid](x, xd, y, w, lse, mu, scale, dw, rows, vocab, d, w.stride(0), w.stride(1),
                            1.0 / tau, tau, OP=op, PREC=C.dot_precision(op))
    return dw


class _FusedFisher(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight, tau, mask, reduction, splits):
        n, d = x.shape
        rows = C.counted_rows(mask)
        count = rows.numel()
        xk, yk, wk = C.kernel_inputs(x, y, weight)
        op = C.operand_dtype(xk, yk, wk)
        # compacted contiguous rows (masked rows cost nothing); x - y formed in float32 and rounded once to the
        # operand dtype, exactly as the kernel would, so the kernel streams two plain matmul operands
        xc, yc = xk.index_select(0, rows), yk.index_select(0, rows)
        xd = (xc.float() - yc.float()).to(C.TORCH[op])
        if count:
            splits = C.num_splits(count, wk.shape[0], x.device, splits)
            lse, mu, var, grad_c = _forward(xd, yc, wk, float(tau), splits, op)
        else:
            lse = mu = var = torch.zeros(0, dtype=torch.float32, device=x.device)
            grad_c = torch.zeros((0, d), dtype=torch.float32, device=x.device)
        loss_c = 0.5 * tau * tau * var
        want_w = ctx.needs_input_grad[2]
        ctx.save_for_backward(grad_c, rows, *((xc, xd, yc, wk, lse, mu) if want_w else ()))
        ctx.tau, ctx.reduction, ctx.n, ctx.op = float(tau), reduction, n, op
        ctx.dtypes = (x.dtype, weight.dtype)
        return C.reduce_rows(loss_c, rows, n, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        grad_c, rows, *saved = ctx.saved_tensors
        scale = C.row_scale(grad_out, ctx.reduction, rows, rows.numel())
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = C.scatter_rows(grad_c * scale[:, None], rows, ctx.n, ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            xc, xd, yc, wk, lse, mu = saved
            if rows.numel():
                gw = _weight_grad(xc, xd, yc, wk, ctx.tau, lse, mu, scale, ctx.op)
            else:
                gw = torch.zeros(wk.shape, dtype=torch.float32, device=wk.device)
            gw = gw.to(ctx.dtypes[1])
        return gx, None, gw, None, None, None, None


def fused_fisher_quadratic(x, y, weight, temperature, mask, reduction, *, num_splits=None):
    """Fisher-weighted quadratic loss between W x and W y, fused with the projection (semantics and arguments
    as semalign_ds.losses.fisher_quadratic_loss; inputs already validated, mask a [N] bool tensor).

    Returns a float32 loss: per row [N] (0 where masked) for reduction="none", else the sum or the mean over
    counted rows. Gradients reach x and, if it requires grad, weight (through W x only). num_splits forces the
    number of vocabulary slices per row block (tests, tuning); by default it is chosen to fill the device.
    """
    C.check_dtypes("fused_fisher_quadratic", x, y, weight)
    return _FusedFisher.apply(x, y, weight, float(temperature), mask, reduction, num_splits)
