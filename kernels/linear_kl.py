"""Fused vocabulary projections + KL distillation loss (Triton).

Per counted row n, with zs = W_s x_s / tau (source, constant) and zt = W_t x_t / tau (trainable), ps, pt their
softmaxes (docs/method.md, section 5 and "Fused losses"):
    loss_n      = tau^2 * KL(ps || pt) = tau^2 * (E_ps[zs - zt] - lse(zs) + lse(zt))
    dloss/dx_t  = tau * sum_v (pt_v - ps_v) W_t,v
    dloss/dW_t,v = tau * (pt_v - ps_v) x_t          (the source side gets no gradient)
The widths d_s and d_t may differ; the vocabularies must match.

Design: as kernels/fisher_quadratic.py (read its docstring first). One program owns BLOCK_M rows (and possibly a
slice of V), streams over vocabulary blocks, projects both sides (two tl.dot loops, over d_s and over d_t),
keeps running (m_s, S_s), (m_t, S_t) and the running mean A = E_ps[zs - zt], and carries the gradient in two
[BLOCK_M, d_t] float32 accumulators in global memory, normalised by the running sums:
    Dg = tau * sum (pt - ps) W_t   (the gradient itself),   Gs = tau * sum ps W_t
With c_s = alpha_s S_s / S_s', c_t = alpha_t S_t / S_t' the rescalings of the two softmaxes for a new block,
    Dg <- c_t * Dg + (c_t - c_s) * Gs + dot(tau * (pt_b - ps_b), W_t,b)
    Gs <- c_s * Gs + dot(tau * ps_b, W_t,b)
so the operand rounded to bf16/fp16 is the difference pt - ps, not pt and ps separately: near convergence
pt ~ ps and the separate accumulators of docs/method.md Gt/S_t - Gs/S_s would cancel after rounding.
The accumulators are updated once per SUB vocabulary blocks from staged operand tiles, as in the Fisher kernel.
FLOPs: 2 * N * V * (d_s + 3 * d_t). The weight gradient is a second kernel over V, run in backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from semalign_ds.kernels import _common as C

# (kwargs, num_warps, num_stages) for H100, chosen as in fisher_quadratic.py (no spills on sm_90 in bf16/fp16).
_FWD_HALF = [
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, BLOCK_D=128, SUB=4), 8, 2),
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, BLOCK_D=64, SUB=4), 8, 2),
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, BLOCK_D=64, SUB=4), 8, 4),
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, BLOCK_D=128, SUB=4), 8, 3),
]
_FWD_F32 = [
    (dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, BLOCK_D=64, SUB=4), 8, 2),
    (dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, BLOCK_D=32, SUB=4), 4, 3),
]
_FWD_INTERP = dict(BLOCK_M=32, BLOCK_V=128, BLOCK_K=32, BLOCK_D=32, SUB=3)  # 1000 columns: 3 + 3 + 2 blocks
_DW_HALF = [
    (dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=64, BLOCK_D=128), 8, 3),
    (dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=64, BLOCK_D=64), 8, 3),
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, BLOCK_D=128), 8, 3),
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, BLOCK_D=64), 8, 3),
]
_DW_F32 = [
    (dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, BLOCK_D=64), 8, 2),
    (dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, BLOCK_D=32), 4, 3),
]
_DW_INTERP = dict(BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, BLOCK_D=32)


@triton.jit
def _project(X, W, rows64, row_ok, vs, v_ok, K, swv, swk,
             OP: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_V] = x[rows] @ W[vs]^T over a width of K (x contiguous [M, K]), in float32."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(X + rows64[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + vs.to(tl.int64)[None, :] * swv + ks[:, None] * swk, mask=k_ok[:, None] & v_ok[None, :],
                    other=0.0)
        acc = tl.dot(x.to(OP), w.to(OP), acc, input_precision=PREC)
    return acc


@C.autotune(_FWD_HALF, _FWD_F32, _FWD_INTERP, key=["DT", "DS", "V"])
@triton.jit
def _kl_fwd_kernel(XT, WT, XS, WS, STATS, DG, GS, STAGE_OP, STAGE_SC, M, V, DT, DS, swtv, swtd, swsv, swsd,
                   inv_tau, tau, OP: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SUB: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits) * BLOCK_V
    v_lo = split * per_split
    v_hi = tl.minimum(V, v_lo + per_split)
    acc_off = split.to(tl.int64) * M * DT + rows64[:, None] * DT
    # staging area: SUB x (tau (p_t - p_s), tau p_s) tiles [BLOCK_M, BLOCK_V] and SUB x (c_t, c_s) [BLOCK_M]
    prog = (pid_m * n_splits + split).to(tl.int64)
    stage_op = STAGE_OP + prog * (2 * SUB * BLOCK_M * BLOCK_V)
    stage_sc = STAGE_SC + prog * (2 * SUB * BLOCK_M)
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    lane = tl.arange(0, BLOCK_M)

    zero = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, DT, BLOCK_D):
        cols_d = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols_d[None, :] < DT)
        tl.store(DG + acc_off + cols_d[None, :], zero, mask=ok)
        tl.store(GS + acc_off + cols_d[None, :], zero, mask=ok)

    m_s = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    a = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v_sb in range(v_lo, v_hi, SUB * BLOCK_V):
        n_sub = tl.minimum(SUB, tl.cdiv(v_hi - v_sb, BLOCK_V))
        # phase 1, per vocabulary block: both logits, running statistics, the accumulation operands, staged
        for j in range(0, n_sub):
            vs = v_sb + j * BLOCK_V + tl.arange(0, BLOCK_V)
            v_ok = vs < v_hi
            zs = _project(XS, WS, rows64, row_ok, vs, v_ok, DS, swsv, swsd,
                          OP, PREC, BLOCK_M, BLOCK_V, BLOCK_K) * inv_tau
            zt = _project(XT, WT, rows64, row_ok, vs, v_ok, DT, swtv, swtd,
                          OP, PREC, BLOCK_M, BLOCK_V, BLOCK_K) * inv_tau
            diff = zs - zt  # before masking: -inf - -inf would be NaN
            zs = tl.where(v_ok[None, :], zs, float("-inf"))
            zt = tl.where(v_ok[None, :], zt, float("-inf"))

            ms_new = tl.maximum(m_s, tl.max(zs, axis=1))
            mt_new = tl.maximum(m_t, tl.max(zt, axis=1))
            e_s = tl.exp(zs - ms_new[:, None])
            e_t = tl.exp(zt - mt_new[:, None])
            alpha_s = tl.exp(m_s - ms_new)
            alpha_t = tl.exp(m_t - mt_new)
            ss_new = alpha_s * s_s + tl.sum(e_s, axis=1)
            st_new = alpha_t * s_t + tl.sum(e_t, axis=1)
            c_s = alpha_s * s_s / ss_new
            c_t = alpha_t * s_t / st_new
            a = c_s * a + tl.sum(e_s * diff, axis=1) / ss_new
            p_s = e_s / ss_new[:, None]
            p_t = e_t / st_new[:, None]
            tl.store(stage_op + (2 * j) * BLOCK_M * BLOCK_V + tile, (tau * (p_t - p_s)).to(OP))
            tl.store(stage_op + (2 * j + 1) * BLOCK_M * BLOCK_V + tile, (tau * p_s).to(OP))
            tl.store(stage_sc + (2 * j) * BLOCK_M + lane, c_t)
            tl.store(stage_sc + (2 * j + 1) * BLOCK_M + lane, c_s)
            m_s, m_t, s_s, s_t = ms_new, mt_new, ss_new, st_new
        tl.debug_barrier()  # staged tiles written by all threads before any reads them back

        # phase 2, per column chunk of the accumulators: one read and one write for SUB vocabulary blocks
        for d0 in range(0, DT, BLOCK_D):
            cols_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = cols_d < DT
            ok = row_ok[:, None] & d_ok[None, :]
            dg = tl.load(DG + acc_off + cols_d[None, :], mask=ok, other=0.0)
            gs = tl.load(GS + acc_off + cols_d[None, :], mask=ok, other=0.0)
            for j in range(0, n_sub):
                vs = v_sb + j * BLOCK_V + tl.arange(0, BLOCK_V)
                wd = tl.load(WT + vs.to(tl.int64)[:, None] * swtv + cols_d[None, :] * swtd,
                             mask=(vs < v_hi)[:, None] & d_ok[None, :], other=0.0).to(OP)
                coef = tl.load(stage_op + (2 * j) * BLOCK_M * BLOCK_V + tile)
                p_s = tl.load(stage_op + (2 * j + 1) * BLOCK_M * BLOCK_V + tile)
                c_t = tl.load(stage_sc + (2 * j) * BLOCK_M + lane)
                c_s = tl.load(stage_sc + (2 * j + 1) * BLOCK_M + lane)
                dg = tl.dot(coef, wd, c_t[:, None] * dg + (c_t - c_s)[:, None] * gs, input_precision=PREC)
                gs = tl.dot(p_s, wd, c_s[:, None] * gs, input_precision=PREC)
            tl.store(DG + acc_off + cols_d[None, :], dg, mask=ok)
            tl.store(GS + acc_off + cols_d[None, :], gs, mask=ok)
        tl.debug_barrier()  # staged tiles read by all threads before the next blocks overwrite them

    # per split: lse of zs, lse of zt, E_ps[zs - zt]; [splits, 3, M]
    st = STATS + split.to(tl.int64) * 3 * M + rows64
    tl.store(st, m_s + tl.log(tl.maximum(s_s, 1e-30)), mask=row_ok)  # -inf for an empty slice
    tl.store(st + M, m_t + tl.log(tl.maximum(s_t, 1e-30)), mask=row_ok)
    tl.store(st + 2 * M, a, mask=row_ok)


@C.autotune(_DW_HALF, _DW_F32, _DW_INTERP, key=["DT", "DS", "V"])
@triton.jit
def _kl_dw_kernel(XT, WT, XS, WS, LSE_S, LSE_T, SCALE, DW, M, V, DT, DS, swtv, swtd, swsv, swsd, inv_tau, tau,
                  OP: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dW_t[v] = sum_n scale_n * tau * (pt_nv - ps_nv) x_t,n for this program's BLOCK_V vocabulary rows."""
    vs = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vs < V
    dw_rows = DW + vs.to(tl.int64)[:, None] * DT

    zero = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, DT, BLOCK_D):
        cols_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(dw_rows + cols_d[None, :], zero, mask=v_ok[:, None] & (cols_d[None, :] < DT))

    for r0 in range(0, M, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        zs = _project(XS, WS, rows64, row_ok, vs, v_ok, DS, swsv, swsd,
                      OP, PREC, BLOCK_M, BLOCK_V, BLOCK_K) * inv_tau
        zt = _project(XT, WT, rows64, row_ok, vs, v_ok, DT, swtv, swtd,
                      OP, PREC, BLOCK_M, BLOCK_V, BLOCK_K) * inv_tau
        lse_s = tl.load(LSE_S + rows, mask=row_ok, other=0.0)
        lse_t = tl.load(LSE_T + rows, mask=row_ok, other=0.0)
        scale = tl.load(SCALE + rows, mask=row_ok, other=0.0)  # 0 on padding rows: they add nothing
        p_s = tl.exp(zs - lse_s[:, None])
        p_t = tl.exp(zt - lse_t[:, None])
        coef = tl.where(v_ok[None, :], (tau * scale)[:, None] * (p_t - p_s), 0.0)
        coef = tl.trans(coef).to(OP)  # [BLOCK_V, BLOCK_M]
        for d0 in range(0, DT, BLOCK_D):
            cols_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = cols_d < DT
            x = tl.load(XT + rows64[:, None] * DT + cols_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0).to(OP)
            ok = v_ok[:, None] & d_ok[None, :]
            acc = tl.load(dw_rows + cols_d[None, :], mask=ok, other=0.0)
            acc = tl.dot(coef, x, acc, input_precision=PREC)
            tl.store(dw_rows + cols_d[None, :], acc, mask=ok)


def _strides(wt, ws):
    return wt.stride(0), wt.stride(1), ws.stride(0), ws.stride(1)


def _forward(xt, wt, xs, ws, tau, splits):
    """Counted rows only. Returns lse_s, lse_t, per-row loss [M] and grad_x_t [M, d_t] (float32, unscaled)."""
    rows, dt = xt.shape
    vocab = wt.shape[0]
    stats = torch.empty((splits, 3, rows), dtype=torch.float32, device=xt.device)
    dg = torch.empty((splits, rows, dt), dtype=torch.float32, device=xt.device)
    gs = torch.empty((splits, rows, dt), dtype=torch.float32, device=xt.device)
    op = C.operand_dtype(xt, wt, xs, ws)
    stage_op, stage_sc = C.staging(_kl_fwd_kernel, rows, splits, op, xt.device)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), splits)  # noqa: E731
    _kl_fwd_kernel[grid](xt, wt, xs, ws, stats, dg, gs, stage_op, stage_sc, rows, vocab, dt, xs.shape[1],
                         *_strides(wt, ws), 1.0 / tau, tau, OP=op, PREC=C.dot_precision(op))
    lse_s, lse_t, a = stats.unbind(1)
    if splits > 1:
        # weights of each vocabulary slice in the two full softmaxes; the kernel's rules, once per slice
        ls, lt = torch.logsumexp(lse_s, 0), torch.logsumexp(lse_t, 0)
        ws_j, wt_j = torch.exp(lse_s - ls), torch.exp(lse_t - lt)      # [splits, M]; 0 for an empty slice
        a = (ws_j * a).sum(0, keepdim=True)
        dg = (wt_j[..., None] * dg + (wt_j - ws_j)[..., None] * gs).sum(0, keepdim=True)
        lse_s, lse_t = ls[None], lt[None]
    loss = tau * tau * (a[0] - lse_s[0] + lse_t[0])
    return lse_s[0], lse_t[0], loss, dg[0]


def _weight_grad(xt, wt, xs, ws, tau, lse_s, lse_t, scale):
    rows, dt = xt.shape
    vocab = wt.shape[0]
    dw = torch.empty((vocab, dt), dtype=torch.float32, device=xt.device)
    op = C.operand_dtype(xt, wt, xs, ws)
    grid = lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
    _kl_dw_kernel[grid](xt, wt, xs, ws, lse_s, lse_t, scale, dw, rows, vocab, dt, xs.shape[1],
                        *_strides(wt, ws), 1.0 / tau, tau, OP=op, PREC=C.dot_precision(op))
    return dw


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_t, weight_t, x_s, weight_s, tau, mask, reduction, splits):
        n, dt = x_t.shape
        rows = C.counted_rows(mask)
        count = rows.numel()
        xt, wt, xs, ws = C.kernel_inputs(x_t, weight_t, x_s, weight_s)
        # compacted contiguous rows: masked rows cost nothing
        xt, xs = xt.index_select(0, rows), xs.index_select(0, rows)
        if count:
            splits = C.num_splits(count, wt.shape[0], x_t.device, splits)
            lse_s, lse_t, loss_c, grad_c = _forward(xt, wt, xs, ws, float(tau), splits)
        else:
            lse_s = lse_t = loss_c = torch.zeros(0, dtype=torch.float32, device=x_t.device)
            grad_c = torch.zeros((0, dt), dtype=torch.float32, device=x_t.device)
        want_w = ctx.needs_input_grad[1]
        ctx.save_for_backward(grad_c, rows, *((xt, wt, xs, ws, lse_s, lse_t) if want_w else ()))
        ctx.tau, ctx.reduction, ctx.n = float(tau), reduction, n
        ctx.dtypes = (x_t.dtype, weight_t.dtype)
        return C.reduce_rows(loss_c, rows, n, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        grad_c, rows, *saved = ctx.saved_tensors
        scale = C.row_scale(grad_out, ctx.reduction, rows, rows.numel())
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = C.scatter_rows(grad_c * scale[:, None], rows, ctx.n, ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            xt, wt, xs, ws, lse_s, lse_t = saved
            if rows.numel():
                gw = _weight_grad(xt, wt, xs, ws, ctx.tau, lse_s, lse_t, scale)
            else:
                gw = torch.zeros(wt.shape, dtype=torch.float32, device=wt.device)
            gw = gw.to(ctx.dtypes[1])
        return gx, gw, None, None, None, None, None, None


def fused_linear_kl(x_t, weight_t, x_s, weight_s, temperature, mask, reduction, *, num_splits=None):
    """tau^2 * KL(softmax(W_s x_s / tau) || softmax(W_t x_t / tau)) fused with both projections (semantics and
    arguments as semalign_ds.losses.linear_kl_loss; inputs already validated, mask a [N] bool tensor).

    Returns a float32 loss: per row [N] (0 where masked) for reduction="none", else the sum or the mean over
    counted rows. Gradients reach x_t and, if it requires grad, weight_t; the source side is a constant.
    num_splits forces the number of vocabulary slices per row block (tests, tuning).
    """
    C.check_dtypes("fused_linear_kl", x_t, weight_t, x_s, weight_s)
    return _FusedKL.apply(x_t, weight_t, x_s, weight_s, float(temperature), mask, reduction, num_splits)
