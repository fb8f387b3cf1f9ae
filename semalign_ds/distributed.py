"""Who this process is in a distributed run, and the few collectives the pipeline uses.

This is the one module that reads launcher variables. It understands plain `python` (one process), torchrun and
the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), mpirun/mpiexec (Open MPI's
OMPI_COMM_WORLD_*, MPICH/Intel MPI's PMI_*; the master address from MASTER_ADDR when given, else rank 0's host
name broadcast with mpi4py) and srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the master from the first host of
SLURM_JOB_NODELIST). Everything else asks this module.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from semalign_ds.config import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "single"


_TORCH = ("RANK", "WORLD_SIZE")
_OMPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
_PMI = ("PMI_RANK", "PMI_SIZE")
_SLURM = ("SLURM_PROCID", "SLURM_NTASKS")


def detect(env=None, local_rank_arg=None) -> Launch:
    """The launch this process belongs to, from its environment (a pure function of `env`)."""
    env = os.environ if env is None else env
    found = [name for name, keys in (("torch", _TORCH), ("openmpi", _OMPI), ("mpich", _PMI)) if keys[0] in env]
    # srun sets SLURM_PROCID for every step, also around torchrun/deepspeed/mpirun: those take precedence.
    if not found and _SLURM[0] in env and int(env.get(_SLURM[1], "1")) > 1:
        found = ["slurm"]
    if len(found) > 1:
        raise ConfigError(f"launcher variables of several launchers are set ({', '.join(found)}): start the run "
                          f"with one launcher, or unset the others' variables (e.g. RANK/WORLD_SIZE left over "
                          f"from a torchrun shell inside mpirun)")
    if not found:
        return Launch(local_rank=int(local_rank_arg or 0))
    kind = found[0]
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    if kind == "torch":
        _require(env, ("WORLD_SIZE", "MASTER_ADDR"), "torchrun / the deepspeed launcher")
        local = env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0)
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(local), env["MASTER_ADDR"], port, "torch")
    if kind == "slurm":
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        if not addr:
            raise ConfigError("srun run without MASTER_ADDR or SLURM_JOB_NODELIST: export MASTER_ADDR (the first "
                              "node of the job) in the batch script")
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), addr,
                      port, "slurm")
    keys = _OMPI if kind == "openmpi" else _PMI
    local = env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("MPI_LOCALRANKID") or env.get("PMI_LOCAL_RANK")
    addr = env.get("MASTER_ADDR")
    return Launch(int(env[keys[0]]), int(env[keys[1]]), int(local or 0), addr or "", port, "mpi")


def _require(env, names, launcher):
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not set for a {launcher} run: set them (MASTER_ADDR is the "
                          f"address of the rank-0 node, reachable from every node)")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    if not nodelist:
        return ""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _mpi_master(launch: Launch) -> Launch:
    """mpirun gives no master address: rank 0 broadcasts its host name (unless MASTER_ADDR was given)."""
    if launch.master_addr:
        return launch
    from mpi4py import MPI
    addr = MPI.COMM_WORLD.bcast(socket.gethostname() if launch.rank == 0 else None, root=0)
    return Launch(launch.rank, launch.world, launch.local_rank, addr, launch.master_port, launch.launcher)


_launch = Launch()


def init(local_rank_arg=None, timeout_minutes=30) -> Launch:
    """Join the process group when there is more than one rank (gloo on CPU, nccl on CUDA)."""
    global _launch
    launch = detect(local_rank_arg=local_rank_arg)
    if launch.launcher == "mpi":
        launch = _mpi_master(launch)
    _launch = launch
    if launch.world == 1 or dist.is_initialized():
        return launch
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world), LOCAL_RANK=str(launch.local_rank),
                      MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(launch.local_rank)
    import deepspeed
    if not cuda and os.environ.get("SEMALIGN_DS_SHM_COMM", "0") != "1":
        # DeepSpeed JIT-compiles a shared-memory op for CPU collectives (~1 min); gloo alone is enough here.
        compat = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compat, dict):
            compat["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    return launch


def launch() -> Launch:
    return _launch


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(n, r=None, w=None):
    """Indices 0..n-1 of rank r among w ranks (strided, so that ranks get near-equal shares)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return list(range(r, n, w))


def shutdown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
