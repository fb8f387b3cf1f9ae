"""The optimizer loop's schedule and gradient accumulation."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from semalign_ds import config as config_mod, pipeline
from semalign_ds.training import lr_at, micro_batches
from tests.parity import SETTINGS, TINY_YAML, launch


def cfg(**kw):
    return config_mod.load(TINY_YAML, {"lr": 0.37, **kw})


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedules(schedule):
    c = cfg(lr_schedule=schedule, warmup_steps=3, min_lr_ratio=0.1)
    steps = 17
    got = [lr_at(c, step, steps) for step in range(steps)]
    for step in range(3):
        assert got[step] == pytest.approx(0.37 * (step + 1) / 3, rel=1e-12)
    for step in range(3, steps):
        t = (step - 3) / (steps - 3)
        shape = {"constant": 1.0, "linear": 1 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t))}[schedule]
        want = 0.37 if schedule == "constant" else 0.037 + (0.37 - 0.037) * shape
        assert got[step] == pytest.approx(want, rel=1e-12), step
    if schedule != "constant":
        assert got[-1] > 0.037 and got[4] > got[10] > got[-1]
    # the joint phase's joint_lr takes lr's place in the same schedule
    joint = [lr_at(c, step, steps, peak=0.0137) for step in range(steps)]
    assert joint == pytest.approx([g * 0.0137 / 0.37 for g in got], rel=1e-12)


def test_micro_batches_keep_every_rank_in_step():
    assert micro_batches([5, 2, 9, 4, 7], 2) == [[5, 2, 9], [4, 7]]
    assert micro_batches([3], 3) == [[3], [], []]
    assert micro_batches([], 2) == [[], []]
    assert micro_batches([1, 2, 3, 4], 1) == [[1, 2, 3, 4]]


def run_weights(out, world=1, **extra):
    if world == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            pipeline.run(config_mod.load(TINY_YAML, {**SETTINGS, "eval_data": None, "output_dir": str(out),
                                                     **extra}))
        finally:
            torch.set_num_threads(threads)
    else:
        proc = launch(out, world, {"eval_data": "null", **extra})
        assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(os.path.join(out, "target", "model.safetensors"))


@pytest.mark.slow
def test_gradient_accumulation_gives_the_target_of_one_batch(tmp_path):
    """batch_size sequences per optimizer step, in 2 micro-batches: the same steps as one batch, in fp32 rounding,
    on 1 rank (plain autograd) and on 2 ranks (DeepSpeed's accumulation)."""
    whole = run_weights(tmp_path / "whole")
    for world in (1, 2):
        split = run_weights(tmp_path / f"split{world}", world, grad_accum_steps=2)
        for k in whole:
            torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=2e-5)
