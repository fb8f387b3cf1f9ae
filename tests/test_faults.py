"""Fault injection (issue: trusted runs). Kills at random moments (1 and 2 ranks), a kill during a multi-rank
checkpoint save, flipped and truncated bytes in every kind of file a run writes and reuses, a failing rank, two
runs into one directory, a killed launcher. Every case ends, after reruns, with a target bitwise identical to an
uninterrupted run of the same settings on the same machine (the `uninterrupted` fixture, tests/conftest.py), or
with an error that names the damaged file; none ends silently different."""
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch

from semalign_ds import config as config_mod, pipeline
from semalign_ds.config import ConfigError
from tests.parity import ROOT, SETTINGS, TINY_YAML, command, environment, launch, tensor_checksum

pytestmark = pytest.mark.slow  # killed and rerun pipelines, 1 and 2 ranks


@pytest.fixture
def golden(uninterrupted):
    """golden(world): the target checksum of the uninterrupted run on `world` ranks."""
    return lambda world: checksum(uninterrupted(world))


def checksum(out):
    return tensor_checksum(os.path.join(out, "target", "model.safetensors"))


def in_process(out):
    """The same run as tests.parity.launch on 1 rank, in this process (one thread, as the goldens)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline.run(config_mod.load(TINY_YAML, {**SETTINGS, "output_dir": str(out)}))
    finally:
        torch.set_num_threads(threads)


def start(out, world, fault=None):
    """A run in a new session: killing its process group reaches the launcher and every rank (all started here)."""
    return subprocess.Popen(command(out, world), env=environment(fault), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def our_processes(out):
    """PIDs of processes whose command line names `out` (only ever ones this test started)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(out).encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("world", [1, 2])
def test_kills_at_random_moments_then_reruns_give_the_same_target(world, tmp_path, golden):
    out = tmp_path / "run"
    rng = random.Random(1000 + world)
    expected, kills = 20.0, 0  # seconds a whole run takes: learnt from a run that ends before its first kill
    for attempt in range(12):
        proc = start(out, world)
        t0 = time.time()
        try:
            proc.wait(timeout=rng.uniform(0.15, 0.85) * expected if kills < 3 else 600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run's launcher and ranks, all started by this test
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stdout.read()[-4000:]
        if kills == 0:  # it finished before any kill: now its length is known, start over
            expected = time.time() - t0
            shutil.rmtree(out)
            continue
        break
    else:
        pytest.fail("the run did not finish")
    assert kills >= 1
    assert checksum(out) == golden(world)


def test_a_kill_during_a_multi_rank_checkpoint_save(tmp_path, golden):
    """Rank 1 dies after writing its part of the second checkpoint of stage 1 (step 4), before the pointer moves:
    the pointer still names step 2, and the rerun resumes there."""
    out = tmp_path / "run"
    proc = launch(out, 2, fault="checkpoint_saved:2:1")
    assert proc.returncode != 0
    pointer = json.loads((out / "stages" / "checkpoint-stage_1" / "latest.json").read_text())
    assert pointer["current"]["meta"]["step"] == 2
    assert (out / "stages" / "checkpoint-stage_1" / "step-00000004").is_dir()  # the torn one
    proc = launch(out, 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stage 1/3: resuming at step 2" in proc.stdout + proc.stderr
    assert checksum(out) == golden(2)


def test_a_torn_newest_checkpoint_falls_back_to_the_previous(tmp_path, golden):
    out = tmp_path / "run"
    proc = launch(out, 2, fault="stage_step:5")  # stage 1, after its step-4 checkpoint
    assert proc.returncode != 0
    folder = out / "stages" / "checkpoint-stage_1"
    pointer = json.loads((folder / "latest.json").read_text())
    assert pointer["current"]["meta"]["step"] == 4 and pointer["previous"]["meta"]["step"] == 2
    victim = sorted(p for p in (folder / pointer["current"]["tag"]).rglob("*") if p.is_file())[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = launch(out, 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "incomplete or damaged; trying an older one" in proc.stdout + proc.stderr
    assert "resuming at step 2" in proc.stdout + proc.stderr
    assert checksum(out) == golden(2)


# --- damaged files of every kind -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, uninterrupted):
    """Run directories left by kills: in the cache phase (one shard written), in stage 2 (after its step-2
    checkpoint), and a finished run."""
    base = tmp_path_factory.mktemp("killed")
    runs = {"done": uninterrupted(1)}
    for name, fault in (("cache", "cache_shard:1"), ("stage", "stage_step:9")):
        proc = launch(base / name, 1, fault=fault)
        assert proc.returncode != 0, proc.stderr[-3000:]
        runs[name] = base / name
    return runs


def flip(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) * 2 // 3] ^= 0x5A
    path.write_bytes(bytes(raw))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (run left by the kill, file, what must happen: "same" = rerun gives the golden target, or an error naming it)
DAMAGE = [
    ("cache", "data/transfer.safetensors", "same"),
    ("cache", "data/eval.safetensors", "same"),
    ("cache", "plan.json", "same"),
    ("cache", "alignment.safetensors", "same"),
    ("cache", "cache/shard-00000.safetensors", "same"),
    ("cache", "cache/shard-00000.json", "same"),
    ("cache", "cache/manifest.json", "same"),
    ("stage", "stages/layer-1.safetensors", "same"),
    ("stage", "frontier/frontier-1.rank0of1.safetensors", "same"),
    ("stage", "stages/checkpoint-stage_2/step-00000002/stage.pt", "same"),
    ("stage", "stages/checkpoint-stage_2/latest.json", "same"),
    ("stage", "cache/shard-00001.safetensors", "same"),
    ("stage", "cache/source_head.safetensors", "error"),  # written when the cache's forwards are done
    ("done", "target/model.safetensors", "same"),
    ("done", "target/config.json", "same"),
    ("done", "state.json", "error"),
    ("done", "config.json", "error"),
]


@pytest.mark.parametrize("damage", [flip, truncate])
@pytest.mark.parametrize("where,name,expect", DAMAGE, ids=[f"{w}:{n}" for w, n, _ in DAMAGE])
def test_damaged_files_are_recomputed_or_named(killed_runs, tmp_path, where, name, expect, damage, golden):
    out = tmp_path / "run"
    shutil.copytree(killed_runs[where], out)
    damage(out / name)
    if expect == "same":
        in_process(out)
        assert checksum(out) == golden(1)
    else:
        with pytest.raises(ConfigError, match=os.path.basename(name).replace(".", r"\.")):
            in_process(out)


def test_a_frontier_of_other_sequences_is_recomputed(killed_runs, tmp_path, golden):
    """A frontier file whose checksum holds but whose sequences are not this rank's (a run of another version, which
    dealt the sequences out otherwise): recomputed, not read as if the rows were this rank's."""
    from semalign_ds import rundir
    out = tmp_path / "run"
    shutil.copytree(killed_runs["stage"], out)
    path = str(out / "frontier" / "frontier-1.rank0of1.safetensors")
    saved = rundir.load_tensors(path)
    members = saved["members"].tolist()
    assert members == list(range(len(members)))
    rundir.save_tensors(path, {"states": saved["states"], "members": saved["members"].roll(1)})  # same positions
    in_process(out)
    assert checksum(out) == golden(1)


# --- ranks and launchers ---------------------------------------------------------------------------------------
def test_a_failing_rank_ends_every_rank_with_its_error(tmp_path, golden):
    out = tmp_path / "run"
    t0 = time.time()
    proc = launch(out, 2, fault="stage_step:3:1:raise", timeout=300)
    assert proc.returncode != 0
    assert time.time() - t0 < 120  # not the collective timeout (30 minutes)
    assert "injected fault at stage_step #3 on rank 1" in proc.stderr
    proc = launch(out, 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert checksum(out) == golden(2)


def test_two_runs_into_one_directory(tmp_path, golden):
    out = tmp_path / "run"
    # the first run pauses 45 s in its second step: still busy when the second one starts
    first = subprocess.Popen(command(out, 1), env=environment("stage_step:2:0:sleep"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lock = out / "run.lock"
    deadline = time.time() + 300
    while not (lock.is_file() and f"pid {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
        time.sleep(0.2)
    second = subprocess.run(command(out, 1), env=environment(), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2
    assert f"is in use by another run (pid {first.pid}" in second.stderr
    assert first.wait(timeout=900) == 0
    assert checksum(out) == golden(1)  # the refused run changed nothing


def test_a_killed_launcher_leaves_no_worker(tmp_path, golden):
    out = tmp_path / "run"
    agent = start(out, 2)
    deadline = time.time() + 300
    while not (out / "stages").is_dir() or not any((out / "stages").iterdir()):
        assert agent.poll() is None and time.time() < deadline
        time.sleep(0.5)
    os.kill(agent.pid, signal.SIGKILL)  # the torchrun agent alone, which this test started
    agent.wait()
    deadline = time.time() + 30
    while our_processes(out) and time.time() < deadline:
        time.sleep(0.5)
    assert our_processes(out) == []
    proc = launch(out, 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert checksum(out) == golden(2)


def test_a_full_disk_names_the_path(tmp_path):
    """The output directory on a device that fills up mid-run (a 400 KiB tmpfs, mounted by this test as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(ConfigError, match=f"no space left on the device holding {small}"):
            in_process(small / "run")
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_an_output_dir_that_is_a_file_or_read_only(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        in_process(afile)
    if os.geteuid() == 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
        try:
            with pytest.raises(ConfigError, match="choose an output_dir you can write to"):
                in_process(ro / "run")
        finally:
            subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize("world", [1, 2])
def test_a_stop_request_while_caching_keeps_the_shards_and_exits_75(world, tmp_path, golden):
    out = tmp_path / "run"
    proc = launch(out, world, fault="cache_shard:1:0:usr1")  # rank 0 asked to stop after its first shard
    assert proc.returncode == (75 if world == 1 else 1), proc.stderr[-3000:]  # torchrun reports a worker's 75 as 1
    assert "activation cache: stopped on request" in proc.stderr
    assert any(f.endswith(".json") and f.startswith("shard-") for f in os.listdir(out / "cache"))
    proc = launch(out, world)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert checksum(out) == golden(world)
