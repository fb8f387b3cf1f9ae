"""The whole pipeline on tiny pairs of the newer families (Gemma 3, Phi-3) and on a pair whose vocabularies share a
prefix of ids (the paper's WizardCoder 32,001 -> Llama-2 32,000, here 513 -> 512)."""
import json
import os

import pytest
import torch

from semalign_ds import config as config_mod, pipeline
from tests.helpers import ARCH_CONFIGS, TINY, TINY_YAML, tiny_model_dir

pytestmark = pytest.mark.slow  # whole pipeline runs

FAST = {"max_examples": 16, "stage_steps": 3, "eval_max_examples": 4, "cache_shard_examples": 8, "batch_size": 4,
        "max_seq_len": 64, "attribution_examples": 8}


def _run(out, **overrides):
    cfg = config_mod.load(TINY_YAML, {**FAST, "output_dir": str(out), **overrides})
    pipeline.run(cfg)
    return cfg


def _check_outputs(cfg, out, arch, target_layers):
    """The exported target reloads as its family, its non-layer weights are the initial ones and every layer
    trained; the report has all three evaluations."""
    from transformers import AutoModelForCausalLM
    after = AutoModelForCausalLM.from_pretrained(out / "target")
    assert after.config.model_type == arch and after.config.num_hidden_layers == target_layers
    before = pipeline.initial_target(cfg).state_dict()
    for name, p in after.state_dict().items():
        assert torch.equal(p, before[name]) != (".layers." in name), name
    metrics = json.loads((out / "metrics.json").read_text())["stages"]
    assert sorted(metrics) == [str(k) for k in range(1, target_layers + 1)]
    assert all(m["steps"] == FAST["stage_steps"] and m["last_loss"] > 0 for m in metrics.values())
    report = json.loads((out / "report.json").read_text())
    assert all(report[k]["nll"] > 0 and report[k]["tokens"] > 0 for k in ("source", "target_before", "target_after"))
    return json.loads((out / "target" / "config.json").read_text())


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
def test_a_tiny_pair_runs_the_whole_pipeline(tmp_path, arch):
    source = tiny_model_dir(tmp_path, "source", arch=arch, layers=5)
    target = tiny_model_dir(tmp_path, "target", arch=arch, layers=3, intermediate_size=56)
    out = tmp_path / "run"
    cfg = _run(out, source=source, target=target)
    exported = _check_outputs(cfg, out, arch, 3)
    if arch == "gemma3_text":  # transformers 4.x reads the two rotary bases from the legacy keys
        assert exported["rope_theta"] == ARCH_CONFIGS[arch]["rope_parameters"]["full_attention"]["rope_theta"]
        assert exported["rope_local_base_freq"] == 10007.0
    assert json.loads((out / "target" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"


def test_vocabularies_sharing_a_prefix_run_end_to_end(tmp_path):
    """A 513-token source (the tiny tokenizer plus a [PAD] token, as WizardCoder adds one to Llama 2's) into a
    512-token target: aligned on the 512 shared ids."""
    from transformers import AutoTokenizer
    target = tiny_model_dir(tmp_path, "target", layers=3)
    wizard = tmp_path / "wizard"
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[PAD]"]})
    assert len(tokenizer) == 513
    tokenizer.save_pretrained(wizard)
    source_cfg = json.loads(open(os.path.join(TINY, "source.json")).read())
    (wizard / "source.json").write_text(json.dumps({**source_cfg, "vocab_size": 513}))
    out = tmp_path / "run"
    cfg = _run(out, source=str(wizard / "source.json"), target=target)
    _check_outputs(cfg, out, "llama", 3)
    from safetensors.torch import load_file
    head = load_file(out / "cache" / "source_head.safetensors")["weight"]
    assert head.shape[0] == 512  # the source's extra row is left out
