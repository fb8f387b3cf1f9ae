"""transfer.sbatch on a real single-node SLURM started here (as root; Debian's slurm-wlm and munge; loopback only).

A job on the tiny config whose time limit falls in the middle of training must, STOP_LEAD before the limit (a
quarter of it here), checkpoint and come back until the run ends, with the target of an uninterrupted run. The job
is submitted with --no-requeue (unless --requeue), so the first return is a resubmission with the job's own options
(`scontrol requeue` is refused); the resubmitted job may requeue itself. SLURM holds a requeued job for about 2 minutes
(BeginTime); this check releases it at once (`scontrol update StartTime=now`), as an administrator could.

    python launchers/slurm/check_real_slurm.py [--install] [--time-minutes 3] [--stage-steps 1500] [--requeue]

With --requeue the job may requeue itself (no --no-requeue): the first return is `scontrol requeue`.

It takes 5-8 minutes on 2 cores (two runs of the tiny config side by side, and restarts): too slow for CI, where
tests/test_slurm.py checks the same script against SLURM stand-ins. The daemons it starts are stopped by their PIDs.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = {"max_examples": 16, "eval_max_examples": 4, "eval_max_seq_len": 160, "batch_size": 4,
            "cache_shard_examples": 8, "log_every": 50}


def start_slurm(tmp):
    """munged, slurmctld and slurmd on this host with every file under `tmp`; returns (environment, pid files)."""
    host = socket.gethostname()
    for d in ("state", "spool", "log", "munge"):
        os.makedirs(os.path.join(tmp, d), mode=0o700, exist_ok=True)
    key = os.path.join(tmp, "munge", "key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    conf = os.path.join(tmp, "slurm.conf")
    with open(conf, "w") as f:
        f.write(f"""ClusterName=check
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort=16917
SlurmdPort=16918
AuthType=auth/munge
AuthInfo=socket={tmp}/munge/sock
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/log/slurmctld.log
SlurmdLogFile={tmp}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobRequeue=1
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
KillWait=10
MinJobAge=600
NodeName={host} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN
PartitionName=check Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    pids = [os.path.join(tmp, "munge", "pid"), os.path.join(tmp, "slurmctld.pid"), os.path.join(tmp, "slurmd.pid")]
    subprocess.run(["munged", "--force", "-S", f"{tmp}/munge/sock", f"--key-file={key}",
                    f"--log-file={tmp}/munge/log", f"--pid-file={pids[0]}", f"--seed-file={tmp}/munge/seed"],
                   check=True)
    env = dict(os.environ, SLURM_CONF=conf)
    subprocess.run(["slurmctld", "-f", conf], check=True, env=env)
    subprocess.run(["slurmd", "-f", conf], check=True, env=env)
    deadline = time.time() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
        if time.time() > deadline:
            sys.exit(f"SLURM did not come up; see {tmp}/log")
        time.sleep(1)
    return env, pids


def stop(pid_files):
    for path in reversed(pid_files):
        try:
            pid = int(open(path).read().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--install", action="store_true", help="apt-get install slurm-wlm munge first (root)")
    p.add_argument("--time-minutes", type=int, default=3)
    p.add_argument("--stage-steps", type=int, default=1500)
    p.add_argument("--requeue", action="store_true", help="let the job requeue itself (default: --no-requeue, "
                   "so that it resubmits itself)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it starts munged, slurmctld and slurmd")
    if shutil.which("sbatch") is None:
        if not args.install:
            sys.exit("no sbatch: rerun with --install (apt-get install -y slurm-wlm munge)")
        t0 = time.time()
        subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        print(f"installed slurm-wlm and munge in {time.time() - t0:.0f} s")
    tmp = tempfile.mkdtemp(prefix="semalign-slurm-")
    env, pids = start_slurm(tmp)
    try:
        return check(args, tmp, env)
    finally:
        stop(pids)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def check(args, tmp, env):
    import torch
    from safetensors.torch import load_file

    settings = [f"--set={k}={v}" for k, v in {**SETTINGS, "stage_steps": args.stage_steps}.items()]
    config = os.path.join(ROOT, "launchers", "configs", "tiny.yaml")
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", CONFIG=config,
               RUN_DIR=os.path.join(tmp, "run"), PYTHON=sys.executable,
               TORCH_EXTENSIONS_DIR=os.path.join(tmp, "ext"))
    log = os.path.join(tmp, "job.out")
    t0 = time.time()
    reference = subprocess.Popen([sys.executable, os.path.join(ROOT, "launchers", "transfer.py"), "--config", config,
                                  "--output-dir", os.path.join(tmp, "reference")] + settings, env=env, cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    first = subprocess.run(["sbatch", "--parsable", "--job-name=check", "--nodes=1", "--ntasks-per-node=1",
                            "--cpus-per-task=1", f"--time={args.time_minutes}", f"--output={log}"]
                           + ([] if args.requeue else ["--no-requeue"])
                           + [os.path.join(ROOT, "launchers", "slurm", "transfer.sbatch")] + settings,
                           env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    print(f"submitted job {first}: --time={args.time_minutes}{'' if args.requeue else ' --no-requeue'}, "
          f"stage_steps={args.stage_steps}")
    released, deadline = set(), time.time() + 30 * 60
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], env=env, capture_output=True, text=True).stdout
        jobs = [line.split() for line in queue.splitlines()]
        for job, state, reason in jobs:
            if state == "PENDING" and reason == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
                released.add(job)
        if not jobs:
            break
        time.sleep(2)
    wall = time.time() - t0
    reference.wait()
    text = open(log, errors="replace").read()
    print("".join(line + "\n" for line in text.splitlines()
                  if re.search(r"job \d+ \(restart|time limit in|stop requested|checkpointed|requeue|resubmit"
                               r"|resuming at step|stopped on request|launcher exited|restarts done", line)))
    a = load_file(os.path.join(tmp, "reference", "target", "model.safetensors"))
    b = load_file(os.path.join(tmp, "run", "target", "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    bitwise = all(torch.equal(a[k], b[k]) for k in a)
    stops = text.count("the run checkpointed and stopped (75)")
    requeues = text.count("requeueing job") - text.count("requeue refused")
    print(f"{stops} stop(s) with a checkpoint, {text.count('requeue refused: resubmitting')} resubmission(s), "
          f"{requeues} requeue(s) ({len(released)} released from the requeue hold), "
          f"{text.count('resuming at step')} resume(s) inside a stage; wall {wall:.0f} s; target vs uninterrupted "
          f"run: max |diff| {diff:.3g}, bitwise identical: {bitwise}")
    came_back = "requeueing job" in text and released if args.requeue else "requeue refused: resubmitting" in text
    ok = (stops >= 1 and "resuming at step" in text and came_back
          and "launcher exited with status 0" in text and diff <= 2e-5)
    print("OK" if ok else f"FAILED (log: {log}; rerun with --keep to look at it)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
