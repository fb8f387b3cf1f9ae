"""The two SemAlign losses on vocabulary-sized logits, with interchangeable back ends.

fisher_quadratic_loss: the Fisher-weighted quadratic surrogate of tau^2 * KL(p* || softmax(z / tau)) around the
aligned target's logits z* = W y (METHOD.md, section 5):
    delta = (W x - W y) / tau,  p* = softmax(W y / tau)
    loss  = tau^2 / 2 * (sum_v p*_v delta_v^2 - (sum_v p*_v delta_v)^2)
linear_kl_loss: tau^2 * KL(softmax(W_s x_s / tau) || softmax(W_t x_t / tau)).

The target side (y, x_s, W_s, and W in z*) is a constant: gradients flow to x (x_t) and, when it requires grad, to
the weight through the trainable side's logits only.

Precision: every back end computes in float32 (float64 for float64 inputs) whatever the input dtype, and the
Fisher loss projects x - y (formed in float32) instead of subtracting z* from z: near convergence z and z* agree
to more digits than bf16 holds (rounding them first made the loss 18% off at |x - y| / |x| = 1%).

Back ends:
  naive    materialises the [N, V] logits with autograd; the reference.
  chunked  one pass over row blocks of [chunk, V], computing loss and gradients together; never more than a few
           [chunk, V] blocks alive. The default on CPU.
  triton   fused kernels that never write a [*, V] block to memory (semalign_ds.kernels); the default on CUDA.
"""
from __future__ import annotations

import torch

BACKENDS = ("auto", "naive", "chunked", "triton")
REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ELEMENTS = 1 << 24  # rows per block = this / V: ~64 MiB per fp32 [chunk, V] block
_W_BLOCK_ELEMENTS = 1 << 22  # vocabulary rows per upcast block of a half-precision head = this / d: ~16 MiB


def fisher_quadratic_loss(x, y, weight, temperature=1.0, mask=None, reduction="mean", backend="auto",
                          chunk_size=None):
    """Fisher-weighted quadratic loss between W x and W y; x, y: [N, d], weight: [V, d], mask: [N] bool.

    reduction="none" gives the per-position loss [N] (0 where masked); "mean" averages over counted positions
    (0, with zero gradients, when none counts); "sum" adds them. The loss is float32 (float64 for float64 inputs).
    """
    x, y, mask = _check(x, weight, y, mask, reduction, temperature, "fisher_quadratic_loss")
    backend = _resolve(backend, x)
    if backend == "naive":
        per_row = _fisher_naive(x, y, weight, temperature)
        return _reduce(per_row, mask, reduction)
    if backend == "triton":
        from semalign_ds.kernels.fisher_quadratic import fused_fisher_quadratic
        return fused_fisher_quadratic(x, y, weight, temperature, mask, reduction)
    return _ChunkedLoss.apply(_fisher_block, x, weight, (y,), (), temperature, mask, reduction,
                              _chunk_rows(weight, chunk_size))


def linear_kl_loss(x_t, weight_t, x_s, weight_s, temperature=1.0, mask=None, reduction="mean", backend="auto",
                   chunk_size=None):
    """tau^2 * KL(softmax(W_s x_s / tau) || softmax(W_t x_t / tau)) per position; x_t: [N, d_t], weight_t:
    [V, d_t], x_s: [N, d_s], weight_s: [V, d_s] (the widths may differ, the vocabularies must match)."""
    x_t, x_s, mask = _check(x_t, weight_t, x_s, mask, reduction, temperature, "linear_kl_loss", weight_s)
    backend = _resolve(backend, x_t)
    if backend == "naive":
        per_row = _kl_naive(x_t, weight_t, x_s, weight_s, temperature)
        return _reduce(per_row, mask, reduction)
    if backend == "triton":
        from semalign_ds.kernels.linear_kl import fused_linear_kl
        return fused_linear_kl(x_t, weight_t, x_s, weight_s, temperature, mask, reduction)
    return _ChunkedLoss.apply(_kl_block, x_t, weight_t, (x_s,), (weight_s,), temperature, mask, reduction,
                              _chunk_rows(weight_t, chunk_size))


# ---------------------------------------------------------------------------------------------------------------
# checks and shared pieces

def _check(x, weight, other, mask, reduction, temperature, name, weight_other=None):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction={reduction!r}; use one of {REDUCTIONS}")
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
    if x.dim() != 2 or weight.dim() != 2 or other.dim() != 2:
        raise ValueError(f"{name}: inputs must be 2-D [N, d] and [V, d]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(other.shape)} (flatten batch and sequence first)")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: width of x ({x.shape[1]}) != width of weight ({weight.shape[1]})")
    if other.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: {x.shape[0]} rows in x but {other.shape[0]} in the target side")
    w2 = weight if weight_other is None else weight_other
    if other.shape[1] != w2.shape[1]:
        raise ValueError(f"{name}: width of the target side ({other.shape[1]}) != its weight's ({w2.shape[1]})")
    if w2.shape[0] != weight.shape[0]:
        raise ValueError(f"{name}: vocabularies differ: {weight.shape[0]} vs {w2.shape[0]} rows")
    if mask is None:
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    elif mask.shape != (x.shape[0],):
        raise ValueError(f"{name}: mask must be [N]={x.shape[0]} bool, got {tuple(mask.shape)}")
    return x, other, mask.to(torch.bool)


def _resolve(backend, x):
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; use one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda else "chunked"
    if backend == "triton" and not x.is_cuda and not _interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for testing on CPU); "
                         "use backend='chunked' on CPU")
    return backend


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def acc_dtype(*tensors):
    """Accumulation dtype: float64 if any input is float64, else float32 (whatever the input dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _reduce(per_row, mask, reduction):
    per_row = torch.where(mask, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / mask.sum().clamp(min=1)


def _chunk_rows(weight, chunk_size):
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(16, _CHUNK_ELEMENTS // weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# naive back end (reference): [N, V] logits, autograd does the rest

def _fisher_naive(x, y, weight, tau):
    dt = acc_dtype(x, y, weight)
    xf, yf, wf = x.to(dt), y.to(dt), weight.to(dt)
    with torch.no_grad():
        p = torch.softmax(yf @ wf.T / tau, dim=-1)
    # z - z* = W (x - y), projected in the accumulation dtype: rounding z and z* before subtracting would lose
    # delta near convergence. The weight's gradient must come through z = W x alone (z* is a constant target):
    # zw - zw.detach() is exactly zero in value and carries that gradient.
    delta = (xf - yf) @ wf.detach().T
    if weight.requires_grad:
        zw = xf.detach() @ wf.T
        delta = delta + (zw - zw.detach())
    delta = delta / tau
    mean = (p * delta).sum(-1)
    return tau * tau / 2 * ((p * delta * delta).sum(-1) - mean * mean)


def _kl_naive(x_t, weight_t, x_s, weight_s, tau):
    dt = acc_dtype(x_t, weight_t, x_s, weight_s)
    with torch.no_grad():
        log_ps = torch.log_softmax(x_s.to(dt) @ weight_s.to(dt).T / tau, dim=-1)
    log_pt = torch.log_softmax(x_t.to(dt) @ weight_t.to(dt).T / tau, dim=-1)
    return tau * tau * (log_ps.exp() * (log_ps - log_pt)).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# chunked back end: per block of rows, the loss and dloss/dlogits together; gradients kept for backward

def _fisher_block(xc, weight, tau, dt, y):
    """Per-row loss [c] and dloss/dz [c, V] (z = weight @ x) for one block of rows, in dt."""
    y = y.to(dt)
    z_star = _project(y, weight, dt)
    delta = _project(xc.to(dt) - y, weight, dt).div_(tau)  # W (x - y): exact near convergence
    p = _flush_tail(torch.softmax(z_star.div_(tau), dim=-1))
    del z_star
    mean = (p * delta).sum(-1, keepdim=True)
    delta.sub_(mean)  # delta - mean: the variance form is the stable one
    loss = tau * tau / 2 * (p * delta * delta).sum(-1)
    return loss, p.mul_(delta).mul_(tau)


def _kl_block(xc, weight_t, tau, dt, x_s, weight_s):
    log_ps = torch.log_softmax(_project(x_s.to(dt), weight_s, dt).div_(tau), dim=-1)
    log_pt = torch.log_softmax(_project(xc.to(dt), weight_t, dt).div_(tau), dim=-1)
    ps = _flush_tail(log_ps.exp())
    loss = tau * tau * (ps * (log_ps - log_pt)).sum(-1)
    del log_ps
    # d/dz_t of tau^2 KL with z_t = W_t x / tau: tau * (p_t - p_s)
    return loss, _flush_tail(log_pt.exp_()).sub_(ps).mul_(tau)


def _vocab_blocks(weight, dt):
    """(start, block of weight in dt) over the vocabulary: a half-precision head is upcast a block at a time
    (~16 MiB each), never whole; a head already in dt is one block, no copy."""
    if weight.dtype == dt:
        yield 0, weight
        return
    step = max(1, _W_BLOCK_ELEMENTS // weight.shape[1])
    for v0 in range(0, weight.shape[0], step):
        yield v0, weight[v0:v0 + step].to(dt)


def _project(a, weight, dt):
    """a [c, d] (in dt) @ weight.T -> [c, V] in dt, with the weight upcast block by block."""
    if weight.dtype == dt:
        return a @ weight.T
    out = torch.empty(a.shape[0], weight.shape[0], dtype=dt, device=a.device)
    for v0, wb in _vocab_blocks(weight, dt):
        out[:, v0:v0 + wb.shape[0]] = a @ wb.T
    return out


def _back_project(dz, xc, weight, dt, grad_w):
    """dz [c, V] @ weight -> [c, d] in dt; adds dz^T @ xc into grad_w (float32 or float64) when given."""
    out = torch.zeros(dz.shape[0], weight.shape[1], dtype=dt, device=dz.device)
    xc = xc.to(dt)
    for v0, wb in _vocab_blocks(weight, dt):
        block = dz[:, v0:v0 + wb.shape[0]]
        out.addmm_(block, wb)
        if grad_w is not None:
            grad_w[v0:v0 + wb.shape[0]].addmm_(block.T, xc)
    return out


def _flush_tail(p):
    """Zero probabilities below 1e-30 (in place). Real LM logits span ~150 nats, so a fifth of a softmax row is
    denormal floats, and arithmetic on denormals is 5-7x slower on x86 CPUs (set_flush_denormal reaches only the
    calling thread). Their share of any sum here is below float32 resolution."""
    return p.masked_fill_(p < 1e-30, 0.0)


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block_fn, x, weight, row_inputs, consts, tau, mask, reduction, chunk):
        rows = mask.nonzero().squeeze(1)
        dt = acc_dtype(x, weight, *row_inputs, *consts)
        per_row = torch.zeros(x.shape[0], dtype=dt, device=x.device)
        grad_x = torch.zeros(x.shape, dtype=dt, device=x.device)
        want_w = weight.requires_grad
        grad_w = torch.zeros(weight.shape, dtype=dt, device=weight.device) if want_w else None
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            xc = x[idx]
            loss, dz = block_fn(xc, weight, tau, dt, *(t[idx] for t in row_inputs), *consts)
            per_row[idx] = loss
            grad_x[idx] = _back_project(dz, xc, weight, dt, grad_w)
        count = rows.numel()
        ctx.save_for_backward(grad_x, mask, grad_w if want_w else None)
        ctx.reduction, ctx.count = reduction, count
        ctx.dtypes = (x.dtype, weight.dtype)
        if reduction == "none":
            return per_row
        total = per_row.sum()
        return total if reduction == "sum" else total / max(count, 1)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, mask, grad_w = ctx.saved_tensors
        if ctx.reduction == "none":
            scale_x = grad_out.to(grad_x.dtype).unsqueeze(1) * mask.unsqueeze(1)
            gx = grad_x * scale_x
            gw = None
            if grad_w is not None:
                # a per-row scale does not factor out of the summed weight gradient
                raise RuntimeError("reduction='none' with a trainable weight is not supported by the chunked "
                                   "back end; reduce with 'mean' or 'sum' or freeze the weight")
        else:
            scale = grad_out.to(grad_x.dtype)
            if ctx.reduction == "mean":
                scale = scale / max(ctx.count, 1)
            gx = grad_x * scale
            gw = grad_w * scale if grad_w is not None else None
        x_dtype, w_dtype = ctx.dtypes
        return (None, gx.to(x_dtype), None if gw is None else gw.to(w_dtype)) + (None,) * 6
