"""The two SemAlign losses on vocabulary-sized logits, with interchangeable back ends.

fisher_quadratic_loss: the Fisher-weighted quadratic surrogate of tau^2 * KL(p* || softmax(z / tau)) around the
aligned target's logits z* = W y (docs/method.md, section 5):
    delta = (W x - W y) / tau,  p* = softmax(W y / tau)
    loss  = tau^2 / 2 * (sum_v p*_v delta_v^2 - (sum_v p*_v delta_v)^2)
linear_kl_loss: tau^2 * KL(softmax(W_s x_s / tau) || softmax(W_t x_t / tau)).
fisher_topk_support / fisher_topk_loss: the Fisher loss on the top-k support of p*, which the cache fixes once
(docs/method.md, "Top-k Fisher"): O(k d) per token instead of O(V d).

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

import functools

import torch

BACKENDS = ("auto", "naive", "chunked", "triton")
REDUCTIONS = ("mean", "sum", "none")
TAIL_MODES = ("renormalize", "bucket")
# rows per block = this / V: ~128 MiB per fp32 [chunk, V] block (261 rows at V = 128,256). The block's two
# products with the head read all of it for every block: at 130 rows (64 MiB) one thread ran them at 74 GFLOP/s
# alone and 66 beside a second rank on the other core, at 261 rows at 84 and 80 (d = 1024, 2 cores)
_CHUNK_ELEMENTS = 1 << 25
_GATHER_ELEMENTS = 1 << 24  # rows per top-k block = this / (k d): ~64 MiB per fp32 [chunk, k, d] gather
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


def fisher_topk_support(y, weight, k, temperature=1.0, chunk_size=None):
    """The top-k support of p* = softmax(W y / tau), for fisher_topk_loss; y: [N, d], weight: [V, d].

    Returns (ids [N, k] int32, zstar [N, k], tail [N]): per row the k largest logits z* = W y (ids and raw
    values, largest first) and the exact tail mass t = 1 - sum_S p*_v under the full-vocabulary normaliser,
    summed over the complement itself so that a tiny tail keeps its digits. zstar and tail are float32 (float64
    for float64 inputs); zstar must stay float32: near convergence fisher_topk_loss subtracts it from W x, and
    float16 values would carry ~5e-4 |z| of rounding. ids do not depend on tau, tail does: pass the temperature
    the loss will use. Computed without autograd over blocks of rows, the head upcast a vocabulary block at a
    time: never an [N, V] tensor.
    """
    _check_2d("fisher_topk_support", y=y, weight=weight)
    if y.shape[1] != weight.shape[1]:
        raise ValueError(f"fisher_topk_support: width of y ({y.shape[1]}) != width of weight ({weight.shape[1]})")
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"fisher_topk_support: k={k} must be in [1, V={weight.shape[0]}]")
    _check_temperature(temperature, "fisher_topk_support")
    dt = acc_dtype(y, weight)
    n = y.shape[0]
    ids = torch.empty(n, k, dtype=torch.int32, device=y.device)
    zstar = torch.empty(n, k, dtype=dt, device=y.device)
    tail = torch.empty(n, dtype=dt, device=y.device)
    chunk = _chunk_rows(weight, chunk_size)
    with torch.no_grad():
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            z = _project(y[rows].to(dt), weight, dt)
            zstar[rows], top = z.topk(k, dim=1)
            ids[rows] = top.to(torch.int32)
            lse = torch.logsumexp(z.div_(temperature), dim=1)
            tail[rows] = torch.logsumexp(z.scatter_(1, top, float("-inf")), dim=1).sub_(lse).exp_()
    return ids, zstar, tail


def fisher_topk_loss(x, weight, ids, zstar, tail, temperature=1.0, tail_mode="renormalize", mask=None,
                     reduction="mean", chunk_size=None):
    """The Fisher loss on the top-k support S of p* only (docs/method.md, "Top-k Fisher"): O(k d) per row.

    x: [N, d], weight: [V, d]; ids [N, k] (integer), zstar [N, k] and tail [N] from fisher_topk_support with the
    same weight and temperature. With delta_v = (W_v x - z*_v) / tau on S, p~ = softmax(z*_S / tau) (p*
    renormalised on S) and t the tail mass:
      "renormalize": tau^2/2 * (1 - t) * Var_{p~}(delta_S). The tail's own spread and its mean's distance from
                     the support's are dropped: 0 <= exact - this <= tau^2/2 * t * (max_v delta - min_v delta)^2
                     (over the whole vocabulary); shift-invariant in delta, like the exact loss.
      "bucket":      the tail as one more outcome of mass t with delta = 0 (its logits taken as unmoved):
                     tau^2/2 * Var_q(delta), q = (p*_S, t), i.e. tau^2/2 * (sum_S p* delta^2 - (sum_S p* delta)^2);
                     not shift-invariant, |exact - this| <= tau^2/2 * 3 t * max_v delta^2.
    Both equal fisher_quadratic_loss when k = V (t = 0). Gradients reach x and, when it requires grad, the k
    gathered rows of weight (through W x; z* is a constant target). Rows are processed in blocks whose
    [rows, k, d] float32 gather stays ~64 MiB (chunk_size overrides the row count). mask and reduction as in
    fisher_quadratic_loss; the loss is float32 (float64 for float64 inputs).
    """
    name = "fisher_topk_loss"
    _check_2d(name, x=x, weight=weight, ids=ids, zstar=zstar)
    n, k = ids.shape
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: width of x ({x.shape[1]}) != width of weight ({weight.shape[1]})")
    if zstar.shape != ids.shape or ids.shape[0] != x.shape[0] or tail.shape != (x.shape[0],):
        raise ValueError(f"{name}: expected ids and zstar [N, k] and tail [N] with N={x.shape[0]} rows of x; got "
                         f"{tuple(ids.shape)}, {tuple(zstar.shape)}, {tuple(tail.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name}: ids must be an integer tensor (int32 from fisher_topk_support), got {ids.dtype}")
    if not zstar.is_floating_point() or not tail.is_floating_point():
        raise ValueError(f"{name}: zstar and tail must be floating point, got {zstar.dtype} and {tail.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        raise ValueError(f"{name}: ids out of range [0, V={weight.shape[0]}) (a support made with another "
                         f"vocabulary?): min {int(ids.min())}, max {int(ids.max())}")
    if tail.numel() and not bool(((tail >= 0) & (tail <= 1)).all()):
        raise ValueError(f"{name}: tail masses must lie in [0, 1]; got min {float(tail.min())}, "
                         f"max {float(tail.max())}")
    if tail_mode not in TAIL_MODES:
        raise ValueError(f"{name}: tail_mode={tail_mode!r}; use one of {TAIL_MODES}")
    _check_temperature(temperature, name)
    mask = _check_mask(mask, x, reduction, name)
    chunk = int(chunk_size) if chunk_size is not None else max(1, _GATHER_ELEMENTS // max(k * x.shape[1], 1))
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    block = functools.partial(_topk_block, bucket=(tail_mode == "bucket"), scratch={})
    return _ChunkedLoss.apply(block, x, weight, (ids, zstar, tail), (), temperature, mask, reduction, chunk)


# ---------------------------------------------------------------------------------------------------------------
# checks and shared pieces

def _check(x, weight, other, mask, reduction, temperature, name, weight_other=None):
    _check_temperature(temperature, name)
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
    return x, other, _check_mask(mask, x, reduction, name)


def _check_temperature(temperature, name):
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


def _check_2d(name, **tensors):
    for key, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"{name}: {key} must be 2-D, got shape {tuple(t.shape)} (flatten batch and sequence "
                             "first)")


def _check_mask(mask, x, reduction, name):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction={reduction!r}; use one of {REDUCTIONS}")
    if mask is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if mask.shape != (x.shape[0],):
        raise ValueError(f"{name}: mask must be [N]={x.shape[0]} bool, got {tuple(mask.shape)}")
    return mask.to(torch.bool)


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

def _fisher_block(xc, weight, tau, dt, grad_w, y):
    """Per-row loss [c] and dloss/dx [c, d] for one block of rows, in dt; adds the block's dloss/dW into grad_w
    (when not None)."""
    y = y.to(dt)
    z_star = _project(y, weight, dt)
    delta = _project(xc.to(dt) - y, weight, dt).div_(tau)  # W (x - y): exact near convergence
    p = _flush_tail(torch.softmax(z_star.div_(tau), dim=-1))
    del z_star
    mean = (p * delta).sum(-1, keepdim=True)
    delta.sub_(mean)  # delta - mean: the variance form is the stable one
    loss = tau * tau / 2 * (p * delta * delta).sum(-1)
    return loss, _back_project(p.mul_(delta).mul_(tau), xc, weight, dt, grad_w)  # dloss/dz = tau p (delta - mean)


def _kl_block(xc, weight_t, tau, dt, grad_w, x_s, weight_s):
    log_ps = torch.log_softmax(_project(x_s.to(dt), weight_s, dt).div_(tau), dim=-1)
    log_pt = torch.log_softmax(_project(xc.to(dt), weight_t, dt).div_(tau), dim=-1)
    ps = _flush_tail(log_ps.exp())
    loss = tau * tau * (ps * (log_ps - log_pt)).sum(-1)
    del log_ps
    # d/dz_t of tau^2 KL with z_t = W_t x / tau: tau * (p_t - p_s)
    return loss, _back_project(_flush_tail(log_pt.exp_()).sub_(ps).mul_(tau), xc, weight_t, dt, grad_w)


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


def _topk_block(xc, weight, tau, dt, grad_w, ids, zstar, tail, bucket, scratch):
    """fisher_topk_loss on one block of rows: gather the k rows of W per row, [c, k, d] in dt."""
    ids = ids.long()
    wg = _gather_rows(weight, ids, dt, scratch)
    xc = xc.to(dt)
    zs = zstar.to(dt) / tau
    delta = torch.bmm(wg, xc.unsqueeze(2)).squeeze(2).div_(tau).sub_(zs)
    kept = (1 - tail.to(dt)).unsqueeze(1)
    p = torch.softmax(zs, dim=1).mul_(kept)                   # p* on S, (1 - t) p~
    mean = (p * delta).sum(1, keepdim=True)                    # E_{p*}[delta on S]; the bucket adds t * 0
    center = mean if bucket else mean / kept.clamp(min=torch.finfo(dt).tiny)  # E_q or E_{p~}
    delta.sub_(center)
    loss = (p * delta * delta).sum(1)
    if bucket:
        loss += tail.to(dt) * center.squeeze(1) ** 2           # the bucket's own (0 - center)^2
    coef = p.mul_(delta).mul_(tau)                             # dloss/dz on S: tau * weight * (delta - center)
    if grad_w is not None:
        grad_w.index_add_(0, ids.reshape(-1), (coef.unsqueeze(2) * xc.unsqueeze(1)).reshape(-1, xc.shape[1]))
    return tau * tau / 2 * loss, torch.bmm(coef.unsqueeze(1), wg).squeeze(1)


def _gather_rows(weight, ids, dt, scratch):
    """weight[ids] in dt, [c, k, d], written into buffers kept in `scratch` across the blocks of one call: a
    fresh ~64 MiB tensor per block costs more in page faults than the gather itself (4x on CPU)."""
    flat = ids.reshape(-1)
    rows = flat.numel()

    def buffer(dtype):
        buf = scratch.get(dtype)
        if buf is None or buf.shape[0] < rows:
            buf = scratch[dtype] = torch.empty(rows, weight.shape[1], dtype=dtype, device=weight.device)
        return buf[:rows]

    out = torch.index_select(weight.detach(), 0, flat, out=buffer(weight.dtype))
    if weight.dtype != dt:
        out = buffer(dt).copy_(out)
    return out.view(*ids.shape, weight.shape[1])


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
            per_row[idx], grad_x[idx] = block_fn(xc, weight, tau, dt, grad_w, *(t[idx] for t in row_inputs),
                                                 *consts)
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
