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
