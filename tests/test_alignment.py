"""Semantic bases and the alignment map, against the explicit V-sized decomposition in float64."""
import pytest
import torch

from semalign_ds import alignment


def test_map_equals_decompose_then_recompose():
    """a = M u is exactly: coefficients c_i = <s_s,i, u> on the unit source basis, recomposed on the target basis."""
    gen = torch.Generator().manual_seed(0)
    V, d_s, d_t = 301, 23, 17
    w_s = torch.randn(V, d_s, generator=gen, dtype=torch.float64)
    w_t = torch.randn(V, d_t, generator=gen, dtype=torch.float64)
    u = torch.randn(13, d_s, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    s_s = torch.linalg.pinv(w_s)
    s_s = s_s / s_s.norm(dim=0)
    s_t = torch.linalg.pinv(w_t)
    s_t = s_t / s_t.norm(dim=0)
    coeffs = u @ s_s  # [13, V]: cosine of u with each unit source basis vector
    explicit = coeffs @ s_t.T  # recomposed on the target basis
    m = alignment.alignment_map(w_t, w_s)
    torch.testing.assert_close(alignment.align(m.double(), u), explicit, rtol=2e-6, atol=2e-6)  # M is float32
    basis = alignment.semantic_basis(w_s)
    torch.testing.assert_close(basis.norm(dim=0), torch.ones(V, dtype=torch.float64))
    torch.testing.assert_close(w_s.T @ torch.linalg.pinv(w_s).T, torch.eye(d_s, dtype=torch.float64))


def test_zero_head_rows_have_no_direction():
    """A zero row (a padding embedding) gives a zero basis column, not normalised rounding noise."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(53, 7, generator=gen, dtype=torch.float64)
    w[[0, 9]] = 0
    basis = alignment.semantic_basis(w)
    assert torch.equal(basis[:, [0, 9]], torch.zeros(7, 2, dtype=torch.float64))
    rest = [i for i in range(53) if i not in (0, 9)]
    torch.testing.assert_close(basis[:, rest].norm(dim=0), torch.ones(51, dtype=torch.float64))
    full = torch.linalg.pinv(w)
    torch.testing.assert_close(basis[:, rest], full[:, rest] / full[:, rest].norm(dim=0))


@pytest.fixture(scope="module")
def smollm():
    from semalign_ds import models
    model = models.load_model("embedded:smollm2-135m-instruct")
    return models.Adapter(model)


def test_basis_property_on_real_states(smollm):
    """cos(u, S_s S_s^T u) is high for real model states and near zero through a random target basis."""
    ids = torch.tensor([[1, 504, 1530, 17, 28, 1104, 1037, 285, 443, 216, 2354, 30, 216, 4413, 3587, 43]])
    with torch.no_grad():
        states = smollm.hidden_states(ids, torch.ones_like(ids))
    w = smollm.head.weight.double()
    s = alignment.semantic_basis(w)
    gen = torch.Generator().manual_seed(0)
    random_basis = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    random_basis = random_basis / random_basis.norm(dim=0)
    for l in (10, 20, 30):
        u = alignment.source_direction(states[l][0], smollm.norm).double()
        own = torch.cosine_similarity(u, u @ s @ s.T, dim=-1)
        rand = torch.cosine_similarity(u, u @ s @ random_basis.T, dim=-1)
        assert own.min() > 0.5, (l, own)
        assert rand.abs().max() < 0.2, (l, rand)


def test_the_map_across_widths_on_real_weights(smollm):
    """A target cut by width keeps channels C of the source's latent space and its head W_s[:, C] (docs/method.md
    section 7), so the source state's own coordinates u[C] are where M u should land: cos(M u, u[C]) is high at
    every layer with the semantic bases of the two real heads (576 -> 384), and near zero through a random target
    head (its basis). Measured: 0.68-0.74 at the worst position against at most 0.074."""
    ids = torch.tensor([[1, 504, 1530, 17, 28, 1104, 1037, 285, 443, 216, 2354, 30, 216, 4413, 3587, 43]])
    with torch.no_grad():
        states = smollm.hidden_states(ids, torch.ones_like(ids))
    w = smollm.head.weight.detach().double()
    gen = torch.Generator().manual_seed(0)
    kept = torch.randperm(w.shape[1], generator=gen)[:384].sort().values
    m = alignment.alignment_map(w[:, kept], w).double()
    assert m.shape == (384, 576)
    m_random = alignment.alignment_map(torch.randn(w.shape[0], 384, generator=gen, dtype=torch.float64), w).double()
    for l in (10, 20, 30):
        u = alignment.source_direction(states[l][0], smollm.norm).double()
        own = torch.cosine_similarity(alignment.align(m, u), u[:, kept], dim=-1)
        rand = torch.cosine_similarity(alignment.align(m_random, u), u[:, kept], dim=-1)
        assert own.min() > 0.5, (l, own)
        assert rand.abs().max() < 0.2, (l, rand)


def test_least_squares_map_reproduces_a_shared_head_and_differs_from_the_semantic_map():
    """M = pinv(W_t) W_s: for a pair sharing its head (W_t = W_s, different hidden bases are impossible then, so
    take W_t = W_s R for an invertible R: the same logits through another basis) W_t M u == W_s u exactly."""
    gen = torch.Generator().manual_seed(3)
    V, d = 211, 19
    w_s = torch.randn(V, d, generator=gen, dtype=torch.float64)
    r = torch.randn(d, d, generator=gen, dtype=torch.float64) + 3 * torch.eye(d, dtype=torch.float64)
    w_t = w_s @ r
    u = torch.randn(11, d, generator=gen, dtype=torch.float64)
    m = alignment.alignment_map(w_t, w_s, kind="least_squares").double()  # float32 M: tolerance 1e-4 relative
    got, want = alignment.align(m, u) @ w_t.T, u @ w_s.T
    assert (got - want).norm() / want.norm() < 1e-5
    torch.testing.assert_close(m, torch.linalg.solve(r, torch.eye(d, dtype=torch.float64)), rtol=1e-5, atol=1e-5)
    semantic = alignment.alignment_map(w_t, w_s).double()
    assert (alignment.align(semantic, u) @ w_t.T - want).norm() / want.norm() > 1e-2
    with pytest.raises(ValueError, match="unknown alignment map"):
        alignment.alignment_map(w_t, w_s, kind="ridge")


# --- the blocked Gram-matrix path of alignment_map against the pinv formulas it replaced -------------------------
# Reference: the formulas alignment_map used before (float64 pseudo-inverses of the V x d heads), kept here verbatim
# so that the blocked path is checked against them and not against itself.

def _ref_basis(weight, dtype=torch.float64, rtol=None):
    basis = torch.linalg.pinv(weight.to(dtype)) if rtol is None else torch.linalg.pinv(weight.to(dtype), rtol=rtol)
    norms = basis.norm(dim=0, keepdim=True)
    empty = norms <= norms.max() * 1e-6
    return torch.where(empty, torch.zeros((), dtype=dtype), basis / norms.clamp(min=torch.finfo(dtype).tiny))


def _ref_map(weight_t, weight_s, kind="semantic", dtype=torch.float64, rtol=None):
    if kind == "least_squares":
        pinv = torch.linalg.pinv(weight_t.to(dtype)) if rtol is None else torch.linalg.pinv(weight_t.to(dtype),
                                                                                               rtol=rtol)
        return pinv @ weight_s.to(dtype)
    return _ref_basis(weight_t, dtype, rtol) @ _ref_basis(weight_s, dtype, rtol).T


V, D_T, D_S = 1031, 37, 53  # odd sizes; blocks of 100 leave a last block of 31
F64_RTOL = 1e-10  # relative Frobenius error of the float64 stages (the inputs are well conditioned)
F32_OUT_RTOL = 1e-6  # alignment_map returns float32: its rounding (6e-8) summed over an output
F32_RTOL = 2e-5  # basis dtype float32: eps32 = 1.2e-7 times the condition number and the V-long sums


def _heads(seed, zero_t=(0, 17, 1030), zero_s=(17, 500)):
    gen = torch.Generator().manual_seed(seed)
    w_t = torch.randn(V, D_T, generator=gen, dtype=torch.float64)
    w_s = torch.randn(V, D_S, generator=gen, dtype=torch.float64) * 0.05 + 0.01  # another scale and an offset
    w_t[list(zero_t)] = 0  # padding rows: zero basis columns (17 in both heads)
    w_s[list(zero_s)] = 0
    return w_t, w_s


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def _map_by_ranks(w_t, w_s, kind, world, block, dtype=torch.float64):
    """M from the stage functions, each rank's partial sums added by hand between the passes (what the all-reduce
    does), in `dtype` throughout (no float32 output rounding)."""
    rows = [alignment.share(V, block, r, world) for r in range(world)]
    p_t = alignment.gram_pinv(sum(alignment.gram(w_t, rs, block) for rs in rows), V, dtype)
    if kind == "least_squares":
        return p_t @ sum(alignment.cross(w_t, w_s, rs, block, None, dtype) for rs in rows)
    p_s = alignment.gram_pinv(sum(alignment.gram(w_s, rs, block) for rs in rows), V, dtype)
    n_t = [alignment.norms(w_t, p_t, rs, block, dtype) for rs in rows]
    n_s = [alignment.norms(w_s, p_s, rs, block, dtype) for rs in rows]
    max_t = max(n.max() for n in n_t if len(n))
    max_s = max(n.max() for n in n_s if len(n))
    c = sum(alignment.cross(w_t, w_s, rs, block, alignment.unit_scale(a, b, max_t, max_s), dtype)
            for rs, a, b in zip(rows, n_t, n_s))
    return p_t @ c @ p_s


@pytest.mark.parametrize("kind", ["semantic", "least_squares"])
def test_blocked_map_equals_the_pinv_formulas(kind):
    """Blocks that do not divide V, zero head rows in both heads: the float64 stages match pinv to 1e-10, the
    float32 M of alignment_map to its own rounding, with the default block and with a small one."""
    w_t, w_s = _heads(11)
    want = _ref_map(w_t, w_s, kind)
    assert _rel(_map_by_ranks(w_t, w_s, kind, 1, 100), want) < F64_RTOL
    for block in (None, 100, 1):
        m = alignment.alignment_map(w_t, w_s, kind=kind, block=block)
        assert m.dtype == torch.float32 and m.shape == (D_T, D_S)
        assert _rel(m, want) < F32_OUT_RTOL, block
    if kind == "semantic":  # the zero-row rule: token 17 (zero in both) and 0 (zero in the target) add nothing
        s_t, s_s = _ref_basis(w_t), _ref_basis(w_s)
        assert not s_t[:, [0, 17]].any() and not s_s[:, [17, 500]].any()
        assert _rel(_map_by_ranks(w_t, w_s, kind, 1, 100), s_t[:, 1:] @ s_s[:, 1:].T) < F64_RTOL


@pytest.mark.parametrize("kind", ["semantic", "least_squares"])
def test_rank_deficient_heads_match_pinv(kind):
    """A target head with a duplicated and a zero column, and a source head of rank 40 < 53 (a product of thinner
    matrices): the null directions are at rounding level and are dropped as pinv drops them."""
    gen = torch.Generator().manual_seed(12)
    w_t, _ = _heads(13)
    w_t[:, 5] = w_t[:, 30]
    w_t[:, 8] = 0
    w_s = (torch.randn(V, 40, generator=gen, dtype=torch.float64)
           @ torch.randn(40, D_S, generator=gen, dtype=torch.float64))
    w_s[[3, 700]] = 0
    assert torch.linalg.matrix_rank(w_t) == D_T - 2 and torch.linalg.matrix_rank(w_s) == 40
    want = _ref_map(w_t, w_s, kind)
    assert _rel(_map_by_ranks(w_t, w_s, kind, 1, 100), want) < F64_RTOL
    assert _rel(alignment.alignment_map(w_t, w_s, kind=kind, block=97), want) < F32_OUT_RTOL
    # the test can fail: inverting G's rounding-level eigenvalues instead of dropping them is far off
    g = w_t.T @ w_t
    lam, q = torch.linalg.eigh(g)
    assert _rel((q / lam) @ q.T @ (w_t.T @ w_s), _ref_map(w_t, w_s, "least_squares")) > 0.1


def test_ill_conditioned_float64_head_drops_what_the_gram_matrix_cannot_resolve():
    """The documented limit: a float64 head with a singular value of 1e-8 sigma_max (kept by pinv, whose cutoff is
    max(V, d) eps = 2.3e-13; below sqrt(max(V, d) eps) = 4.8e-7, the float64 Gram matrix's rounding) gives pinv's
    result with that direction dropped."""
    gen = torch.Generator().manual_seed(14)
    u, _ = torch.linalg.qr(torch.randn(V, D_T, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(D_T, D_T, generator=gen, dtype=torch.float64))
    sigma = torch.linspace(1, 2, D_T, dtype=torch.float64)
    sigma[0] = 1e-8
    w_t = u * sigma @ v.T
    w_s = _heads(15)[1]
    for kind in ("semantic", "least_squares"):
        dropped = _ref_map(w_t, w_s, kind, rtol=1e-7)
        assert _rel(_map_by_ranks(w_t, w_s, kind, 1, 100), dropped) < 1e-8
        assert _rel(dropped, _ref_map(w_t, w_s, kind)) > 1e-3  # pinv proper keeps it: different maps


@pytest.mark.parametrize("kind", ["semantic", "least_squares"])
def test_ranks_summed_by_hand_equal_one_rank(kind):
    """2, 3 and 4 ranks (block 400: 3 blocks, so one of 4 ranks has none), partials added by hand: the one-rank
    map to float64 rounding."""
    w_t, w_s = _heads(16)
    one = _map_by_ranks(w_t, w_s, kind, 1, 100)
    for world, block in ((2, 100), (3, 100), (3, 400), (4, 400)):
        assert _rel(_map_by_ranks(w_t, w_s, kind, world, block), one) < 1e-12, (world, block)
    assert [alignment.share(V, 400, r, 4) for r in range(4)] == [(0, 0), (0, 400), (400, 800), (800, 1031)]
    assert [alignment.share(V, 100, r, 3) for r in range(3)] == [(0, 300), (300, 700), (700, 1031)]


class _ThreadAllReduce:
    """An in-place all-reduce sum between threads that stand for ranks (every thread adds the slots in rank order,
    so all get the same bits, as from a real all-reduce)."""

    def __init__(self, world):
        import threading
        self.barrier, self.slots = threading.Barrier(world, timeout=60), [None] * world

    def rank(self, r):
        def reduce_sum(t):
            self.slots[r] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()  # nobody overwrites a slot before every rank has summed
            return t.copy_(total)
        return reduce_sum


@pytest.mark.parametrize("kind", ["semantic", "least_squares"])
def test_alignment_map_over_threads_as_ranks(kind):
    """alignment_map itself on 3 'ranks' (threads, a sum all-reduce between them): every rank returns the
    one-rank M. The last rank's rows (700..1030) are scaled by 1e-4 and row 900 by 1e-8: row 900 is empty against
    the longest column of the whole vocabulary, not against the longest of that rank's share."""
    from concurrent.futures import ThreadPoolExecutor
    w_t, w_s = _heads(17)
    w_t[700:] *= 1e-4
    w_t[900] *= 1e-4
    assert not _ref_basis(w_t)[:, 900].any() and _ref_basis(w_t[700:])[:, 200].any()
    one = alignment.alignment_map(w_t, w_s, kind=kind, block=100)
    reduce = _ThreadAllReduce(3)
    with ThreadPoolExecutor(3) as pool:
        maps = list(pool.map(lambda r: alignment.alignment_map(w_t, w_s, kind=kind, block=100, rank=r, world=3,
                                                               reduce_sum=reduce.rank(r)), range(3)))
    for m in maps:
        torch.testing.assert_close(m, one, rtol=1e-6, atol=1e-6 * one.abs().max().item())
    assert _rel(one, _ref_map(w_t, w_s, kind)) < F32_OUT_RTOL


@pytest.mark.parametrize("kind", ["semantic", "least_squares"])
def test_float32_basis_dtype(kind):
    """basis_dtype float32 (heads handed in as float32, like a model's): within 2e-5 of the float64 pinv map."""
    w_t, w_s = _heads(18)
    m = alignment.alignment_map(w_t.float(), w_s.float(), torch.float32, kind, block=100)
    assert _rel(m, _ref_map(w_t, w_s, kind)) < F32_RTOL


def test_bfloat16_heads_are_converted_block_by_block():
    """A head in the model's bfloat16 gives the float64 map of its bfloat16 values."""
    w_t, w_s = _heads(19)
    w_t, w_s = w_t.bfloat16(), w_s.bfloat16()
    m = alignment.alignment_map(w_t, w_s, block=100)
    assert _rel(m, _ref_map(w_t.double(), w_s.double())) < F32_OUT_RTOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_the_gpu():
    w_t, w_s = _heads(20)
    for kind in ("semantic", "least_squares"):
        m = alignment.alignment_map(w_t, w_s, kind=kind, block=100, device="cuda")
        assert m.device.type == "cpu"  # returned where the heads are
        assert _rel(m, _ref_map(w_t, w_s, kind)) < F32_OUT_RTOL
        m = alignment.alignment_map(w_t.cuda(), w_s.cuda(), kind=kind)
        assert m.device.type == "cuda" and _rel(m.cpu(), _ref_map(w_t, w_s, kind)) < F32_OUT_RTOL


def test_clear_errors():
    w_t, w_s = _heads(21)
    with pytest.raises(ValueError, match="vocabularies differ"):
        alignment.alignment_map(w_t[:-1], w_s)
    with pytest.raises(ValueError, match="needs reduce_sum"):
        alignment.alignment_map(w_t, w_s, rank=0, world=2)
    with pytest.raises(ValueError, match="rank 2 of a world of 2"):
        alignment.alignment_map(w_t, w_s, rank=2, world=2, reduce_sum=lambda t: t)
    with pytest.raises(ValueError, match="positive number of vocabulary rows"):
        alignment.alignment_map(w_t, w_s, block=0)
    w_t[4, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        alignment.alignment_map(w_t, w_s)


def test_alignment_cost():
    """The documented formulas, by hand, for one shape; least squares does less; more ranks' worth of blocks do
    not change the d^3 part."""
    cost = alignment.alignment_cost(1031, 37, 53, 8, 100)
    flops = 4 * 1031 * (37 ** 2 + 53 ** 2) + 2 * 1031 * 37 * 53 + 11 * (37 ** 3 + 53 ** 3) + 2 * 37 * 53 * 90
    assert cost == {"flops": float(flops),
                    "peak_bytes": 8 * (6 * 53 ** 2 + 100 * 53) + 8 * (37 ** 2 + 53 ** 2 + 3 * 37 * 53 + 3 * 1031
                                                                      + 3 * 100 * 53)}
    ls = alignment.alignment_cost(1031, 37, 53, 4, 100, kind="least_squares")
    assert ls["flops"] == 2 * 1031 * 37 ** 2 + 2 * 1031 * 37 * 53 + 11 * 37 ** 3 + 2 * 37 ** 2 * 53
    assert ls["peak_bytes"] < cost["peak_bytes"]
    gemma = alignment.alignment_cost(262144, 640, 640, 8)  # default block: 13107 rows of 640
    assert gemma["peak_bytes"] < 2 ** 30 < 262144 * 640 * 8  # well below one float64 copy of the head
