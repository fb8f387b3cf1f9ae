"""The joint phase after the frontier stages: every layer trains, a kill mid-phase resumes from its checkpoint to
the same target as an uninterrupted run, and state.json marks it."""
import json

import pytest
import torch
from safetensors.torch import load_file

from semalign_ds import config as config_mod, pipeline, summary
from semalign_ds.config import ConfigError
from tests.helpers import TINY_YAML
from tests.parity import SETTINGS, launch, summary as parity_summary

JOINT = {"joint_steps": 4, "joint_lr": 1e-3, "joint_layer_weight": 2.0, "layer_objective": "cosine"}


@pytest.mark.slow
def test_joint_phase_trains_every_layer_and_resumes_after_a_kill(tmp_path):
    killed = tmp_path / "killed"
    # the 6-step stages pass stage_step 18 times; the 21st is joint step 3, after its checkpoint at step 2
    proc = launch(killed, 1, {**JOINT, "eval_data": "null"}, fault=f"stage_step:{3 * SETTINGS['stage_steps'] + 3}")
    assert proc.returncode != 0
    state = json.loads((killed / "state.json").read_text())
    assert "stage_3" in state["done"] and "joint" not in state["done"]
    pointer = json.loads((killed / "stages" / "checkpoint-joint" / "latest.json").read_text())
    assert pointer["current"]["meta"]["step"] == 2
    cfg = dict(SETTINGS, **JOINT, eval_data=None, report_to=["none"])
    pipeline.run(config_mod.load(TINY_YAML, {**cfg, "output_dir": str(killed)}))
    straight = tmp_path / "straight"
    pipeline.run(config_mod.load(TINY_YAML, {**cfg, "output_dir": str(straight)}))
    a, b = (load_file(d / "target" / "model.safetensors") for d in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    state = json.loads((straight / "state.json").read_text())
    metrics = state["done"]["joint"]
    assert metrics["steps"] == 4 and metrics["budget"]["backward_layer_tokens"] > 0
    joint = load_file(straight / "stages" / "joint.safetensors")
    for k in (1, 2, 3):  # every layer moved in the joint phase, away from its stage's weights
        stage = load_file(straight / "stages" / f"layer-{k}.safetensors")
        for name, p in stage.items():
            assert not torch.equal(joint[f"{k - 1}.{name}"], p), (k, name)
    lines = [json.loads(x) for x in open(straight / "metrics.jsonl")]
    weights = [x["layer_weight"] for x in lines if x.get("tag") == "joint"]
    assert weights == pytest.approx([2.0, 1.5, 1.0, 0.5])  # w decays linearly to 0 over joint_steps
    assert all(x["lr"] == 1e-3 for x in lines if x.get("tag") == "joint")


def test_joint_steps_need_semalign(tmp_path):
    with pytest.raises(ConfigError, match="joint_steps 3 needs method semalign"):
        config_mod.load(TINY_YAML, {"joint_steps": 3, "method": "output_kd"})


@pytest.mark.slow
def test_a_run_without_stages_is_the_joint_phase_alone(tmp_path):
    """stage_steps 0: no frontier stage runs; the joint phase trains every layer of the target as it starts
    (output KL plus the aligned layer objectives), and the budget counts that phase only."""
    cfg = config_mod.load(TINY_YAML, {**SETTINGS, **JOINT, "stage_steps": 0, "joint_steps": 3, "eval_data": None,
                                      "report_to": ["none"], "output_dir": str(tmp_path / "run")})
    start = pipeline.initial_target(cfg).model.layers.state_dict()
    pipeline.run(cfg)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert "joint" in state["done"] and not [p for p in state["done"] if p.startswith("stage_")]
    assert not list((tmp_path / "run" / "stages").glob("layer-*.safetensors"))
    joint = load_file(tmp_path / "run" / "stages" / "joint.safetensors")
    for name, p in start.items():
        assert not torch.equal(joint[name], p), name  # every layer trained
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["layer_weight"] for x in lines if x.get("tag") == "joint"] == pytest.approx([2.0, 4 / 3, 2 / 3])
    assert all(x["layers"] > 0 for x in lines if x.get("tag") == "joint" and x["layer_weight"] > 0)
    got = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert [p for p in got["phases"] if p not in ("attribution", "cache")] == ["joint"]
    assert got["training"]["flops"] == pytest.approx(got["phases"]["joint"]["flops"])
    assert "3 joint steps (no stages)" in summary.summarize(str(tmp_path / "run"))


def test_no_stages_and_no_joint_phase_is_refused():
    for method in ("semalign", "output_kd", "finetune"):
        with pytest.raises(ConfigError, match="stage_steps 0 trains nothing"):
            config_mod.load(TINY_YAML, {"stage_steps": 0, "method": method})


@pytest.mark.slow
def test_the_joint_phase_alone_on_2_ranks_matches_1_rank(tmp_path):
    """A run without stages (semalign-aux's shape) under torchrun on 2 ranks (gloo): the same losses per step and
    the same target as 1 rank, within fp32 reduction order."""
    extra = {**JOINT, "stage_steps": 0, "joint_steps": 3, "eval_data": "null"}
    runs = {}
    for world in (1, 2):
        proc = launch(tmp_path / f"world{world}", world, extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[world] = parity_summary(tmp_path / f"world{world}")["losses"]
    assert list(runs[1]) == ["joint"] and len(runs[1]["joint"]) == 3
    assert runs[2]["joint"] == pytest.approx(runs[1]["joint"], rel=1e-5)
    a, b = (load_file(tmp_path / f"world{w}" / "target" / "model.safetensors") for w in (1, 2))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-5)
