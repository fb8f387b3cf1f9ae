"""The layer objectives (layer_objective cosine and geometry) against float64 references written here, on fresh
random inputs of odd sizes; and through a real layer, with its residual taken from the model's own forward.

Tolerances (relative error of the loss and of the input gradient): float64 1e-10, float32 1e-5."""
import pytest
import torch

from semalign_ds import config as config_mod, models
from semalign_ds.frontier import geometry_loss, objective, stage_loss
from tests.helpers import TINY_YAML, random_model

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def cfg(**kw):
    return config_mod.load(TINY_YAML, kw)


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def geometry_reference(r, r_star, counts):
    """sum over sequences of T * ||G - G*||^2 / T^2, each entry of G written as a sum over channels."""
    total, at = 0.0, 0
    for t in counts:
        a, b = r[at:at + t], r_star[at:at + t]
        at += t
        grams = []
        for m in (a, b):
            m = m - m.sum(0) / t
            m = m / torch.sqrt((m * m).sum(1, keepdim=True))
            grams.append(torch.stack([torch.stack([(m[i] * m[j]).sum() for j in range(t)]) for i in range(t)]))
        total = total + t * ((grams[0] - grams[1]) ** 2).sum() / t ** 2
    return total


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_geometry_loss(dtype):
    g = torch.Generator().manual_seed(11)
    counts = torch.tensor([7, 3, 11, 5])
    n = int(counts.sum())
    r = torch.randn(n, 23, generator=g, dtype=torch.float64)
    r_star = torch.randn(n, 23, generator=g, dtype=torch.float64)
    x = r.to(dtype).requires_grad_()
    got = geometry_loss(x, r_star.to(dtype), counts)
    ref_x = x.detach().double().requires_grad_()
    want = geometry_reference(ref_x, r_star.to(dtype).double(), counts.tolist())
    got.backward()
    want.backward()
    assert rel(got, want) < TOL[dtype] and float(want) > 0.1
    assert rel(x.grad, ref_x.grad) < TOL[dtype]
    assert float(geometry_loss(r, r, counts)) < 1e-20  # equal geometries: no loss


def test_cosine_objective():
    g = torch.Generator().manual_seed(5)
    n, d = 29, 17
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    gain = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    norm = lambda h: gain * h / h.square().mean(-1, keepdim=True).sqrt()  # an RMSNorm
    loss, parts = objective(x, {"aligned": a}, False, norm, None, cfg(layer_objective="cosine"), normalizer=41)
    y = norm(a)
    want = sum(1 - (x[i] @ y[i]) / (x[i].norm() * y[i].norm()) for i in range(n)) / 41
    assert rel(loss, want) < 1e-12 and parts == {"cosine": pytest.approx(float(want), rel=1e-12)}


def test_geometry_through_a_layer_uses_the_models_own_residual():
    """stage_loss on frontier h^(k-1) equals the reference on h^(k) - h^(k-1) from the model's own forward, over
    the loss positions of a right-padded batch."""
    model = random_model("llama", layers=3, seed=2)
    adapter = models.Adapter(model)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 97, (3, 13), generator=g)
    attn = torch.ones(3, 13, dtype=torch.long)
    attn[1, 9:] = 0
    attn[2, 6:] = 0
    loss_mask = attn.bool() & (torch.rand(3, 13, generator=g) > 0.3)
    loss_mask[:, -1] = False
    states = adapter.hidden_states(ids, attn)
    n = int(loss_mask.sum())
    targets = {"aligned": torch.randn(n, 40, generator=g, dtype=torch.float64),
               "aligned_in": torch.randn(n, 40, generator=g, dtype=torch.float64)}
    k = 2
    got, parts = stage_loss(adapter, k, 3, states[k - 1], attn, loss_mask, targets, None,
                            cfg(layer_objective="geometry"), ids)
    residual = (states[k] - states[k - 1])[loss_mask]
    want = geometry_reference(residual, targets["aligned"] - targets["aligned_in"],
                              loss_mask.sum(1).tolist()) / n
    assert rel(got, want) < 1e-10 and set(parts) == {"geometry"}


@pytest.mark.slow
def test_geometry_and_least_squares_run_end_to_end(tmp_path):
    """The wiring: the least-squares map is the run's M, the cache holds the aligned embeddings a^(0) that the
    geometry objective's first stage needs, and every stage and the joint phase log the geometry term."""
    import json

    from safetensors.torch import load_file

    from semalign_ds import pipeline
    out = tmp_path / "run"
    cfg = config_mod.load(TINY_YAML, {"max_examples": 11, "stage_steps": 2, "eval_data": None, "batch_size": 3,
                                      "cache_shard_examples": 6, "output_dir": str(out), "report_to": ["none"],
                                      "layer_objective": "geometry", "alignment_map": "least_squares",
                                      "joint_steps": 2})
    pipeline.run(cfg)
    target = pipeline.initial_target(cfg)
    source = models.load_model(cfg.source, None, "float32", cfg.seed)
    w_t, w_s = (m.get_output_embeddings().weight.detach().double()[:512] for m in (target, source))
    m = load_file(out / "alignment.safetensors")["M"].double()
    assert rel(m, torch.linalg.pinv(w_t) @ w_s) < 1e-6  # stored in float32
    shard = load_file(out / "cache" / "shard-00000.safetensors")
    assert {"aligned.0", "aligned.1", "aligned.2", "aligned.3"} <= set(shard)
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    for tag in ("stage_1", "stage_2", "joint"):
        assert all(x["geometry" if tag != "joint" else "layers"] > 0 for x in lines if x.get("tag") == tag), tag
