"""The SLURM batch script's stop and return: on USR1 (or STOP_LEAD before the time limit) every rank is asked to
checkpoint and stop; a run that stopped with 75 is requeued, or resubmitted with the job's own options where a
requeue is refused. SLURM's commands are stand-ins here (launchers/slurm/check_real_slurm.py runs the same on a real
SLURM); the ranks are a stand-in that stops like the run does. And the run itself: SIGUSR1 mid-stage ends it with
75 and a checkpoint, and the rerun ends with the target of an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, TINY_YAML

pytestmark = pytest.mark.slow  # batch scripts, launchers and pipeline runs

SBATCH = os.path.join(ROOT, "launchers", "slurm", "transfer.sbatch")
RANK_SH = os.path.join(ROOT, "launchers", "slurm", "rank.sh")

# A rank: waits for USR1 (its handler installed at once, as the run's), then "finishes its step" and exits 75;
# FAKE_RUN=crash exits 1 instead, FAKE_RUN=finish ends with 0 after a second. `-m torch.distributed.run ...
# --no-python CMD...` behaves as torchrun does with such ranks: runs CMD and reports 1 when it fails.
FAKE_PYTHON = r"""#!{python}
import os, signal, subprocess, sys, time
calls = os.environ["FAKE_DIR"] + "/calls"
args = sys.argv[1:]
with open(calls, "a") as f:
    f.write("python " + " ".join(args) + "\n")
if args[:2] == ["-m", "torch.distributed.run"]:
    sys.exit(1 if subprocess.call(args[args.index("--no-python") + 1:]) else 0)
if args[:1] == ["-m"]:
    sys.exit(0)
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(time.time()))
with open(calls, "a") as f:
    f.write(f"rank started {{time.time()}}\n")
end = time.time() + (1 if os.environ.get("FAKE_RUN") == "finish" else 60)
while not stop and time.time() < end:
    time.sleep(0.05)
with open(calls, "a") as f:
    f.write(f"rank stopped {{stop[0] if stop else 'never'}}\n")
sys.exit(0 if not stop else 1 if os.environ.get("FAKE_RUN") == "crash" else 75)
"""

STUBS = {
    # srun: starts the tasks here and keeps their PIDs for scancel
    "srun": '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\n"$@" &\necho $! >> "$FAKE_DIR/tasks"\nwait $!\n',
    # scancel --signal=USR1 JOB: the signal to every process of the steps (the tasks and their descendants)
    "scancel": r"""#!/bin/bash
echo "scancel $*" >> "$FAKE_DIR/calls"
sig=${1#--signal=}
walk() { kill -s "$sig" "$1" 2>/dev/null; local c; for c in $(ps -o pid= --ppid "$1"); do walk "$c"; done; }
for p in $(cat "$FAKE_DIR/tasks"); do walk "$p"; done
""",
    # squeue -o %L: FAKE_LEFT as it is, else the time left until FAKE_END (seconds since the epoch)
    "squeue": '#!/bin/bash\n[[ -n "$FAKE_LEFT" ]] && { echo "$FAKE_LEFT"; exit; }\n'
              'left=$(( FAKE_END - $(date +%s) )); (( left < 0 )) && left=0\n'
              'printf "%d:%02d\\n" $((left / 60)) $((left % 60))\n',
    "scontrol": r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_DIR/calls"
case "$1 $2" in
    "show hostnames") echo node01 ;;
    "show job") cat "$FAKE_DIR/record" ;;
    requeue*) exit "${FAKE_REQUEUE_RC:-0}" ;;
esac
""",
    "sbatch": '#!/bin/bash\necho "sbatch $* RESUBMITS=$RESUBMITS CONFIG=$CONFIG RUN_DIR=$RUN_DIR '
              'MASTER_ADDR=${MASTER_ADDR-unset} OMP_NUM_THREADS=${OMP_NUM_THREADS-unset}" >> "$FAKE_DIR/calls"\n',
}


def fake_slurm(tmp_path, record="", **extra):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in {**STUBS, "python": FAKE_PYTHON.format(python=sys.executable)}.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    (tmp_path / "record").write_text(record)
    (tmp_path / "tasks").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "RESUBMITS", "MAX_RESTARTS", "MASTER_",
                                                                     "OMP_NUM_THREADS", "STOP_LEAD"))}
    env.update(SLURM_JOB_ID="77", SLURM_JOB_NAME="semalign", SLURM_JOB_NODELIST="node01", SLURM_NNODES="1",
               SLURM_SUBMIT_DIR=ROOT, CONFIG=TINY_YAML, RUN_DIR=str(tmp_path / "run"), PYTHON=str(stubs / "python"),
               FAKE_DIR=str(tmp_path), FAKE_END=str(int(time.time()) + 4 * 3600),
               PATH=f"{stubs}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def start(env, *args):
    return subprocess.Popen(["bash", SBATCH, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def calls(tmp_path):
    return (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []


def stop_when_started(proc, tmp_path, ranks=1):
    """USR1 to the batch script (as `scancel --signal=USR1 --batch` does) once every rank runs."""
    deadline = time.time() + 60
    while sum(line.startswith("rank started") for line in calls(tmp_path)) < ranks:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    return proc.communicate(timeout=60)[0]


def test_stop_request_reaches_every_rank_which_checkpoints_then_the_job_requeues(tmp_path):
    env = fake_slurm(tmp_path, SLURM_RESTART_COUNT="2")
    proc = start(env, "--set=stage_steps=3")
    out = stop_when_started(proc, tmp_path)
    assert proc.returncode == 0, out
    lines = calls(tmp_path)
    assert "(restart 2)" in out and re.search(r"time limit in 14[34]\d\d s: the run is asked to checkpoint and stop "
                                             r"300 s before it", out), out
    assert "scancel --signal=USR1 77" in lines  # every rank, not the batch script (no --batch/--full)
    assert any(line.startswith("rank stopped ") and "never" not in line for line in lines)
    assert "launcher exited with status 75" in out and "the run checkpointed and stopped (75)" in out
    assert lines[-1] == "scontrol requeue 77" and "requeueing job 77" in out
    run = next(line for line in lines if "launchers/transfer.py" in line)
    assert run.endswith(f"--config {TINY_YAML} --output-dir {tmp_path / 'run'} --set=stage_steps=3")
    assert not (tmp_path / "run" / ".stopped.77").exists()


def test_a_time_limit_shorter_than_the_lead_stops_the_run_after_three_quarters_of_it(tmp_path):
    """--signal=B:USR1@300 with --time=5 came before any work, and the job requeued again and again."""
    left = 12
    env = fake_slurm(tmp_path, FAKE_END=str(int(time.time()) + left))
    t0 = time.time()
    proc = start(env)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert re.search(rf"time limit in ({left}|{left - 1}) s: the run is asked to checkpoint and stop "
                     rf"({left // 4}|{(left - 1) // 4}) s before it", out), out
    stopped = float(next(line for line in calls(tmp_path) if line.startswith("rank stopped")).split()[-1])
    assert left - left // 4 - 2 <= stopped - t0 <= left - left // 4 + 2, (stopped - t0, out)
    assert calls(tmp_path)[-1] == "scontrol requeue 77"


@pytest.mark.parametrize("left, said", [
    ("1-02:03:09", "time limit in 93789 s: the run is asked to checkpoint and stop 300 s before it"),
    ("08:00", "time limit in 480 s: the run is asked to checkpoint and stop 120 s before it"),
    ("UNLIMITED", "no time limit read from squeue: the run stops early only on USR1 to this script")])
def test_the_time_left_in_squeues_formats(tmp_path, left, said):
    proc = start(fake_slurm(tmp_path, FAKE_RUN="finish", FAKE_LEFT=left))
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and said in out, out


def test_a_refused_requeue_resubmits_with_the_jobs_own_options_and_arguments(tmp_path):
    record = (f"JobId=77 JobName=big\n   Command={SBATCH} --set=stage_steps=3\n"
              f"   SubmitLine=sbatch --nodes 8 --ntasks-per-node 2 -p big -A proj launchers/slurm/transfer.sbatch"
              f" --set=stage_steps=3\n   WorkDir={ROOT}\n")
    env = fake_slurm(tmp_path, record, FAKE_REQUEUE_RC="1", SLURM_RESTART_COUNT="1", RESUBMITS="2")
    out = stop_when_started(start(env, "--set=stage_steps=3", "--set=lr=2e-4"), tmp_path)
    assert "requeue refused: resubmitting" in out, out
    sbatch = calls(tmp_path)[-1]
    assert sbatch.startswith("sbatch --nodes 8 --ntasks-per-node 2 -p big -A proj --dependency=afterany:77 "
                             "--export=ALL "), sbatch
    # the master and threads of this job are not carried over: the next one may run on other nodes
    assert sbatch.endswith(f"--set=stage_steps=3 --set=lr=2e-4 RESUBMITS=4 CONFIG={TINY_YAML} "
                           f"RUN_DIR={tmp_path / 'run'} MASTER_ADDR=unset OMP_NUM_THREADS=unset"), sbatch


def test_without_a_submit_line_the_resubmission_asks_for_the_jobs_resources(tmp_path):
    record = (f"JobId=77 JobName=semalign\n   Command={SBATCH}\n   NumNodes=8 NumCPUs=64 NumTasks=16 CPUs/Task=4\n"
              "   TimeLimit=04:00:00 Partition=big Account=proj QOS=normal\n   StdOut=/shared/semalign-77.out\n"
              "   StdErr=/shared/semalign-77.out\n")
    env = fake_slurm(tmp_path, record, FAKE_REQUEUE_RC="1", SLURM_NNODES="8", SLURM_NTASKS_PER_NODE="2",
                     SLURM_CPUS_PER_TASK="4", SLURM_GPUS_PER_NODE="2")
    out = stop_when_started(start(env), tmp_path)
    sbatch = calls(tmp_path)[-1].split()
    for option in ("--job-name=semalign", "--nodes=8", "--ntasks-per-node=2", "--cpus-per-task=4",
                   "--gpus-per-node=2", "--time=04:00:00", "--partition=big", "--account=proj", "--qos=normal",
                   "--output=/shared/semalign-77.out", "--error=/shared/semalign-77.out",
                   "--dependency=afterany:77", "RESUBMITS=1"):
        assert option in sbatch, (option, sbatch, out)


def test_no_return_past_max_restarts_nor_for_a_run_that_did_not_checkpoint(tmp_path):
    env = fake_slurm(tmp_path, SLURM_RESTART_COUNT="3", MAX_RESTARTS="3")
    proc = start(env)
    out = stop_when_started(proc, tmp_path)
    assert proc.returncode == 75 and "3 restarts done (MAX_RESTARTS=3): not requeueing" in out, out
    assert not any("requeue" in line or line.startswith("sbatch") for line in calls(tmp_path))
    (tmp_path / "calls").unlink()
    (tmp_path / "tasks").write_text("")
    proc = start({**env, "FAKE_RUN": "crash", "MAX_RESTARTS": "10"})
    out = stop_when_started(proc, tmp_path)
    assert proc.returncode == 1 and "did not checkpoint after the stop request (status 1): not requeueing" in out
    assert not any("requeue" in line or line.startswith("sbatch") for line in calls(tmp_path))


def test_a_run_that_finishes_is_summarised_and_not_requeued(tmp_path):
    proc = start(fake_slurm(tmp_path, FAKE_RUN="finish"))
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "launcher exited with status 0" in out, out
    assert any("-m semalign_ds.summary" in line for line in calls(tmp_path))
    assert not any("requeue" in line or "scancel" in line for line in calls(tmp_path))


def test_torchrun_reports_1_for_ranks_that_stopped_with_75_and_the_job_still_comes_back(tmp_path):
    """torchrun ends with 1 whatever its workers' status; rank.sh leaves STOPPED_FILE for a rank that exited 75.
    torchrun itself ignores USR1 (rank.sh), which would otherwise end it."""
    env = fake_slurm(tmp_path, LAUNCHER="torchrun")
    proc = start(env)
    out = stop_when_started(proc, tmp_path)
    assert proc.returncode == 0, out
    assert "launcher exited with status 1" in out and "the run checkpointed and stopped (75)" in out
    assert any("-m torch.distributed.run" in line and f"--no-python bash {RANK_SH}" in line
               for line in calls(tmp_path))
    assert calls(tmp_path)[-1] == "scontrol requeue 77"


def test_rank_sh_ignores_usr1_until_the_command_handles_it(tmp_path):
    stopped = tmp_path / "stopped"
    env = dict(os.environ, STOPPED_FILE=str(stopped))
    # a child that does not handle USR1 survives it; one that does (as the run) gets it
    proc = subprocess.run(["bash", RANK_SH, "bash", "-c", "kill -USR1 $$; sleep 0.2; exit 3"], env=env)
    assert proc.returncode == 3 and not stopped.exists()
    code = ("import os, signal, sys, time; got = []; signal.signal(signal.SIGUSR1, lambda *a: got.append(1)); "
            "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2); sys.exit(75 if got else 4)")
    assert subprocess.run(["bash", RANK_SH, sys.executable, "-c", code], env=env).returncode == 75
    assert stopped.exists()


# --- the run itself: SIGUSR1 mid-stage, exit 75, a checkpoint, the same target after the rerun ----------------------
RUN_SETTINGS = {"max_examples": 16, "stage_steps": 120, "eval_max_examples": 4, "eval_max_seq_len": 160,
                "batch_size": 4, "cache_shard_examples": 8, "log_every": 1}


def transfer(out, *launcher, **env):
    cmd = [*launcher, os.path.join(ROOT, "launchers", "transfer.py"), "--config", TINY_YAML, "--output-dir",
           str(out)] + [f"--set={k}={v}" for k, v in RUN_SETTINGS.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", **env)
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm") / "uninterrupted"
    proc = transfer(out, sys.executable)
    log = proc.communicate(timeout=400)[0]
    assert proc.returncode == 0, log[-3000:]
    return load_file(os.path.join(out, "target", "model.safetensors"))


def when_in_stage_2(proc, out):
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and any(json.loads(line)["tag"] == "stage_2" for line in open(metrics))):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)


def stopped_then_resumed(out, log, rerun):
    """The step the run stopped after (its checkpoint is that step); the rerun resumes there and ends."""
    assert "stage 2/3: stopped on request after step" in log, log[-3000:]
    step = int(log.split("stopped on request after step ")[1].split()[0])
    assert 0 < step < RUN_SETTINGS["stage_steps"]
    pointer = json.loads((out / "stages" / "checkpoint-stage_2" / "latest.json").read_text())
    assert pointer["current"]["meta"]["step"] == step
    log = rerun.communicate(timeout=400)[0]
    assert rerun.returncode == 0, log[-3000:]
    assert f"stage 2/3: resuming at step {step} of {RUN_SETTINGS['stage_steps']}" in log, log[-3000:]
    return load_file(os.path.join(out, "target", "model.safetensors"))


def test_sigusr1_mid_stage_checkpoints_exits_75_and_the_rerun_gives_the_uninterrupted_target(tmp_path,
                                                                                            uninterrupted):
    out = tmp_path / "run"
    proc = transfer(out, sys.executable)
    when_in_stage_2(proc, out)
    proc.send_signal(signal.SIGUSR1)  # a process this test started
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, log[-3000:]
    target = stopped_then_resumed(out, log, transfer(out, sys.executable))
    assert target.keys() == uninterrupted.keys()
    for k in target:
        assert torch.equal(target[k], uninterrupted[k]), k  # one rank, same batches and optimizer state: bitwise


def test_two_torchrun_ranks_stop_after_the_same_step_when_one_gets_sigusr1(tmp_path, uninterrupted):
    """USR1 to rank 0 alone: the request travels in the step's all-reduce and both ranks checkpoint the same step.
    torchrun reports 1 for ranks that exit 75, so they run under rank.sh, as transfer.sbatch starts them."""
    out, stopped = tmp_path / "run", tmp_path / "stopped"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = transfer(out, "bash", RANK_SH, *torchrun, "--no-python", "bash", RANK_SH, sys.executable, "-u",
                    STOPPED_FILE=str(stopped))
    when_in_stage_2(proc, out)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if p.cmdline()[:2] == [sys.executable, "-u"]]  # descendants of the process this test started
    assert len(ranks) == 2
    next(p for p in ranks if p.environ().get("RANK") == "0").send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and stopped.exists(), log[-3000:]
    steps = re.findall(r"stopped on request after step (\d+)", log)
    assert len(steps) == 2 and len(set(steps)) == 1, steps  # each rank's message: the same step
    target = stopped_then_resumed(out, log, transfer(out, *torchrun))
    for k in target:  # two ranks sum gradients in another order than one
        torch.testing.assert_close(target[k], uninterrupted[k], rtol=1e-4, atol=2e-5, msg=k)
