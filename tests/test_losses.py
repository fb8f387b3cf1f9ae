"""semalign_ds.losses, naive and chunked back ends, against exact float64 references written here.

References (independent of the implementation's formulas):
  Fisher: the explicit quadratic form tau^2/2 * delta^T (diag(p*) - p* p*^T) delta, the Fisher matrix built per row.
  KL: tau^2 * torch.nn.functional.kl_div on float64 log-softmaxes.
Gradients of the reference come from autograd in float64 on the same (rounded) inputs.

Tolerances, as the relative norm error ||out - ref|| / ||ref|| of the loss, the input gradient and the weight
gradient. The back ends upcast every operand and compute in float32 (float64 for float64 inputs), projecting
x - y for the Fisher loss, so half-precision inputs cost only the rounding of the returned gradients:
  float64: 1e-12   float32: 1e-5    float16: 1e-3    bfloat16: 5e-3 (gradients returned in 8 bits: ~2^-9)
(seen: float64 ~1e-15, float32 ~1e-6, float16 ~2e-4, bfloat16 ~1.7e-3, all on the gradients; losses ~1e-7)
Near convergence (|x - y| / |x| = rel) the Fisher loss keeps these tolerances. The KL's logits come from two
different projections (W_s x_s, W_t x_t), each float32: their difference carries ~1e-7 |z| of rounding, so its
loss is trusted to 3e-6 / rel and its gradient to the dtype's tolerance + 1e-6 / rel (seen at rel = 1e-3: loss
~6e-4, gradient ~1.7e-3 in bfloat16, ~3.8e-4 in float16).

Top-k Fisher (fisher_topk_support, fisher_topk_loss): at k = V both tail modes are the exact loss (float64: 1e-12
against the quadratic-form reference, gradients to x and W included). For k < V the loss is checked against its
stated bounds on logits spanning ~30 nats: renormalize 0 <= exact - topk <= tau^2/2 * t * spread(delta)^2,
bucket |exact - topk| <= tau^2/2 * 3 t * max|delta|^2, with t the exact tail mass. The support (ids, z*, tail)
against torch.topk and a float64 full softmax.
"""
import zlib

import pytest
import torch

from semalign_ds.losses import fisher_quadratic_loss, fisher_topk_loss, fisher_topk_support, linear_kl_loss
from tests.references import fisher_reference, kl_reference, reduce

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}
N, D, D_S, V = 37, 72, 56, 1000  # odd sizes: nothing is a multiple of a block or chunk


# ---------------------------------------------------------------------------------------------------------------
# helpers

def make_inputs(loss, dtype, seed, train_weight=False):
    """Fresh random inputs (logits of order one, target near the input) and the float64 leaves of the reference."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5
    if loss == "fisher":
        other = (x + 0.5 * torch.randn(N, D, generator=g),)
    else:
        other = (torch.randn(N, D_S, generator=g), torch.randn(V, D_S, generator=g) / D_S ** 0.5)
    mask = torch.rand(N, generator=g) > 0.3
    x, w = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(train_weight)
    other = tuple(t.to(dtype) for t in other)
    ref = (x.detach().double().requires_grad_(), w.detach().double().requires_grad_(train_weight),
           *(t.double() for t in other))
    return x, w, other, mask, ref


def run(loss, backend, x, w, other, tau, mask, reduction, **kw):
    if loss == "fisher":
        return fisher_quadratic_loss(x, other[0], w, tau, mask, reduction, backend=backend, **kw)
    return linear_kl_loss(x, w, other[0], other[1], tau, mask, reduction, backend=backend, **kw)


def run_reference(loss, ref, tau, mask, reduction):
    x, w, *other = ref
    per_row = fisher_reference(x, other[0], w, tau) if loss == "fisher" else kl_reference(x, w, *other, tau)
    return reduce(per_row, mask, reduction)


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values"
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def check(loss, backend, dtype, tau, reduction, seed, train_weight, **kw):
    x, w, other, mask, ref = make_inputs(loss, dtype, seed, train_weight)
    out = run(loss, backend, x, w, other, tau, mask, reduction, **kw)
    expect = run_reference(loss, ref, tau, mask, reduction)
    upstream = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed + 1)) + 0.5
    (out * upstream.to(out.dtype)).sum().backward()
    (expect * upstream.double()).sum().backward()
    tol = TOL[dtype]
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(out, expect) < tol
    assert x.grad.dtype == dtype and rel_err(x.grad, ref[0].grad) < tol
    if reduction == "none":
        assert (out[~mask] == 0).all() and (x.grad[~mask] == 0).all()
    if train_weight:
        assert w.grad.dtype == dtype and rel_err(w.grad, ref[1].grad) < tol


# ---------------------------------------------------------------------------------------------------------------
# tests

@pytest.mark.parametrize("loss", ["fisher", "kl"])
@pytest.mark.parametrize("backend", ["naive", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_matches_reference_with_trainable_weight(loss, backend, dtype, tau):
    seed = zlib.crc32(f"{loss}{backend}{dtype}{tau}".encode())
    check(loss, backend, dtype, tau, "mean", seed, train_weight=True, chunk_size=5 if backend == "chunked" else None)


def near_convergence(loss, dtype, rel, seed):
    """x and the target side rel apart: y = x + rel * |x| * u (u a random unit vector per row) for the Fisher
    loss; for the KL the same x and a head perturbed by rel. Logits span ~10 nats (a weight of scale 3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = 3 * torch.randn(V, D, generator=g) / D ** 0.5
    u = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    y = x + rel * x.norm(dim=1, keepdim=True) * u
    other = (y,) if loss == "fisher" else (y, w + rel * 3 * torch.randn(V, D, generator=g) / D ** 0.5)
    return [t.to(dtype) for t in (x, w, *other)]


@pytest.mark.parametrize("loss", ["fisher", "kl"])
@pytest.mark.parametrize("backend", ["naive", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rel", [1e-2, 1e-3])
def test_half_precision_near_convergence(loss, backend, dtype, rel, monkeypatch):
    """Rounding z and z* to the input dtype before subtracting made the bf16 Fisher loss 18% off at rel = 1e-2
    (its gradient 53%): every back end must project x - y and form logits in float32. A small upcast block
    (97 vocabulary rows) makes the chunked back end walk several blocks of the half-precision head."""
    import semalign_ds.losses as losses
    monkeypatch.setattr(losses, "_W_BLOCK_ELEMENTS", 97 * D)
    x, w, *other = near_convergence(loss, dtype, rel, zlib.crc32(f"{loss}{backend}{dtype}{rel}".encode()))
    x.requires_grad_()
    w.requires_grad_()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    mask = torch.ones(N, dtype=torch.bool)
    out = run(loss, backend, x, w, other, 1.0, mask, "sum", **({"chunk_size": 5} if backend == "chunked" else {}))
    expect = run_reference(loss, (xr, wr, *(t.double() for t in other)), 1.0, mask, "sum")
    out.backward()
    expect.backward()
    # the KL's two logits come from separate float32 projections: their difference carries float32 rounding, a
    # floor of 2.3e-3 (1 thread) to 3.3e-3 (2 threads) of the loss at rel = 1e-3, whatever the input dtype
    tol_loss = TOL[dtype] if loss == "fisher" else 6e-6 / rel
    tol_grad = TOL[dtype] + (0 if loss == "fisher" else 1e-6 / rel)
    assert rel_err(out, expect) < tol_loss
    assert rel_err(x.grad, xr.grad) < tol_grad
    assert rel_err(w.grad, wr.grad) < tol_grad


@pytest.mark.parametrize("loss", ["fisher", "kl"])
@pytest.mark.parametrize("backend", ["naive", "chunked"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions(loss, backend, reduction):
    # a trainable weight with reduction="none" is refused by the chunked back end (tested below)
    check(loss, backend, torch.float32, 2.0, reduction, seed=7, train_weight=(reduction != "none"),
          chunk_size=8 if backend == "chunked" else None)


@pytest.mark.parametrize("loss", ["fisher", "kl"])
def test_chunk_size_does_not_change_results(loss):
    x, w, other, mask, _ = make_inputs(loss, torch.float64, seed=11)
    base = run(loss, "naive", x, w, other, 1.5, mask, "none")
    for chunk in (1, 7, 36, 1000):
        out = run(loss, "chunked", x, w, other, 1.5, mask, "none", chunk_size=chunk)
        assert rel_err(out, base) < 1e-12


@pytest.mark.parametrize("loss", ["fisher", "kl"])
@pytest.mark.parametrize("backend", ["naive", "chunked"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_all_masked_gives_zero_and_zero_gradients(loss, backend, reduction):
    x, w, other, _, _ = make_inputs(loss, torch.float32, seed=3, train_weight=(reduction != "none"))
    mask = torch.zeros(N, dtype=torch.bool)
    out = run(loss, backend, x, w, other, 2.0, mask, reduction)
    out.sum().backward()
    assert torch.isfinite(out).all() and (out == 0).all()
    assert x.grad is not None and (x.grad == 0).all()
    if w.requires_grad:
        assert (w.grad == 0).all()


def test_chunked_refuses_per_row_loss_with_trainable_weight():
    x, w, other, mask, _ = make_inputs("fisher", torch.float32, seed=5, train_weight=True)
    out = run("fisher", "chunked", x, w, other, 1.0, mask, "none")
    with pytest.raises(RuntimeError, match="reduction='none'"):
        out.sum().backward()


def test_auto_is_chunked_on_cpu():
    x, w, other, mask, _ = make_inputs("kl", torch.float32, seed=9)
    a = run("kl", "auto", x, w, other, 1.0, mask, "none")
    b = run("kl", "chunked", x, w, other, 1.0, mask, "none")
    assert torch.equal(a, b)


def test_errors():
    x, w, (y,), mask, _ = make_inputs("fisher", torch.float32, seed=1)
    with pytest.raises(ValueError, match="reduction"):
        fisher_quadratic_loss(x, y, w, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        fisher_quadratic_loss(x, y, w, backend="cuda")
    with pytest.raises(ValueError, match="temperature"):
        fisher_quadratic_loss(x, y, w, temperature=0.0)
    with pytest.raises(ValueError, match="2-D"):
        fisher_quadratic_loss(x[None], y[None], w)
    with pytest.raises(ValueError, match="width"):
        fisher_quadratic_loss(x[:, :-1], y, w)
    with pytest.raises(ValueError, match="rows"):
        fisher_quadratic_loss(x, y[:-1], w)
    with pytest.raises(ValueError, match="mask"):
        fisher_quadratic_loss(x, y, w, mask=mask[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        fisher_quadratic_loss(x, y, w, backend="chunked", chunk_size=0)
    x_t, w_t, (x_s, w_s), _, _ = make_inputs("kl", torch.float32, seed=2)
    with pytest.raises(ValueError, match="vocabularies"):
        linear_kl_loss(x_t, w_t, x_s, w_s[:-1])
    with pytest.raises(ValueError, match="width of the target side"):
        linear_kl_loss(x_t, w_t, x_s[:, :-1], w_s)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, (y,), mask, _ = make_inputs("fisher", torch.float32, seed=1)
    with pytest.raises(ValueError, match="CUDA"):
        fisher_quadratic_loss(x, y, w, backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# top-k Fisher

def topk_inputs(seed, n=23, d=40, v=1201, span=None, rel=0.3, dtype=torch.float64):
    """x, y, w; with span, w is scaled so that each row's logits z* = W y span about `span` nats on average."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x + rel * x.norm(dim=1, keepdim=True) * torch.nn.functional.normalize(
        torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5
    if span is not None:
        z = y @ w.T
        w = w * (span / (z.max(1).values - z.min(1).values).mean())
    return x.to(dtype), y.to(dtype), w.to(dtype)


@pytest.mark.parametrize("tail_mode", ["renormalize", "bucket"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_topk_is_exact_when_k_is_vocabulary(tail_mode, tau, reduction):
    x, y, w = topk_inputs(zlib.crc32(f"{tail_mode}{tau}{reduction}".encode()))
    mask = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(4)) > 0.3
    train_w = reduction != "none"  # the chunked loop refuses a per-row loss with a trainable weight
    ids, zstar, tail = fisher_topk_support(y, w, w.shape[0], tau, chunk_size=5)
    assert ids.dtype == torch.int32 and zstar.dtype == tail.dtype == torch.float64
    assert (tail.abs() < 1e-15).all()
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_(train_w)
    out = fisher_topk_loss(xa, wa, ids, zstar, tail, tau, tail_mode, mask, reduction, chunk_size=4)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_(train_w)
    expect = reduce(fisher_reference(xr, y, wr, tau), mask, reduction)
    upstream = torch.rand(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    (out * upstream).sum().backward()
    (expect * upstream).sum().backward()
    assert rel_err(out, expect) < 1e-12
    assert rel_err(xa.grad, xr.grad) < 1e-12
    if train_w:
        assert rel_err(wa.grad, wr.grad) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_support_matches_full_softmax(dtype, tau):
    x, y, w = topk_inputs(zlib.crc32(f"support{dtype}{tau}".encode()), span=30.0, dtype=dtype)
    k = 37
    ids, zstar, tail = fisher_topk_support(y, w, k, tau, chunk_size=6)
    z = y.double() @ w.double().T                                       # the same rounded inputs, float64
    top = z.topk(k, dim=1)
    p = torch.softmax(z / tau, dim=1)
    expect_tail = 1 - p.gather(1, top.indices).sum(1)
    assert ids.shape == zstar.shape == (x.shape[0], k) and tail.shape == (x.shape[0],)
    assert zstar.dtype == tail.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # a tie within float32 rounding could swap two ids: compare the values the ids pick, and the set of ids
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(z.gather(1, ids.long()), top.values) < tol
    assert rel_err(zstar, top.values) < tol
    assert rel_err(tail, expect_tail) < (1e-10 if dtype == torch.float64 else 1e-4)
    assert (tail > 0).all() and (tail < 1).all()


def test_topk_support_keeps_a_tiny_tail():
    # the tail is summed over the complement, not taken as 1 - sum over S: a 1e-12 tail survives float32
    x, y, w = topk_inputs(21, span=60.0, dtype=torch.float32)
    ids, zstar, tail = fisher_topk_support(y, w, 400, 1.0)
    z = y.double() @ w.double().T
    lse = torch.logsumexp(z, 1)
    rest = z.scatter(1, ids.long(), float("-inf"))
    expect = (torch.logsumexp(rest, 1) - lse).exp()
    assert expect.max() < 1e-6
    assert rel_err(tail, expect) < 1e-4


@pytest.mark.parametrize("k", [16, 64, 256])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_error_within_its_bound(k, tau):
    """Real-looking logits (each row's z* spans ~30 nats): the top-k loss per row against the exact float64 loss
    and the bounds of fisher_topk_loss's docstring (seen, mean relative error at tau = 1 for k = 16, 64, 256:
    renormalize 22%, 6.2%, 0.69%; bucket 16%, 4.1%, 0.45%; mean tail 12%, 3.3%, 0.31%)."""
    x, y, w = topk_inputs(zlib.crc32(f"bound{k}{tau}".encode()), n=31, d=48, v=2003, span=30.0, rel=0.1)
    exact = fisher_reference(x, y, w, tau).detach()
    delta = (x - y) @ w.T / tau
    spread = delta.max(1).values - delta.min(1).values
    ids, zstar, tail = fisher_topk_support(y, w, k, tau)
    assert (tail > 0).all()
    renorm = fisher_topk_loss(x, w, ids, zstar, tail, tau, "renormalize", reduction="none")
    bucket = fisher_topk_loss(x, w, ids, zstar, tail, tau, "bucket", reduction="none")
    err = exact - renorm
    assert (err >= -1e-12 * exact).all()
    assert (err <= tau * tau / 2 * tail * spread ** 2 * (1 + 1e-9)).all()
    assert ((exact - bucket).abs() <= tau * tau / 2 * 3 * tail * delta.abs().max(1).values ** 2 * (1 + 1e-9)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rel", [1e-2, 1e-3])
def test_topk_half_precision_near_convergence(dtype, rel):
    """Half-precision x and head, z* stored in float32 as the cache does: the loss subtracts z* from W x in
    float32, so near convergence z*'s float32 rounding (~1e-7 |z|) is what limits it: 3e-6 / rel on the loss,
    the dtype's gradient tolerance + 1e-6 / rel on the gradients (seen at rel = 1e-3: ~2e-4 on the loss)."""
    x, y, w = topk_inputs(zlib.crc32(f"half{dtype}{rel}".encode()), n=N, d=D, v=V, span=10.0, rel=rel, dtype=dtype)
    ids, zstar, tail = fisher_topk_support(y, w, V, 1.0)
    assert zstar.dtype == torch.float32
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fisher_topk_loss(xa, wa, ids, zstar, tail, 1.0, reduction="sum")
    out.backward()
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    expect = fisher_reference(xr, y.double(), wr, 1.0).sum()
    expect.backward()
    assert out.dtype == torch.float32 and xa.grad.dtype == wa.grad.dtype == dtype
    assert rel_err(out, expect) < 3e-6 / rel
    assert rel_err(xa.grad, xr.grad) < TOL[dtype] + 1e-6 / rel
    assert rel_err(wa.grad, wr.grad) < TOL[dtype] + 1e-6 / rel


def test_topk_chunking_does_not_change_results():
    x, y, w = topk_inputs(13, span=30.0)
    ids, zstar, tail = fisher_topk_support(y, w, 50, 1.5, chunk_size=4)
    ids2, zstar2, tail2 = fisher_topk_support(y, w, 50, 1.5)
    assert torch.equal(ids, ids2) and rel_err(zstar, zstar2) < 1e-13 and rel_err(tail, tail2) < 1e-13
    base = fisher_topk_loss(x, w, ids, zstar, tail, 1.5, reduction="none")
    for chunk in (1, 7, 23):
        out = fisher_topk_loss(x, w, ids, zstar, tail, 1.5, reduction="none", chunk_size=chunk)
        assert rel_err(out, base) < 1e-13


def test_topk_errors():
    x, y, w = topk_inputs(17, dtype=torch.float32)
    ids, zstar, tail = fisher_topk_support(y, w, 8)
    with pytest.raises(ValueError, match="k=0"):
        fisher_topk_support(y, w, 0)
    with pytest.raises(ValueError, match="k=1202"):
        fisher_topk_support(y, w, w.shape[0] + 1)
    with pytest.raises(ValueError, match="width of y"):
        fisher_topk_support(y[:, :-1], w, 8)
    with pytest.raises(ValueError, match="temperature"):
        fisher_topk_support(y, w, 8, temperature=-1.0)
    with pytest.raises(ValueError, match="integer"):
        fisher_topk_loss(x, w, ids.float(), zstar, tail)
    with pytest.raises(ValueError, match="out of range"):
        fisher_topk_loss(x, w[:100], ids, zstar, tail)
    with pytest.raises(ValueError, match="tail masses"):
        fisher_topk_loss(x, w, ids, zstar, tail + 2)
    with pytest.raises(ValueError, match=r"ids and zstar \[N, k\]"):
        fisher_topk_loss(x, w, ids, zstar[:, :-1], tail)
    with pytest.raises(ValueError, match=r"ids and zstar \[N, k\]"):
        fisher_topk_loss(x[:-1], w, ids, zstar, tail)
    with pytest.raises(ValueError, match="tail_mode"):
        fisher_topk_loss(x, w, ids, zstar, tail, tail_mode="drop")
    with pytest.raises(ValueError, match="reduction"):
        fisher_topk_loss(x, w, ids, zstar, tail, reduction="avg")
    with pytest.raises(ValueError, match="2-D"):
        fisher_topk_loss(x, w, ids[None], zstar, tail)
