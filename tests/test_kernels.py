"""The Triton fused losses (semalign_ds.kernels) against exact float64 references written here.

Without a GPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set before anything imports
them), about a thousand times slower than torch: sizes stay small but odd (N=37, d_t=72, d_s=56, V=1000), so that
no dimension is a multiple of any block. With a GPU the same tests run the compiled kernels on CUDA tensors.

References: Fisher, the explicit quadratic form tau^2/2 * delta^T (diag(p*) - p* p*^T) delta with the Fisher
matrix built per row; KL, tau^2 * torch.nn.functional.kl_div on float64 log-softmaxes. Gradients by autograd in
float64 on the same rounded inputs.

Tolerances, relative norm error ||out - ref|| / ||ref|| (per-row loss or reduced loss; gradients):
  float32   1e-5, 1e-5   float32 accumulation (3xTF32 dots on a GPU unless torch allows TF32)
  float16   2e-3, 5e-3   dot operands (probabilities, coefficients, x - y) rounded to 11 bits; grads returned fp16
  bfloat16  1e-2, 2e-2   operands rounded to 8 bits on a GPU (upcast to fp32 in the interpreter); grads bf16
Seen in the interpreter: float32 ~3e-7; float16 ~3e-4 (x), ~1.5e-3 (W); bfloat16 ~1.7e-3 (the bf16 rounding of
the returned gradients).
Near convergence (|x - y| / |x| = rel) the Fisher kernel projects x - y formed in float32, so the tolerances
hold unchanged (seen in the interpreter at rel = 1e-3: loss ~1e-7, gradients as above). The KL's two logits come
from separate float32 projections, whose rounding (~1e-7 |z|) is large next to their difference: its loss gets
6e-6 / rel more, its gradients 6e-7 / rel more (seen at rel = 1e-3 in float32: loss 2.3e-3, gradients 2.3e-4).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from semalign_ds.kernels.fisher_quadratic import fused_fisher_quadratic  # noqa: E402
from semalign_ds.kernels.linear_kl import fused_linear_kl  # noqa: E402
from semalign_ds.losses import fisher_quadratic_loss, linear_kl_loss  # noqa: E402
from tests.references import fisher_reference, kl_reference, reduce  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1e-2, 2e-2)}
N, D, D_S, V = 37, 72, 56, 1000


# ---------------------------------------------------------------------------------------------------------------
# helpers

def seed_of(*parts):
    return zlib.crc32(repr(parts).encode())


def make_inputs(loss, seed, n=N, d=D, d_s=D_S, v=V):
    """Fresh float32 inputs on the CPU: logits of order one, the Fisher target near its input, a random mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) / d ** 0.5
    if loss == "fisher":
        other = [x + 0.5 * torch.randn(n, d, generator=g)]
    else:
        other = [torch.randn(n, d_s, generator=g), torch.randn(v, d_s, generator=g) / d_s ** 0.5]
    mask = torch.rand(n, generator=g) > 0.3
    return x, w, other, mask


def run_kernel(loss, x, w, other, tau, mask, reduction, **kw):
    if loss == "fisher":
        return fused_fisher_quadratic(x, other[0], w, tau, mask, reduction, **kw)
    return fused_linear_kl(x, w, other[0], other[1], tau, mask, reduction, **kw)


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values"
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def check(loss, x, w, other, mask, tau, reduction, dtype, train_weight=True, tol=None, upstream_scale=1.0, **kw):
    """Run the kernel on `dtype` copies of the inputs (on DEVICE) and compare loss and gradients with float64.
    upstream_scale multiplies grad_output, to lift tiny gradients out of float16's subnormal range."""
    xk = x.to(DEVICE, dtype).requires_grad_()
    wk = w.to(DEVICE, dtype).requires_grad_(train_weight)
    ok = [t.to(DEVICE, dtype) for t in other]
    # the reference sees the same rounded values
    xr = xk.detach().cpu().double().requires_grad_()
    wr = wk.detach().cpu().double().requires_grad_(train_weight)
    orr = [t.cpu().double() for t in ok]

    out = run_kernel(loss, xk, wk, ok, tau, mask.to(DEVICE), reduction, **kw)
    per_row = fisher_reference(xr, orr[0], wr, tau) if loss == "fisher" else kl_reference(xr, wr, *orr, tau)
    expect = reduce(per_row, mask, reduction)
    upstream = (torch.rand(expect.shape, generator=torch.Generator().manual_seed(1)) + 0.5) * upstream_scale
    (out * upstream.to(out.device)).sum().backward()
    (expect * upstream.double()).sum().backward()

    tol_loss, tol_grad = tol or TOL[dtype]
    assert out.dtype == torch.float32 and out.shape == expect.shape
    assert rel_err(out, expect) < tol_loss
    assert xk.grad.dtype == xk.dtype and rel_err(xk.grad, xr.grad) < tol_grad
    if reduction == "none":
        assert (out.cpu()[~mask] == 0).all()
    assert (xk.grad.cpu()[~mask] == 0).all()
    if train_weight:
        assert wk.grad.dtype == wk.dtype and rel_err(wk.grad, wr.grad) < tol_grad


# ---------------------------------------------------------------------------------------------------------------
# tests

@pytest.mark.parametrize("loss", ["fisher", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_reference(loss, dtype, tau):
    x, w, other, mask = make_inputs(loss, seed_of(loss, dtype, tau))
    check(loss, x, w, other, mask, tau, "mean", dtype)


@pytest.mark.parametrize("loss", ["fisher", "kl"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions(loss, reduction):
    # per-row upstream gradients for "none", with a trainable weight: the weight gradient is formed in backward
    x, w, other, mask = make_inputs(loss, seed_of(loss, reduction))
    check(loss, x, w, other, mask, 1.5, reduction, torch.float32)


@pytest.mark.parametrize("loss", ["fisher", "kl"])
@pytest.mark.parametrize("splits", [3, 16])
def test_vocabulary_slices_merge(loss, splits):
    # 16 slices of 1000 columns in blocks of 128 leaves some slices empty
    x, w, other, mask = make_inputs(loss, seed_of(loss, splits))
    check(loss, x, w, other, mask, 2.0, "none", torch.float32, num_splits=splits)


@pytest.mark.parametrize("loss", ["fisher", "kl"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_all_masked(loss, reduction):
    x, w, other, _ = make_inputs(loss, seed_of(loss, reduction, "masked"))
    x = x.to(DEVICE).requires_grad_()
    w = w.to(DEVICE).requires_grad_()
    other = [t.to(DEVICE) for t in other]
    out = run_kernel(loss, x, w, other, 2.0, torch.zeros(N, dtype=torch.bool, device=DEVICE), reduction)
    out.sum().backward()
    assert torch.isfinite(out).all() and (out == 0).all()
    assert (x.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("loss", ["fisher", "kl"])
def test_non_contiguous_inputs(loss):
    g = torch.Generator().manual_seed(seed_of(loss, "strided"))

    def rand(*shape, scale=1.0):  # made on the device, so that the views below stay strided there
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    x = rand(N, 2 * D)[:, ::2]                                     # strided columns
    w = rand(D, V, scale=D ** -0.5).T                              # column-major weight
    if loss == "fisher":
        other = [(x + rand(N, D, scale=0.5)).T.contiguous().T]
    else:
        other = [rand(2 * N, D_S)[::2], rand(D_S, V, scale=D_S ** -0.5).T]
    mask = (torch.rand(2 * N, generator=g) > 0.3)[::2]
    assert not x.is_contiguous() and not w.is_contiguous() and not mask.is_contiguous()
    assert all(not t.is_contiguous() for t in other)
    check(loss, x, w, other, mask, 1.0, "mean", torch.float32)


@pytest.mark.parametrize("loss", ["fisher", "kl"])
def test_tiny_shapes(loss):
    # one counted row, a vocabulary and widths smaller than one block
    x, w, other, mask = make_inputs(loss, seed_of(loss, "tiny"), n=3, d=20, d_s=24, v=50)
    mask = torch.tensor([False, True, False])
    check(loss, x, w, other, mask, 1.0, "sum", torch.float32)


def test_fisher_common_offset_half_precision():
    # delta with a large offset shared by the whole vocabulary (every W_v carries the same component c*u):
    # the true gradient is O(1) while sum p delta W is O(c * offset); the centred accumulator keeps fp16 exact
    g = torch.Generator().manual_seed(seed_of("offset"))
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    w = torch.randn(V, D, generator=g) / D ** 0.5 + 20.0 * u
    x = torch.randn(N, D, generator=g)
    y = x + 0.5 * torch.randn(N, D, generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    check("fisher", x, w, [y], mask, 1.0, "mean", torch.float16)


def test_kl_near_convergence_half_precision():
    # source almost equal to target: p_t - p_s is tiny, the gradient too; rounding p_t and p_s separately
    # before the accumulation would swamp it. The gradients are ~1e-6, subnormal in float16: a large grad_output
    # brings them back, so that the error measured is the kernel's, not the output dtype's.
    g = torch.Generator().manual_seed(seed_of("converged"))
    x = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5
    w_s = w + 1e-2 * torch.randn(V, D, generator=g) / D ** 0.5
    mask = torch.rand(N, generator=g) > 0.3
    check("kl", x, w, [x.clone(), w_s], mask, 1.0, "mean", torch.float16, upstream_scale=1e4)


@pytest.mark.parametrize("loss", ["fisher", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rel", [1e-2, 1e-3])
def test_near_convergence(loss, dtype, rel):
    # x and its target rel apart (for the KL: the same x, a head perturbed by rel), logits spanning ~10 nats:
    # rounding z and z* separately to the input dtype made the bf16 Fisher loss 18% off at rel = 1e-2
    g = torch.Generator().manual_seed(seed_of(loss, dtype, rel, "near"))
    x = torch.randn(N, D, generator=g)
    w = 3 * torch.randn(V, D, generator=g) / D ** 0.5
    u = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    y = x + rel * x.norm(dim=1, keepdim=True) * u
    other = [y] if loss == "fisher" else [y, w + rel * 3 * torch.randn(V, D, generator=g) / D ** 0.5]
    tol_loss, tol_grad = TOL[dtype]
    if loss == "kl":
        tol_loss, tol_grad = tol_loss + 6e-6 / rel, tol_grad + 6e-7 / rel
    check(loss, x, w, other, torch.ones(N, dtype=torch.bool), 1.0, "sum", dtype, tol=(tol_loss, tol_grad))


def test_float64_inputs_run_in_float32():
    x, w, other, mask = make_inputs("kl", seed_of("f64"))
    x = x.to(DEVICE, torch.float64).requires_grad_()
    args = [t.to(DEVICE, torch.float64) for t in (w, *other)]
    out = fused_linear_kl(x, args[0], args[1], args[2], 1.0, mask.to(DEVICE), "mean")
    out.backward()
    ref = kl_reference(x.detach().cpu(), w.double(), other[0].double(), other[1].double(), 1.0)
    assert out.dtype == torch.float32 and x.grad.dtype == torch.float64
    assert rel_err(out, reduce(ref, mask, "mean")) < 1e-5


@pytest.mark.parametrize("loss", ["fisher", "kl"])
def test_dispatch_from_losses(loss):
    """backend="triton" of the public functions reaches the kernels and agrees with the naive back end."""
    x, w, other, mask = make_inputs(loss, seed_of(loss, "dispatch"))
    x, w, other, mask = x.to(DEVICE), w.to(DEVICE), [t.to(DEVICE) for t in other], mask.to(DEVICE)
    fn = fisher_quadratic_loss if loss == "fisher" else linear_kl_loss
    args = (x, other[0], w) if loss == "fisher" else (x, w, *other)
    backends = ["triton", "naive"] + (["auto"] if DEVICE == "cuda" else [])
    outs = [fn(*args, temperature=2.0, mask=mask, reduction="none", backend=b) for b in backends]
    for out in outs[1:]:
        assert rel_err(outs[0], out) < 1e-4
