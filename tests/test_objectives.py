"""The layer objectives (layer_objective cosine and geometry) against float64 references written here, on fresh
random inputs of odd sizes; and through a real layer, with its residual taken from the model's own forward.

Tolerances (relative error of the loss and of the input gradient): float64 1e-10, float32 1e-5."""
import pytest
import torch

from semalign_ds import config as config_mod, models, objectives, training
from semalign_ds.objectives import Inputs, geometry_loss
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
    recipe = objectives.recipe(cfg(layer_objective="cosine"))
    loss, parts = recipe.stage_loss(Inputs(x=x, rows={"aligned.3": a}, norm=norm), 3, False, 41)
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
    k = 2
    rows = {f"aligned.{k}": torch.randn(n, 40, generator=g, dtype=torch.float64),
            f"aligned.{k - 1}": torch.randn(n, 40, generator=g, dtype=torch.float64)}
    frontier = training.Frontier(states[k - 1][attn.bool()], torch.tensor([0, 13, 22, 28]), [0, 1, 2])
    batch = training.Batch([0, 1, 2], ids, attn, loss_mask, rows, n, 0)
    recipe = objectives.recipe(cfg(layer_objective="geometry"))
    got, parts = training.stage_step(adapter, recipe, None, None, k, False, frontier, None, torch.float64, batch)
    residual = (states[k] - states[k - 1])[loss_mask]
    want = geometry_reference(residual, rows[f"aligned.{k}"] - rows[f"aligned.{k - 1}"],
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


def diag_fisher_reference(x, y, w, tau):
    """tau^2/2 * sum_n sum_v p*_v delta_v^2, each row's softmax written out, in float64."""
    total = 0.0
    for i in range(x.shape[0]):
        z_star = (w @ y[i]) / tau
        e = torch.exp(z_star - z_star.max())
        p = e / e.sum()
        delta = (w @ x[i] - w @ y[i]) / tau
        total = total + tau * tau / 2 * (p * delta * delta).sum()
    return total


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_diag_fisher_against_reference(dtype):
    """The diagonal-Fisher objective (registry name diag_fisher) on fresh inputs of odd sizes, in row blocks that
    do not divide n; loss and the gradient to x against the float64 reference; it exceeds the full Fisher loss by
    tau^2/2 * sum_n (sum_v p* delta)^2, which is positive on random inputs."""
    from semalign_ds.losses import fisher_quadratic_loss
    g = torch.Generator().manual_seed(23)
    n, d, v, tau = 37, 19, 211, 1.7
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    x0 = a + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    gain = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    norm = lambda h: gain.to(h.dtype) * h / h.square().mean(-1, keepdim=True).sqrt()  # an RMSNorm
    objective = objectives.LAYER_OBJECTIVES["diag_fisher"](tau)
    x = x0.to(dtype).requires_grad_()
    got = objective.loss(Inputs(x=x, rows={"aligned.2": a.to(dtype)}, head=w.to(dtype), norm=norm), 2)
    ref_x = x.detach().double().requires_grad_()
    y = norm(a.to(dtype)).double()
    want = diag_fisher_reference(ref_x, y, w.to(dtype).double(), tau)
    got.backward()
    want.backward()
    assert rel(got, want) < TOL[dtype] and float(want) > 0.1
    assert rel(x.grad, ref_x.grad) < TOL[dtype]
    blocks = objectives.diag_fisher_loss(x.detach(), y.to(dtype), w.to(dtype), tau, chunk_rows=5)
    assert rel(blocks, want) < TOL[dtype]
    full = fisher_quadratic_loss(ref_x.detach(), y, w.to(dtype).double(), tau, reduction="sum", backend="naive")
    mean_delta = torch.stack([(torch.softmax(w.to(dtype).double() @ y[i] / tau, 0)
                               * (w.to(dtype).double() @ (ref_x[i].detach() - y[i])) / tau).sum() for i in range(n)])
    assert rel(want.detach() - full, tau * tau / 2 * mean_delta.square().sum()) < 1e-9


def test_the_registry_is_what_training_budget_and_cache_ask():
    """recipe(cfg) resolves method and layer_objective once: the stages' objective, the exact one for the last stage
    and the joint phase, the cache entries each reads, its head projections, and what the cache must hold."""
    r = objectives.recipe(cfg())
    assert r.layer.name == "fisher" and r.keys(3, False) == ("aligned.3",)
    assert r.keys(5, True) == ("source_final",) and r.uses_source_head
    assert r.step_heads("stage", False, 500, 16, 16) == (2, 1)
    assert r.step_heads("stage", True, 500, 16, 24) == (1 + 24 / 16, 1)  # KL: both heads forward, the target's back
    topk = objectives.recipe(cfg(fisher_topk=7))
    assert topk.keys(2, False) == ("topk_ids.2", "topk_z.2", "topk_tail.2")
    assert topk.exact_layer.name == "fisher" and topk.joint_keys(3) == ("aligned.1", "aligned.2", "source_final")
    assert topk.step_heads("stage", False, 500, 16, 16) == (7 / 500, 7 / 500)
    assert objectives.cache_contents(cfg(fisher_topk=7))["topk"] == (7, 1.0)
    geometry = objectives.recipe(cfg(layer_objective="geometry"))
    assert geometry.keys(1, False) == ("aligned.1", "aligned.0") and geometry.layer.uses_residual
    assert objectives.cache_contents(cfg(layer_objective="geometry"))["aligned_input"]
    assert objectives.recipe(cfg(layer_objective="diag_fisher")).step_heads("stage", False, 500, 16, 16) == (2, 1)
    assert objectives.recipe(cfg(layer_objective="diag_fisher", fisher_topk=7)).layer.name == "diag_fisher"
    assert objectives.recipe(cfg(layer_objective="cosine", fisher_topk=7)).layer.name == "cosine"  # no top-k form
    layerwise = objectives.recipe(cfg(method="layerwise"))
    assert layerwise.keys(2, False) == ("source.2",) and objectives.cache_contents(cfg(method="layerwise"))[
        "source_states"]
    assert isinstance(layerwise.layer.trainable(16, 24), torch.nn.Linear)
    kd = objectives.recipe(cfg(method="output_kd", ce_weight=0.5))
    assert kd.layer is None and [o.name for _, o in kd.output] == ["kl", "ce"]
    assert kd.step_heads("whole", True, 500, 16, 16) == (2 + 1, 1 + 1)
    finetune = objectives.recipe(cfg(method="finetune"))
    assert finetune.keys(5, True) == () and not finetune.uses_source_head
    with pytest.raises(config_mod.ConfigError, match="no layer objective 'fishr': one of fisher, cosine"):
        cfg(layer_objective="fishr")


@pytest.mark.slow
def test_diag_fisher_runs_in_the_tiny_pipeline(tmp_path):
    """The registry's example objective end to end: stages log it, the budget counts its head projections."""
    import json

    from semalign_ds import pipeline
    out = tmp_path / "run"
    pipeline.run(cfg(max_examples=9, stage_steps=2, eval_data=None, batch_size=3, cache_shard_examples=5,
                     output_dir=str(out), report_to=["none"], layer_objective="diag_fisher"))
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert all(x["diag_fisher"] > 0 for x in lines if x.get("tag") in ("stage_1", "stage_2"))
    assert (out / "target" / "model.safetensors").exists()
