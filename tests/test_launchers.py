"""Launchers: the rank mapping of every launcher (detect() on the variables each one sets), hostfiles, the shell
scripts, and real 2-rank launches on loopback (two torchrun "nodes", mpirun, the deepspeed launcher) that must export
the same target as a 1-rank run; TensorBoard scalars, the one-screen summary and the benchmark's bookkeeping."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from semalign_ds import distributed, summary
from semalign_ds.config import ConfigError
from semalign_ds.distributed import Launch, check_hostfile, detect, first_host
from tests.helpers import ROOT, TINY_YAML

SETTINGS = {"max_examples": 16, "stage_steps": 3, "eval_max_examples": 4, "eval_max_seq_len": 160,
            "batch_size": 4, "cache_shard_examples": 8, "log_every": 1}
TRANSFER = os.path.join(ROOT, "launchers", "transfer.py")
BIN = os.path.dirname(sys.executable)
SLURM = os.path.join(ROOT, "launchers", "slurm")


# --- detect(): the variables each launcher sets -----------------------------------------------------------------------
def test_plain_python_is_one_process():
    assert detect({}) == Launch()
    assert detect({"PATH": "/usr/bin", "HOME": "/root"}, local_rank_arg=None).world == 1


def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "node07", "MASTER_PORT": "29511", "TORCHELASTIC_RUN_ID": "job7"}
    assert detect(env) == Launch(3, 4, 1, "node07", 29511, "torchrun")


def test_deepspeed_launcher_sets_the_torch_variables_and_passes_local_rank():
    # deepspeed.launcher.launch, on one node and on every node of a pdsh launch
    env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
           "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2"}
    assert detect(env, local_rank_arg=0) == Launch(2, 4, 0, "10.0.0.1", 29500, "deepspeed")
    del env["LOCAL_RANK"]  # --local_rank alone still gives the local rank
    assert detect(env, local_rank_arg=1).local_rank == 1


def test_deepspeed_mpich_and_impi_runners_set_torch_and_pmi_variables_that_agree():
    # --launcher mpich: mpirun -genv MASTER_ADDR/MASTER_PORT/WORLD_SIZE/LOCAL_SIZE; launcher_helper.py maps
    # PMI_RANK -> RANK and MPI_LOCALRANKID -> LOCAL_RANK. Not "two launchers".
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "9",
           "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "MASTER_ADDR": "node01",
           "MASTER_PORT": "29600"}
    assert detect(env) == Launch(3, 4, 1, "node01", 29600, "deepspeed")
    env["I_MPI_PIN"] = "0"  # --launcher impi: -env RANK/LOCAL_RANK per process, PMI_* from Intel MPI
    assert detect(env) == Launch(3, 4, 1, "node01", 29600, "deepspeed")


def test_open_mpi():
    # mpirun, or the deepspeed launcher with --launcher openmpi (it sets no torch variables, only UCX_TLS)
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "PMIX_RANK": "5", "UCX_TLS": "tcp"}
    assert detect(env) == Launch(5, 8, 1, "", 29500, "openmpi")  # "": rank 0's host, broadcast in init()
    env.update(MASTER_ADDR="node03", MASTER_PORT="29700")  # mpirun -x MASTER_ADDR=...
    assert detect(env) == Launch(5, 8, 1, "node03", 29700, "openmpi")


def test_mpich_and_intel_mpi():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "11",
           "PMI_HOSTNAME": "vm", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29123"}
    assert detect(env) == Launch(1, 2, 1, "127.0.0.1", 29123, "mpich")
    del env["MPI_LOCALRANKID"], env["MASTER_ADDR"]
    launch = detect(env)  # no local-rank variable: counted from host names with mpi4py in init()
    assert (launch.local_rank, launch.master_addr) == (-1, "")


def test_mvapich_sets_mv2_and_pmi_variables():
    env = {"MV2_COMM_WORLD_RANK": "2", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "0",
           "PMI_RANK": "2", "PMI_SIZE": "4", "MASTER_ADDR": "n1"}
    assert detect(env) == Launch(2, 4, 0, "n1", 29500, "mvapich")


def srun_env(procid=5, ntasks=6, localid=2, nodeid=1, nodelist="node[07-09]", **extra):
    """The variables a real `srun --nodes 3 --ntasks-per-node 2` sets for one task (job 123456, step 0)."""
    return {"SLURM_JOB_ID": "123456", "SLURM_JOBID": "123456", "SLURM_JOB_NAME": "semalign",
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": "3",
            "SLURM_NNODES": "3", "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
            "SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
            "SLURM_STEP_NODELIST": nodelist, "SLURM_STEP_NUM_NODES": "3", "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
            "SLURM_NODEID": str(nodeid), "SLURM_GTIDS": "2,3", "SLURMD_NODENAME": "node08",
            "SLURM_CPUS_PER_TASK": "8", **extra}


def test_srun():
    launch = detect(srun_env())
    assert launch == Launch(5, 6, 2, "node07", 20000 + 123456 % 20000, "slurm")
    assert detect(srun_env(MASTER_ADDR="10.1.2.3", MASTER_PORT="29400")) == \
        Launch(5, 6, 2, "10.1.2.3", 29400, "slurm")
    # srun --preserve-env keeps the allocation's SLURM_NTASKS; the step's own count is the world
    assert detect(srun_env(SLURM_NTASKS="12")).world == 6
    ranks = [detect(srun_env(procid=p, localid=p % 2, nodeid=p // 2)) for p in range(6)]
    assert [(r.rank, r.local_rank) for r in ranks] == [(p, p % 2) for p in range(6)]
    assert {r.master_addr for r in ranks} == {"node07"}


def test_the_batch_script_itself_and_one_task_steps_are_one_process():
    batch = {k: v for k, v in srun_env(procid=0, localid=0).items() if not k.startswith("SLURM_STEP")}
    assert detect(batch) == Launch()  # python run directly in an sbatch script with --ntasks 6: no srun step
    assert detect(srun_env(procid=0, ntasks=1, localid=0)).world == 1


def test_inner_launchers_win_over_outer_ones():
    # srun starts one torchrun per node: torchrun's variables name the rank
    torch_vars = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node07", "MASTER_PORT": "1234",
                  "TORCHELASTIC_RUN_ID": "123456"}
    assert detect({**srun_env(procid=1, ntasks=2, localid=0), **torch_vars}) == \
        Launch(3, 4, 1, "node07", 1234, "torchrun")
    # mpirun starts one torchrun per node
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert detect({**ompi, **torch_vars}).rank == 3
    # the deepspeed launcher (one per node) under srun
    ds = {k: v for k, v in torch_vars.items() if k != "TORCHELASTIC_RUN_ID"}
    assert detect({**srun_env(procid=1, ntasks=2), **ds, "CROSS_RANK": "1"}).launcher == "deepspeed"


def test_variables_of_two_launchers_that_disagree_are_refused():
    leftover = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    with pytest.raises(ConfigError, match=r"several launchers.*torch: rank 0 of 2; mpich: rank 1 of 2.*unset"):
        detect({**leftover, "PMI_RANK": "1", "PMI_SIZE": "2"})
    with pytest.raises(ConfigError, match="several launchers"):
        detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "PMI_RANK": "0", "PMI_SIZE": "2"})


def test_missing_or_bad_rendezvous_address():
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set for rank 1 of 2.*--rdzv_endpoint"):
        detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert detect({"RANK": "0", "WORLD_SIZE": "1"}).world == 1  # one process needs no rendezvous
    no_list = {k: v for k, v in srun_env().items() if "NODELIST" not in k}
    with pytest.raises(ConfigError, match="export MASTER_ADDR"):
        detect(no_list)
    with pytest.raises(ConfigError, match="WORLD_SIZE is not set"):
        detect({"RANK": "1", "MASTER_ADDR": "h"})
    with pytest.raises(ConfigError, match="RANK='x' is not an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ConfigError, match="rank 2 of a world of 2"):
        detect({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ConfigError, match="MASTER_PORT=70000 is not a TCP port"):
        detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"})
    with pytest.raises(ConfigError, match="does not resolve"):
        distributed._check_resolves(Launch(0, 2, 0, "no-such-host.invalid", 29500, "env"))


@pytest.mark.parametrize("nodelist,host", [
    ("node07", "node07"), ("node[07-09]", "node07"), ("node[07-09,12]", "node07"), ("gpu[3,5-6],cpu1", "gpu3"),
    ("node1,node2", "node1"), ("rack[2-3]-n[08-09]", "rack2-n08"), ("nid[001096-001099]-ib", "nid001096-ib"),
    ("a-b-c[10-11]", "a-b-c10"), (" node5 ", "node5"), ("", "")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_first_host_of_a_malformed_list():
    with pytest.raises(ConfigError, match="cannot read the SLURM node list"):
        first_host("node[07-09")


# --- hostfiles, .deepspeed_env, shell scripts -------------------------------------------------------------------------
def test_check_hostfile(tmp_path):
    good = tmp_path / "good"
    good.write_text("# comment\n\nnode01 slots=2\nnode02 slots=2  # spare\n")
    assert dict(check_hostfile(good, batch_size=8)) == {"node01": 2, "node02": 2}
    cases = {"node01 slots=2\nnode02\n": r"line 2 .*'node02' names no slots; write `node02 slots=N`",
             "node01:4\n": "MPICH's `host:N` form.*`node01 slots=4`",
             "node01 slots=0\n": "whole number >= 1",
             "node01 slots=2\nnode01 slots=2\n": "listed twice",
             "# nothing\n": "names no hosts",
             "node01 max_slots=4 slots=2\n": "right after the host name"}
    for text, message in cases.items():
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            check_hostfile(bad)
    with pytest.raises(ConfigError, match="starts 4 processes.*does not divide batch_size 6"):
        check_hostfile(good, batch_size=6)
    with pytest.raises(ConfigError, match="not found"):
        check_hostfile(tmp_path / "missing")


def test_shipped_hostfile_and_deepspeed_env_read_as_deepspeed_reads_them():
    from deepspeed.launcher.runner import _parse_hostfile
    path = os.path.join(SLURM, "hostfile.example")
    with open(path) as f:
        assert dict(_parse_hostfile(f.readlines())) == dict(check_hostfile(path, batch_size=8))
    # DeepSpeed 0.19 splits every line of .deepspeed_env at "=": no comments, no blank lines
    with open(os.path.join(SLURM, "deepspeed_env.example")) as f:
        lines = f.readlines()
    exported = dict(line.split("=", 1) for line in lines)
    assert all(key.strip().isidentifier() and value.strip() for key, value in exported.items())
    assert {"DS_ACCELERATOR", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"} <= set(exported)


def test_shell_scripts_parse():
    scripts = [os.path.join(dirpath, f) for dirpath, _, files in os.walk(os.path.join(ROOT, "launchers"))
               for f in files if f.endswith((".sh", ".sbatch"))]
    scripts.append(os.path.join(ROOT, ".ci", "run"))
    assert os.path.join(SLURM, "transfer.sbatch") in scripts
    for script in scripts:
        proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


@pytest.mark.slow
def test_the_distributed_cli():
    proc = subprocess.run([sys.executable, "-m", "semalign_ds.distributed", "check-hostfile",
                           os.path.join(SLURM, "hostfile.example"), "--batch-size", "6"],
                          capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and "does not divide batch_size 6" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "mpirun")), reason="no mpirun in the venv")
def test_real_mpirun_variables():
    proc = subprocess.run([os.path.join(BIN, "mpirun"), "-n", "2", sys.executable, "-m", "semalign_ds.distributed",
                           "show"], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the two ranks share one pipe: their lines may arrive joined, so each record is found on its own
    found = sorted(re.findall(r"Launch\([^)]*\)", proc.stdout))
    assert found == ["Launch(rank=0, world=2, local_rank=0, master_addr='', master_port=29500, launcher='mpich')",
                     "Launch(rank=1, world=2, local_rank=1, master_addr='', master_port=29500, launcher='mpich')"]


# --- real launches on loopback ----------------------------------------------------------------------------------------
def env(**extra):
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for name in ("SEMALIGN_DS_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in extra:
            e.pop(name, None)
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transfer_args(out):
    return [TRANSFER, "--config", TINY_YAML, "--output-dir", str(out)] + [f"--set={k}={v}" for k, v in SETTINGS.items()]


def launch(cmds, extra_env=None, timeout=240):
    """Start every command at once (the processes of one launch); wait for all; return their outputs."""
    procs = [subprocess.Popen(c, env=env(**(extra_env or {})), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


def assert_same_target(run, reference):
    a, b = (load_file(os.path.join(r, "target", "model.safetensors")) for r in (reference, run))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
    plans = [json.loads((r / "plan.json").read_text()) for r in (reference, run)]
    assert plans[0]["pairs"] == plans[1]["pairs"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-rank run (plain python, one thread) every launch is compared with."""
    out = tmp_path_factory.mktemp("launch") / "one"
    launch([[sys.executable] + transfer_args(out)])
    return out


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback(reference, tmp_path):
    out, port = tmp_path / "two-nodes", free_port()
    t0 = time.time()
    logs = launch([[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
                   + transfer_args(out) for node in (0, 1)])
    assert "distributed: 2 ranks started by torchrun" in logs[0], logs[0][-2000:]
    assert_same_target(out, reference)
    assert sorted(os.listdir(out / "frontier")) and all(".rank" in f for f in os.listdir(out / "frontier"))
    print(f"two torchrun nodes: {time.time() - t0:.0f} s")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "mpirun")), reason="no mpirun in the venv")
def test_mpirun(reference, tmp_path):
    out = tmp_path / "mpirun"
    logs = launch([[os.path.join(BIN, "mpirun"), "-n", "2", sys.executable] + transfer_args(out)],
                  {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert "distributed: 2 ranks started by mpich, master 127.0.0.1" in logs[0]
    assert_same_target(out, reference)


@pytest.mark.slow
def test_deepspeed_launcher_one_node(reference, tmp_path):
    out = tmp_path / "deepspeed"
    logs = launch([[sys.executable, os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port",
                    str(free_port())] + transfer_args(out)])
    assert "distributed: 2 ranks started by deepspeed" in logs[0]
    assert_same_target(out, reference)


@pytest.mark.slow
def test_deepspeed_launcher_two_nodes_without_ssh(reference, tmp_path):
    """The multi-node path of the deepspeed launcher (a hostfile of two nodes), each "node" started by hand with
    --no_ssh --node_rank, as on clusters without passwordless ssh."""
    out, port = tmp_path / "deepspeed-nodes", free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    check_hostfile(hostfile, batch_size=SETTINGS["batch_size"])
    launch([[sys.executable, os.path.join(BIN, "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank",
             str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)] + transfer_args(out)
            for node in (0, 1)])
    assert_same_target(out, reference)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "mpirun")), reason="no mpirun in the venv")
def test_deepspeed_launcher_with_mpich(reference, tmp_path):
    """--launcher mpich sets RANK/WORLD_SIZE/MASTER_ADDR next to MPICH's PMI_RANK/PMI_SIZE: one launch, not two."""
    out = tmp_path / "deepspeed-mpich"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    logs = launch([[sys.executable, os.path.join(BIN, "deepspeed"), "--hostfile", str(hostfile), "--force_multi",
                    "--no_ssh_check", "--launcher", "mpich", "--master_addr", "127.0.0.1", "--master_port",
                    str(free_port())] + transfer_args(out)],
                  {"PATH": BIN + os.pathsep + os.environ.get("PATH", "")})
    assert "distributed: 2 ranks started by deepspeed" in logs[0]
    assert_same_target(out, reference)


FAKE_SRUN = r"""#!/bin/bash
# srun on one machine: starts the step's tasks here, with the variables a real srun gives each task
ntasks=""; per_node=${SLURM_NTASKS_PER_NODE:-1}
while [[ "$1" == -* ]]; do
    case "$1" in
        --ntasks=*) ntasks=${1#*=} ;;
        -n) ntasks=$2; shift ;;
        --ntasks-per-node=*) per_node=${1#*=} ;;
    esac
    shift
done
ntasks=${ntasks:-$((SLURM_NNODES * per_node))}
per_node=$(( ntasks < per_node ? ntasks : per_node ))
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_STEP_ID=0 SLURM_STEPID=0 SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) \
        SLURM_NTASKS=$ntasks SLURM_STEP_NUM_TASKS=$ntasks SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_sbatch_script_on_a_fake_two_node_allocation(reference, tmp_path, launcher):
    """transfer.sbatch run as the batch step of a 2-node job, with srun/scontrol stand-ins that start the tasks on
    this machine: LAUNCHER=srun (SLURM variables name the ranks) and LAUNCHER=torchrun (one torchrun per node, c10d
    rendezvous at the first node)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(FAKE_SRUN)
    (stubs / "scontrol").write_text("#!/bin/bash\n[[ $1 == show ]] && printf '127.0.0.1\\n127.0.0.2\\n'\n")
    for f in stubs.iterdir():
        f.chmod(0o755)
    out = tmp_path / "run"
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "semalign", "SLURM_JOB_NODELIST": "node[01-02]",
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_SUBMIT_DIR": ROOT, "SLURM_CPUS_PER_TASK": "1", "CONFIG": TINY_YAML,
           "RUN_DIR": str(out), "LAUNCHER": launcher, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PATH": f"{stubs}{os.pathsep}{BIN}{os.pathsep}"
                                                                   f"{os.environ.get('PATH', '')}"}
    logs = launch([["bash", os.path.join(SLURM, "transfer.sbatch")] + [f"--set={k}={v}" for k, v in SETTINGS.items()]],
                  job)
    assert f"2 node(s) x 1 rank(s), launcher {launcher}, master 127.0.0.1" in logs[0], logs[0][-3000:]
    assert f"distributed: 2 ranks started by {'slurm' if launcher == 'srun' else 'torchrun'}" in logs[0]
    assert "summary of" in logs[0] and "launcher exited with status 0" in logs[0]
    assert_same_target(out, reference)


# the batch script's stop and return (USR1, time limit, requeue, resubmission): tests/test_slurm.py


# --- monitoring -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tensorboard_holds_per_stage_scalars(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(reference / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for k in (1, 2, 3):
        for name in ("loss", "lr", "grad_norm"):
            assert f"stage_{k}/{name}" in tags
        losses = acc.Scalars(f"stage_{k}/loss")
        assert [e.step for e in losses] == list(range(SETTINGS["stage_steps"]))
        assert all(e.value > 0 for e in losses)
        assert any(t.startswith(f"stage_{k}/tokens_per_s") for t in tags)
    assert any(t.startswith("cache/tokens_per_s") for t in tags)
    assert any(t.startswith("attribution/tokens_per_s") for t in tags)
    lines = [json.loads(line) for line in open(reference / "metrics.jsonl")]
    assert {"attribution", "cache", "stage_1", "stage_2", "stage_3"} <= {line["tag"] for line in lines}


@pytest.mark.slow
def test_one_screen_summary(reference):
    text = summary.summarize(str(reference))
    lines = text.splitlines()
    assert len(lines) <= 24
    assert all(len(line) <= 120 for line in lines if str(reference) not in line), text
    for word in ("attribution", "cache", "stage 1", "stage 3", "NLL", "gap closed", "export"):
        assert word in text, text
    assert f"{SETTINGS['stage_steps']} steps/stage," in text
    for cfg, said in (({"method": "output_kd", "stage_steps": 19}, "19 steps per target layer, all layers at once"),
                      ({"method": "semalign", "stage_steps": 16, "joint_steps": 9}, "16 steps/stage + 9 joint"),
                      ({"method": "semalign", "stage_steps": 0, "joint_steps": 187}, "187 joint steps (no stages)")):
        assert summary._schedule(cfg) == said
    report = json.loads((reference / "report.json").read_text())
    if report["gap_closed"] is None:  # the tiny random target starts below its source: no gap to close
        assert report["target_before"]["nll"] <= report["source"]["nll"] and "undefined" in text
    rates = summary.phase_rates(str(reference))
    assert all(rates[f"stage_{k}"]["tokens"] > 0 and rates[f"stage_{k}"]["steps"] == 3 for k in (1, 2, 3))
    assert rates["cache"]["tokens_per_s_total"] > 0
    mem = summary.memory_scalars("cpu")
    assert mem["rss_peak_mib"] >= mem.get("rss_mib", 0) > 0


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_phase_peaks_and_released_memory():
    """Freed memory is handed back (glibc would keep it resident), and a phase's peak is its own while the
    process's peak still counts the earlier ones; run in a fresh process, away from this one's history."""
    code = """
import torch
from semalign_ds import summary
summary.release_memory()
summary.reset_phase_peak()
base = summary.memory_scalars()
x = torch.rand(300, 2**18, dtype=torch.float64)  # 600 MiB, touched
big = summary.memory_scalars(phase_peak=True)
del x
summary.release_memory()
after = summary.memory_scalars(phase_peak=True)
assert summary.reset_phase_peak()
small = torch.rand(25, 2**18, dtype=torch.float64)  # 50 MiB
later = summary.memory_scalars(phase_peak=True)
print(base["rss_mib"], big["rss_mib"], after["rss_mib"], big["rss_phase_peak_mib"], later["rss_phase_peak_mib"],
      later["rss_peak_mib"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    base, big, after, peak1, peak2, whole = map(float, out.stdout.split())
    assert big - base > 550 and peak1 > big - 5  # VmHWM is updated lazily: it may lag VmRSS by a few pages
    assert after - base < 100, (base, big, after)  # handed back
    assert after - 20 < peak2 < peak1 - 450  # the new phase's peak: not the 600 MiB of the last one
    assert whole > peak1 - 5  # the process's peak remembers it


@pytest.mark.slow
def test_benchmark_bookkeeping(reference, tmp_path):
    """The benchmark's table and CSV rows from a finished run (the benchmark's own runs take minutes)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "launchers", "benchmark.py"))
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    mem_dir = tmp_path / "memory"
    mem_dir.mkdir()
    (mem_dir / "rank0.json").write_text(json.dumps({"rank": 0, "rss_peak_mib": 500.0}))
    one = {"world": 1, "threads": 1, "wall": 10.0, **benchmark.measure(str(reference), str(mem_dir), 1, 10.0)}
    two = {**one, "world": 2, "memory": [500.0, 480.0]}
    text = benchmark.table([one, two])
    assert "cache" in text and "stage 3" in text and "rank 1: 480" in text
    csv_path = tmp_path / "results.csv"
    args = type("Args", (), {"config": TINY_YAML, "set": ["stage_steps=3"]})()
    benchmark.append_rows(str(csv_path), [one, two], args, cores=2)
    import csv
    rows = list(csv.DictReader(open(csv_path)))
    assert {r["phase"] for r in rows} >= {"attribution", "cache", "stage_1", "stage_3", "run"}
    assert {r["world"] for r in rows} == {"1", "2"} and all(r["torch"] and r["date"] for r in rows)
    assert all(r["speedup_vs_1"] for r in rows if r["world"] == "2" and r["phase"] != "attribution"
               and r["tokens_per_s_total"] != "-")
    # each phase's own peak on rank 0 (from its memory/ line; the plan's line ends attribution)
    assert all(float(r["rank0_phase_peak_mib"]) > 0 for r in rows if r["phase"] in ("attribution", "cache"))
    assert "peak MiB within each phase: attribution" in text
    # a results file from before that column: rewritten with it, the old rows kept
    old_columns = benchmark.COLUMNS[:-1]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    benchmark.append_rows(str(csv_path), [one], args, cores=2)
    again = list(csv.DictReader(open(csv_path)))
    assert list(again[0]) == benchmark.COLUMNS and len(again) == len(rows) + len(one["phases"])
    assert [r["seconds"] for r in again[:len(rows)]] == [r["seconds"] for r in rows]
    assert all(r["rank0_phase_peak_mib"] == "" for r in again[:len(rows)])
    shutil.rmtree(mem_dir)
