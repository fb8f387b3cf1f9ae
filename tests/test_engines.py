"""DeepSpeed configs: what cannot serve its role is refused with the reason; "auto" fields are filled."""
import json

import pytest
import torch

from semalign_ds import engines
from semalign_ds.config import ConfigError


def write(tmp_path, name, value):
    path = tmp_path / name
    path.write_text(json.dumps(value))
    return str(path)


def test_shipped_configs_load():
    for name, role in (("source_zero3", "source"), ("target_zero2", "target"), ("target_zero2_offload", "target"),
                       ("target_zero3", "target")):
        ds = engines.load_ds_config(engines.default_config_path(name), role)
        clip = 0.5 if role == "target" else None
        filled = engines.fill(ds, micro_batch=3, world=4, dtype="bfloat16", grad_clip=clip)
        assert filled["train_batch_size"] == 12 and filled["train_micro_batch_size_per_gpu"] == 3
        assert filled["bf16"]["enabled"] is True
        assert filled["gradient_clipping"] == (clip or 0.0)
        assert "auto" not in json.dumps(filled)


def test_source_config_with_training_blocks_is_refused(tmp_path):
    path = write(tmp_path, "s.json", {"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}})
    with pytest.raises(ConfigError, match="never trained.*optimizer block"):
        engines.load_ds_config(path, "source")
    path = write(tmp_path, "s1.json", {"zero_optimization": {"stage": 1}})
    with pytest.raises(ConfigError, match="stage 1 does not partition parameters"):
        engines.load_ds_config(path, "source")
    # the target's optimizer block (optimizer offload needs DeepSpeed's own): its lr and weight decay are the run's
    path = write(tmp_path, "t.json", {"optimizer": {"type": "Adam", "params": {"lr": 0.1}}})
    with pytest.raises(ConfigError, match="optimizer's lr come from the run config"):
        engines.load_ds_config(path, "target")
    ok = engines.load_ds_config(write(tmp_path, "t2.json", {"optimizer": {"type": "AdamW"}}), "target")
    filled = engines.fill(ok, 2, 2, "float32", 1.0, lr=3e-4, weight_decay=0.01)
    assert filled["optimizer"]["params"] == {"lr": 3e-4, "weight_decay": 0.01}
    with pytest.raises(ConfigError, match="cannot be read"):
        engines.load_ds_config(str(tmp_path / "missing.json"), "source")


def test_a_source_that_does_not_fit_needs_zero3():
    huge = 10 * engines.device_memory()
    with pytest.raises(ConfigError, match="more than one rank has.*use ZeRO stage 3"):
        engines.check_source_fits({"zero_optimization": {"stage": 0}}, huge, 1)
    engines.check_source_fits({"zero_optimization": {"stage": 3}}, huge, 1)  # sharded: fine


def test_source_sharding_auto_partitions_only_where_it_holds_less():
    """auto: ZeRO-3 when the parameters it takes off a rank, P (1 - 1/world), outweigh DeepSpeed's runtime and what
    a forward holds gathered (a layer and the prefetch bucket: the vocabulary matrices stay in rows), computed here
    by hand."""
    from semalign_ds.config import Config
    cfg = Config(source="s", target="t", source_sharding="auto")
    layer = 3_001_003
    bucket = 5e7 if torch.cuda.is_available() else 0  # the shipped stage3_prefetch_bucket_size "auto"
    added = engines.DEEPSPEED_BYTES + (layer + bucket) * 4
    edge = added / 4 * 2  # P (1 - 1/2) = added at 2 ranks, in float32
    for world, params, want in ((2, int(edge) - 7, False), (2, int(edge) + 7, True),
                                (4, int(added / 4 * 4 / 3) + 7, True), (4, int(added / 4 * 4 / 3) - 7, False)):
        assert engines.source_zero3(cfg, world, params, layer) is want, (world, params)
    assert engines.zero3_gathered(cfg, 10**12, layer, 2) == (layer + bucket) * 2
    for sharding, want in (("zero3", True), ("replicated", False)):
        assert engines.source_zero3(cfg.model_copy(update={"source_sharding": sharding}), 2, 99, 1) is want
    assert not engines.source_zero3(cfg.model_copy(update={"source_sharding": "zero3"}), 1, 10**12, 1)
    given = cfg.model_copy(update={"ds_source_config": engines.default_config_path("source_zero3")})
    assert engines.source_zero3(given, 1, 99, 1)  # a DeepSpeed config given: ZeRO-3 even on one rank


def test_the_prefetch_bucket_auto_is_zero_on_cpu_and_deepspeeds_default_on_cuda(monkeypatch):
    shipped = engines.load_ds_config(engines.default_config_path("source_zero3"), "source")
    assert shipped["zero_optimization"]["stage3_prefetch_bucket_size"] == "auto"
    for cuda, want in ((False, 0), (True, 5e7)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert engines.fill(shipped, 3, 2, "float32")["zero_optimization"]["stage3_prefetch_bucket_size"] == want
    assert shipped["zero_optimization"]["stage3_prefetch_bucket_size"] == "auto"  # fill works on a copy
    given = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 123}}
    assert engines.fill(given, 3, 2, "float32")["zero_optimization"]["stage3_prefetch_bucket_size"] == 123


def test_reduce_scatter_auto_is_false_on_cpu_and_deepspeeds_default_on_cuda(monkeypatch):
    shipped = engines.load_ds_config(engines.default_config_path("target_zero2"), "target")
    assert shipped["zero_optimization"]["reduce_scatter"] == "auto"
    for cuda, want in ((False, False), (True, True)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert engines.fill(shipped, 3, 2, "float32")["zero_optimization"]["reduce_scatter"] is want
    given = {"zero_optimization": {"stage": 2, "reduce_scatter": True}}
    assert engines.fill(given, 3, 2, "float32")["zero_optimization"]["reduce_scatter"] is True


def _adamw_reference(p, g, m, v, step, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """One AdamW update in float64 (decoupled weight decay, bias-corrected moments): the new (p, m, v)."""
    p = p * (1 - lr * wd)
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    m_hat, v_hat = m / (1 - betas[0] ** step), v / (1 - betas[1] ** step)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_the_stage_optimizer_is_fused_adamw_and_matches_the_update_in_float64(dtype, tol):
    torch.manual_seed(11)
    cfg = type("Cfg", (), {"lr": 3e-3, "weight_decay": 0.07})()
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in ((7, 13), (5,), (3, 11, 2))]
    opt = engines.adamw(params, cfg)
    assert opt.defaults["fused"] is True  # CPU parameters: torch's fused kernel
    ref = [(p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64),
            torch.zeros_like(p, dtype=torch.float64)) for p in params]
    for step in range(1, 4):  # fresh gradients each step, never zeros
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref = [_adamw_reference(r, g.double(), m, v, step, cfg.lr, cfg.weight_decay)
               for (r, m, v), g in zip(ref, grads)]
        for p, (r, _, _) in zip(params, ref):
            torch.testing.assert_close(p.detach().double(), r, rtol=tol, atol=tol)
    assert engines.adamw([torch.nn.Parameter(torch.randn(3, device="meta"))], cfg).defaults["fused"] is None


def test_inconsistent_batch_sizes_are_refused():
    with pytest.raises(ConfigError, match="batch sizes disagree"):
        engines.fill({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 3}, 3, 2, "float32")


STAGE_CLOSE = """
import gc, json, weakref, torch
from semalign_ds import engines
from semalign_ds.config import from_dict
cfg = from_dict({"source": "embedded:smollm2-135m-instruct", "target_keep_layers": [0, 1], "lr": 1e-3})
layer = torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.Linear(53, 11))
ds = engines.fill(engines.load_ds_config(engines.default_config_path("target_zero2"), "target"), 3, 1, "float32",
                  1.0, 1e-3, 0.0, 1)
before = [p.detach().clone() for p in layer.parameters()]
stage = engines.DeepSpeedStage(layer, cfg, ds)
stage.backward(layer(torch.randn(3, 37, generator=torch.Generator().manual_seed(0))).pow(2).sum())
stage.finish()
optimizer = weakref.ref(stage.engine.optimizer)
stage.close()
del stage
gc.collect()
x = torch.randn(5, 37)
print(json.dumps({"freed": optimizer() is None, "trained": any(not torch.equal(a, b) for a, b in
                  zip(before, layer.parameters())), "forward": bool(torch.isfinite(layer(x)).all())}))
"""


def test_a_deepspeed_stage_frees_its_optimizer_when_closed():
    """The layer outlives its stage; DeepSpeed's hooks on it (and on its parameters) reach the optimizer, whose
    state (fp32 copy, moments) stayed resident through every later stage until close() removed them."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", STAGE_CLOSE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"freed": True, "trained": True, "forward": True}
