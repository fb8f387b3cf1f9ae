"""2 ranks (gloo over loopback, torchrun) against 1 rank on the tiny config, and killed runs that resume."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from semalign_ds import pipeline
from tests.helpers import ROOT, TINY_YAML
from tests.test_pipeline import tiny_config

pytestmark = pytest.mark.slow  # torchrun, 2 ranks against 1

SETTINGS = {"max_examples": 20, "stage_steps": 6, "eval_max_examples": 4, "cache_shard_examples": 6,
            "batch_size": 4, "checkpoint_every": 2, "eval_max_seq_len": 160}


def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("SEMALIGN_DS_FAULT", None)
    return e


def torchrun(out, fault=None, timeout=300, **extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "launchers", "transfer.py"), "--config", TINY_YAML, "--output-dir", str(out)]
    cmd += [f"--set={k}={v}" for k, v in {**SETTINGS, **extra}.items()]
    e = env()
    if fault:
        e["SEMALIGN_DS_FAULT"] = fault
    t0 = time.time()
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc, time.time() - t0


def weights(out):
    return load_file(os.path.join(out, "target", "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    one = base / "one"
    torch.set_num_threads(1)
    try:
        pipeline.run(tiny_config(one, **SETTINGS))
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    two = base / "two"
    proc, _ = torchrun(two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two


def test_attribution_scores_match(runs):
    one, two = (json.loads((r / "plan.json").read_text()) for r in runs)
    assert one["pairs"] == two["pairs"]
    torch.testing.assert_close(torch.tensor(two["scores"]), torch.tensor(one["scores"]), rtol=1e-5, atol=0)


def test_cached_states_match(runs):
    one, two = runs
    shards = sorted(f for f in os.listdir(one / "cache") if f.startswith("shard-") and f.endswith(".safetensors"))
    assert shards == sorted(f for f in os.listdir(two / "cache") if f.startswith("shard-")
                            and f.endswith(".safetensors"))
    for f in shards:  # the layout is rank-independent: shard i holds the same examples however many ranks wrote it
        a, b = load_file(one / "cache" / f), load_file(two / "cache" / f)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    manifest = json.loads((two / "cache" / "manifest.json").read_text())
    assert len(manifest["shards"]) == len(shards) and all(len(s["sha256"]) == 64 for s in manifest["shards"])


def test_trained_target_matches_within_fp32(runs):
    a, b = (weights(r) for r in runs)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5)
    report = json.loads((runs[1] / "report.json").read_text())
    ref = json.loads((runs[0] / "report.json").read_text())
    assert report["source"]["tokens"] == ref["source"]["tokens"]
    assert report["source"]["nll"] == pytest.approx(ref["source"]["nll"], rel=1e-5)
    assert report["target_after"]["nll"] == pytest.approx(ref["target_after"]["nll"], rel=1e-4)


def test_killed_runs_resume_to_the_same_target(runs, tmp_path):
    out = tmp_path / "killed"
    # SIGKILL on both ranks after their first cache shard, then in the middle of stage 2 (after its checkpoint)
    proc, _ = torchrun(out, fault="cache_shard:1")
    assert proc.returncode != 0
    state = json.loads((out / "state.json").read_text())
    assert "cache" not in state["done"]
    done_shards = [f for f in os.listdir(out / "cache") if f.endswith(".json") and f.startswith("shard-")]
    assert 0 < len(done_shards) < 4
    proc, _ = torchrun(out, fault="stage_step:9")  # stage 2, step 3 (checkpoint at step 2)
    assert proc.returncode != 0
    state = json.loads((out / "state.json").read_text())
    assert "cache" in state["done"] and "stage_1" in state["done"] and "stage_2" not in state["done"]
    assert (out / "stages" / "checkpoint-stage_2").is_dir()
    proc, _ = torchrun(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step 2" in proc.stdout + proc.stderr
    a, b = weights(runs[1]), weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_a_stop_request_on_one_rank_stops_the_cache_on_both(runs, tmp_path):
    """SIGUSR1 to rank 1 alone, after its first cache shard. The ranks cache apart (each its own shards, at its own
    pace): rank 1 stops before its next batch, rank 0 finishes its shards, and at the phase's end they agree to
    stop, both with the stop message; the same command again writes the shards left, and the cache equals one
    rank's."""
    out = tmp_path / "stopped"
    proc, _ = torchrun(out, fault="cache_shard:1:1:usr1")
    assert proc.returncode != 0
    assert proc.stderr.count("activation cache: stopped on request") == 2, proc.stderr[-3000:]
    state = json.loads((out / "state.json").read_text())
    assert "cache" not in state["done"]
    done = [f for f in os.listdir(out / "cache") if f.startswith("shard-") and f.endswith(".safetensors")]
    assert 0 < len(done) < 4
    proc, _ = torchrun(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in sorted(os.listdir(runs[0] / "cache")):
        if f.startswith("shard-") and f.endswith(".safetensors"):
            a, b = load_file(runs[0] / "cache" / f), load_file(out / "cache" / f)
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)


def test_a_dead_rank_ends_the_run(tmp_path):
    """Rank 1 dies in the middle of a stage; rank 0 must not hang in its next collective."""
    proc, seconds = torchrun(tmp_path / "dead", fault="stage_step:3:1", timeout=240)
    assert proc.returncode != 0
    assert seconds < 180


def test_a_zero3_target_by_config_and_a_replicated_source(runs, tmp_path):
    """A target too large for one rank can be sharded too: ZeRO-3 stages give the same target. In the same run the
    source is whole on both ranks (source_sharding replicated: data parallel, no ZeRO-3), and attribution and the
    cache give what one rank gives."""
    out = tmp_path / "z3"
    proc, _ = torchrun(out, ds_target_config=os.path.join(ROOT, "ds_configs", "target_zero3.json"),
                       source_sharding="replicated")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "source whole on each of 2 ranks" in proc.stdout and "under ZeRO-3" not in proc.stdout
    test_attribution_scores_match((runs[0], out))
    test_cached_states_match((runs[0], out))
    a, b = weights(runs[0]), weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5)
