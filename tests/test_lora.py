"""LoRA adapters: the adapted forward equals the merged one (float64, tolerance 1e-12 relative), only the named
projections are wrapped, and a LoRA run changes only the named projections of the trained layers."""
import json

import pytest
import torch

from semalign_ds import config as config_mod, lora, pipeline
from semalign_ds.config import ConfigError
from tests.helpers import TINY_YAML, random_model

TARGETS = ["up_proj", "down_proj", "v_proj", "o_proj"]


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def test_lora_forward_equals_the_merged_forward():
    model = random_model("llama", layers=2, seed=4)
    layer = model.model.layers[1]
    lora.attach(layer, TARGETS, rank=3, alpha=7.0, seed=1)
    wrapped = {n for n, m in layer.named_modules() if isinstance(m, lora.LoRALinear)}
    assert wrapped == {"self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"}
    g = torch.Generator().manual_seed(8)
    for m in layer.modules():
        if isinstance(m, lora.LoRALinear):
            assert torch.count_nonzero(m.lora_B) == 0  # training starts from the base layer
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64)
    x = torch.randn(3, 11, 40, generator=g, dtype=torch.float64)
    ids = torch.zeros(3, 11, dtype=torch.long)
    out = model.model(inputs_embeds=x, attention_mask=torch.ones_like(ids)).last_hidden_state
    lora.merge(layer)
    assert not any(isinstance(m, lora.LoRALinear) for m in layer.modules())
    merged = model.model(inputs_embeds=x, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert rel(merged, out) < 1e-12
    # the merged weight is W + alpha/rank B A, written out
    base = random_model("llama", layers=2, seed=4).model.layers[1].mlp.up_proj
    single = lora.LoRALinear(base, rank=5, alpha=3.0)
    single.lora_B.data = torch.randn(single.lora_B.shape, generator=g, dtype=torch.float64)
    want = base.weight.detach() + 3.0 / 5 * single.lora_B.detach() @ single.lora_A.detach()
    y = torch.randn(7, 40, generator=g, dtype=torch.float64)
    before = single(y)
    assert rel(single.merged().weight.detach(), want) < 1e-14 and rel(base(y), before) < 1e-12


def test_unknown_target_is_refused_naming_the_projections():
    layer = random_model("llama", layers=1).model.layers[0]
    with pytest.raises(ConfigError, match="c_attn.*gate_proj"):
        lora.attach(layer, ["c_attn"], 4, 8.0, 0)


@pytest.mark.slow
def test_a_lora_run_changes_only_the_named_projections(tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = config_mod.load(TINY_YAML, {"max_examples": 13, "stage_steps": 3, "eval_data": None, "batch_size": 3,
                                      "cache_shard_examples": 7, "output_dir": str(tmp_path / "run"),
                                      "report_to": ["none"], "lora_rank": 4, "lora_targets": ["v_proj", "down_proj"]})
    pipeline.run(cfg)
    before = pipeline.initial_target(cfg).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "target").state_dict()
    assert sorted(after) == sorted(before)  # a plain model: no adapter left in the export
    for name, p in after.items():
        changed = not torch.equal(p, before[name])
        assert changed == (".layers." in name and (".v_proj." in name or ".down_proj." in name)), name
    budget = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert budget["phases"]["stage_1"]["backward_layer_tokens"] > 0


@pytest.mark.slow  # a pipeline run, up to its refusal
def test_lora_targets_checked_before_the_source_runs(tmp_path):
    cfg = config_mod.load(TINY_YAML, {"output_dir": str(tmp_path / "run"), "lora_rank": 4,
                                      "lora_targets": ["qkv"], "report_to": ["none"]})
    with pytest.raises(ConfigError, match="lora_targets"):
        pipeline.run(cfg)
    assert not (tmp_path / "run" / "plan.json").exists()
