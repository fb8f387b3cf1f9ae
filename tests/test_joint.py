"""The joint phase after the frontier stages: every layer trains, a kill mid-phase resumes from its checkpoint to
the same target as an uninterrupted run, and state.json marks it."""
import json

import pytest
import torch
from safetensors.torch import load_file

from semalign_ds import config as config_mod, pipeline
from semalign_ds.config import ConfigError
from tests.helpers import TINY_YAML
from tests.parity import SETTINGS, launch

JOINT = {"joint_steps": 4, "joint_lr": 1e-3, "joint_layer_weight": 2.0, "layer_objective": "cosine"}


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
