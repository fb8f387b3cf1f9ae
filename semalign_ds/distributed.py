"""Who this process is in a distributed run, and the few collectives the pipeline uses.

This is the one module that reads launcher variables; everything else asks it. `detect(env)` is a pure function
of the environment and knows:

- plain `python`: one process;
- torchrun, one node or several (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; TORCHELASTIC_RUN_ID);
- the deepspeed launcher: on one node and with --launcher pdsh it starts `deepspeed.launcher.launch` on each node,
  which sets the torchrun variables and passes --local_rank; with --launcher mpich or impi it starts mpirun and
  sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR next to MPI's own PMI_RANK/PMI_SIZE (the two agree: that is one
  launcher, not two); with --launcher openmpi, mvapich or slurm it sets none of them and the MPI or srun variables
  below apply;
- mpirun/mpiexec: Open MPI (OMPI_COMM_WORLD_*), MPICH and Intel MPI (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID),
  MVAPICH (MV2_COMM_WORLD_*); the master address is MASTER_ADDR when given, else rank 0's host name, broadcast
  with mpi4py in init();
- srun: a task of a job step (SLURM_STEP_ID is set) with SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS),
  SLURM_LOCALID; the master is MASTER_ADDR, else the first host of the step's node list. A batch script itself
  also has SLURM_PROCID=0 and SLURM_NTASKS, but no step: `python` run there directly is one process.

Launchers nest: torchrun is always the innermost (it starts the Python processes), so under torchrun its variables
win over those of an srun or mpirun that started one torchrun per node; srun's variables give way to any other
launcher's. Two launchers' variables that disagree otherwise (RANK=0 left in the shell of an `mpirun -n 2`) are an
error that says which values clash.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import re
import shutil
import signal
import socket
import sys
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from semalign_ds.config import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # -1: not told by the launcher (mpirun without a local-rank variable): found in init()
    master_addr: str = "127.0.0.1"  # "": not told (mpirun without MASTER_ADDR): rank 0's host name, in init()
    master_port: int = DEFAULT_PORT
    launcher: str = "single"  # single | torchrun | deepspeed | env | openmpi | mpich | mvapich | slurm


# MPI flavours: (name, rank variable, size variable, local-rank variables). MVAPICH and Intel MPI also set PMI_*.
_MPI = (("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
        ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", ("MV2_COMM_WORLD_LOCAL_RANK",)),
        ("mpich", "PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID", "PMI_LOCAL_RANK")))
_MPI_LOCAL = tuple(v for _, _, _, local in _MPI for v in local)


def detect(env=None, local_rank_arg=None) -> Launch:
    """The launch this process belongs to, from its environment (a pure function of `env`)."""
    env = os.environ if env is None else env
    found = OrderedDict()  # launcher family -> (rank, world), as its variables say
    if "RANK" in env or "WORLD_SIZE" in env:
        found["torch"] = (_int(env, "RANK", "the deepspeed launcher/torchrun"),
                          _int(env, "WORLD_SIZE", "the deepspeed launcher/torchrun"))
    for name, rank_var, size_var, _ in _MPI:
        if rank_var in env:
            found[name] = (_int(env, rank_var, "mpirun"), _int(env, size_var, "mpirun"))
    if "torch" in found and env.get("TORCHELASTIC_RUN_ID"):
        kind = "torch"  # torchrun started this process: any MPI variables belong to an outer launcher
    else:
        if len(set(found.values())) > 1:
            said = "; ".join(f"{name}: rank {r} of {w}" for name, (r, w) in found.items())
            raise ConfigError(
                f"launcher variables of several launchers are set and disagree ({said}): start the run with one "
                f"launcher, and unset the variables another one left behind (e.g. RANK/WORLD_SIZE exported in the "
                f"shell that runs mpirun: `unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT`)")
        kind = next(iter(found), None)  # torch first: the deepspeed launcher's MPI runners set both, in agreement
    if kind is None and _srun_task(env):
        tasks = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS", "srun")
        if tasks > 1:
            kind, found["slurm"] = "slurm", (_int(env, "SLURM_PROCID", "srun"), tasks)
    if kind is None:
        return Launch(local_rank=int(local_rank_arg or 0))
    rank, world = found[kind]
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank {rank} of a world of {world} from the {kind} launcher variables: a rank must lie in "
                          f"0..world-1; check how the job was started")
    if kind == "torch":
        launcher = ("torchrun" if env.get("TORCHELASTIC_RUN_ID")
                    else "deepspeed" if "CROSS_RANK" in env or "LOCAL_SIZE" in env else "env")
        local = env.get("LOCAL_RANK")
        if local is None:
            local = local_rank_arg if local_rank_arg is not None else _first(env, _MPI_LOCAL, "0")
    elif kind == "slurm":
        launcher, local = "slurm", env.get("SLURM_LOCALID", "0")
    else:
        launcher = kind
        local = _first(env, next(v for n, _, _, v in _MPI if n == kind), None)
        local = _first(env, _MPI_LOCAL, "-1") if local is None else local
    local = _int({"local rank": local}, "local rank", launcher)
    if world == 1:
        return Launch(local_rank=max(local, 0), launcher=launcher)
    port = _port(env)
    if kind == "torch":
        if not env.get("MASTER_ADDR"):
            raise ConfigError(
                f"MASTER_ADDR is not set for rank {rank} of {world} ({launcher} variables): it is the address of "
                f"the rank-0 node, reachable from every node; torchrun and the deepspeed launcher set it (torchrun "
                f"--master_addr HOST or --rdzv_endpoint HOST:PORT, deepspeed --master_addr HOST), and when you set "
                f"RANK/WORLD_SIZE yourself export MASTER_ADDR and MASTER_PORT too")
        return Launch(rank, world, local, env["MASTER_ADDR"], port, launcher)
    if kind == "slurm":
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                                                    or env.get("SLURM_NODELIST") or "")
        if not addr:
            raise ConfigError("srun task without MASTER_ADDR or a SLURM node list (SLURM_STEP_NODELIST, "
                              "SLURM_JOB_NODELIST): export MASTER_ADDR, the first node of the job, in the batch "
                              "script (`export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | "
                              "head -n 1)`)")
        if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID", "").isdigit():
            # jobs that share a first node must not share a port: derive it from the job id
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
        return Launch(rank, world, local, addr, port, "slurm")
    return Launch(rank, world, local, env.get("MASTER_ADDR", ""), port, launcher)


def _srun_task(env):
    """A task that srun started (a job step); the batch script's own process has SLURM_PROCID but no step."""
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


def _first(env, names, default):
    return next((env[n] for n in names if n in env), default)


def _int(env, name, launcher):
    value = env.get(name)
    if value is None:
        raise ConfigError(f"{name} is not set, but other {launcher} variables are: a partial launcher environment "
                          f"(set both RANK and WORLD_SIZE, or neither; start MPI runs with mpirun/mpiexec)")
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer ({launcher}): check the launch command or the "
                          f"variables exported to it") from None


def _port(env):
    port = _int(env, "MASTER_PORT", "the launcher") if env.get("MASTER_PORT") else DEFAULT_PORT
    if not 0 < port < 65536:
        raise ConfigError(f"MASTER_PORT={port} is not a TCP port: use a free port in 1024..65535")
    return port


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03', 'rack[2-3]-n[08-09]' -> 'rack2-n08'."""
    nodelist = (nodelist or "").strip()
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]
    if entry.count("[") != entry.count("]") or "[]" in entry:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}: expected names like 'node07', "
                          f"'node[07-09,12]' or 'a[1-2]-b[3-4]'; export MASTER_ADDR instead")
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,:]", m.group(1).strip())[0], entry)


def check_hostfile(path, batch_size=None) -> "OrderedDict[str, int]":
    """Hosts and slots of a deepspeed-launcher hostfile (`HOST slots=N` per line, # comments), checked before a
    multi-node launch with messages that say how to fix each line; with batch_size, also that the total number of
    slots (the world size) divides it."""
    if not os.path.isfile(path):
        raise ConfigError(f"hostfile {path} not found: write one line per node, `HOST slots=N` (N processes on "
                          f"that node: its GPUs, or 1-2 per CPU socket), see launchers/slurm/hostfile.example")
    pool = OrderedDict()
    with open(path) as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{path}, line {number} ({raw.strip()!r})"
            words = line.split()
            host = words[0]
            m = re.fullmatch(r"([^\s:]+):(\d+)", host)
            if m:
                raise ConfigError(f"{where}: this is MPICH's `host:N` form; the deepspeed launcher reads "
                                  f"`{m.group(1)} slots={m.group(2)}`")
            slots = [w for w in words[1:] if w.startswith("slots=")]
            if not slots:
                raise ConfigError(f"{where}: host {host!r} names no slots; write `{host} slots=N`, N the number "
                                  f"of processes to start there (its GPUs; on CPU nodes 1-2 per socket)")
            value = slots[0][len("slots="):]
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{where}: slots must be a whole number >= 1, got {value!r}")
            if words[1] != slots[0]:
                raise ConfigError(f"{where}: the deepspeed launcher wants `slots=N` right after the host name")
            if host in pool:
                raise ConfigError(f"{where}: host {host!r} is listed twice; give it one line with all its slots")
            pool[host] = int(value)
    if not pool:
        raise ConfigError(f"hostfile {path} names no hosts: write one line per node, `HOST slots=N`")
    world = sum(pool.values())
    if batch_size is not None and batch_size % world:
        hosts = ", ".join(f"{h}: {s}" for h, s in pool.items())
        raise ConfigError(f"hostfile {path} starts {world} processes ({hosts}), which does not divide batch_size "
                          f"{batch_size}: change the slots or set batch_size to a multiple of {world}")
    return pool


def _mpi_fill(launch: Launch) -> Launch:
    """What mpirun does not say: the master (rank 0's host name) and the local rank (ranks on the same host)."""
    if launch.master_addr and launch.local_rank >= 0:
        return launch
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    addr = launch.master_addr or comm.bcast(socket.gethostname() if launch.rank == 0 else None, root=0)
    local = launch.local_rank
    if local < 0:
        names = comm.allgather(MPI.Get_processor_name())
        local = names[:launch.rank].count(names[launch.rank])
    return replace(launch, master_addr=addr, local_rank=local)


def _check_resolves(launch: Launch):
    try:
        socket.getaddrinfo(launch.master_addr, launch.master_port)
    except socket.gaierror as err:
        raise ConfigError(f"the master address {launch.master_addr!r} ({launch.launcher} launch) does not resolve "
                          f"on this node ({err}): set MASTER_ADDR to a host name or IP address of the rank-0 node "
                          f"that every node can reach") from None


_launch = Launch()


def _die_with_parent():
    """Workers of torchrun and the deepspeed launcher end when their launcher does (a SIGKILLed agent would
    otherwise leave them running, and a rerun would race them)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def init(local_rank_arg=None, timeout_minutes=30) -> Launch:
    """Join the process group when there is more than one rank (gloo on CPU, nccl on CUDA)."""
    global _launch
    launch = detect(local_rank_arg=local_rank_arg)
    if launch.world > 1 and launch.launcher in ("openmpi", "mpich", "mvapich"):
        launch = _mpi_fill(launch)
    _launch = launch
    if launch.world == 1 or dist.is_initialized():
        return launch
    _check_resolves(launch)
    if launch.launcher in ("torchrun", "deepspeed", "env"):
        _die_with_parent()
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world), LOCAL_RANK=str(launch.local_rank),
                      MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(launch.local_rank)
    import deepspeed
    _skip_shm_comm(cuda)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    if dist.get_backend() == "gloo":
        _gather_by_broadcasts()
        # through the slots: reading the other ranks' memory (direct=True) gathered 1.5x faster on an AMD EPYC
        # (benchmarks/collectives.md) and gave a 1.5B forward nothing on an Intel Xeon (benchmarks/lockstep.md)
        _shared["gather"] = SharedGather.open(direct=False)
    if launch.rank == 0:
        print(f"distributed: {launch.world} ranks started by {launch.launcher}, master "
              f"{launch.master_addr}:{launch.master_port}", flush=True)
    return launch


def _skip_shm_comm(cuda):
    """DeepSpeed JIT-compiles a shared-memory op for CPU collectives (minutes on 2 cores; a compile killed halfway
    leaves a lock that hangs the next run); gloo alone is enough here."""
    if cuda or os.environ.get("SEMALIGN_DS_SHM_COMM", "0") == "1":
        return
    import deepspeed
    compat = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compat, dict):
        compat["deepspeed_shm_comm"] = False


def _gather_by_broadcasts():
    """DeepSpeed's all-gathers (ZeRO-3's parameter gathers, ZeRO-1/2's updated partitions) as gather_into():
    with gloo they are most of what a second rank costs a ZeRO-3 source on CPU. Its all-reduces (ZeRO-2's
    gradients) through reduce_into() where every rank is on this host."""
    from deepspeed import comm
    backend = comm.comm.cdb
    backend.all_gather_function = gather_into
    plain = backend.all_reduce

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if backend._reduce_op(op) == dist.ReduceOp.SUM and reduce_into(tensor, group):
            return _Works([]) if async_op else None
        return plain(tensor, op, group, async_op)

    backend.all_reduce = all_reduce


def reduce_into(tensor, group=None):
    """Sum `tensor` over the ranks in place through SharedGather's slots when every rank is on this host and it is a
    contiguous floating-point tensor on the CPU (True; the same bits on every rank), else False: the caller reduces
    it as before. gloo's all-reduce of a 2-rank ZeRO-2 stage's gradients (74 MB) took 0.13 s."""
    shared = _shared["gather"]
    if (shared is None or tensor.device.type != "cpu" or not tensor.is_floating_point() or not tensor.is_contiguous()
            or shared.slot % tensor.element_size() or dist.get_world_size(group) != shared.world
            or dist.get_rank(group) != shared.rank):
        return False
    shared.reduce(tensor, group)
    return True


class _Works:
    """Several asynchronous collectives waited on as one."""

    def __init__(self, works):
        self.works = works

    def wait(self, timeout=None):
        for work in self.works:
            work.wait()
        return True

    def is_completed(self):
        return all(work.is_completed() for work in self.works)


def gather_into(output_tensor, input_tensor, group=None, async_op=False):
    """torch.distributed.all_gather_into_tensor on gloo: through shared memory when every rank is on one host
    (SharedGather), else as one broadcast per rank, of its share. gloo's own all-gather moved 0.46-0.50 GiB/s into
    each rank of 2 on this project's 2-core machine, the broadcasts 1.13-1.37 (0.36-0.41 and 0.74-0.88 at 4 ranks;
    8-256 MiB shares, benchmarks/collectives.md); NCCL has its own and does not come here."""
    w, me = dist.get_world_size(group), dist.get_rank(group)
    weights = _shared["weights"]
    if weights is not None and w == weights.world and weights.gather(output_tensor, input_tensor):
        return _Works([]) if async_op else None
    shared = _shared["gather"]
    if shared is not None and w == shared.world and me == shared.rank:
        shared.gather(output_tensor, input_tensor, group)
        return _Works([]) if async_op else None
    parts = output_tensor.view(w, -1)  # contiguous, w equal shares
    if parts[me].data_ptr() != input_tensor.data_ptr():
        parts[me].copy_(input_tensor.reshape(-1))
    works = _Works([dist.broadcast(parts[i], group=group, group_src=i, async_op=True) for i in range(w)])
    return works if async_op else works.wait() and None


_shared = {"gather": None, "weights": None, "rows": None}


def use_partitions(weights):
    """Let the gathers map the frozen source's partitions from `weights` (a shared_weights.SharedPartitions made
    by shared_weights.share), or copy as before where it is None."""
    _shared["weights"] = weights
    return weights


def use_rows(rows):
    """Let vocab_parallel read every rank's rows of the source's vocabulary matrices in place from `rows` (a
    shared_weights.SharedPartitions made by shared_weights.share_rows), or exchange values as before where None."""
    _shared["rows"] = rows
    return rows


def shared_rows():
    return _shared["rows"]


def one_host():
    """Whether every rank is on this host (and /dev/shm had room for SharedGather's slots)."""
    return _shared["gather"] is not None


def shares_partitions():
    return _shared["weights"] is not None


def unshare_partitions():
    """Drop the shared file of shared_weights.share (its memory goes once the model's partitions are freed too)."""
    weights, _shared["weights"] = _shared["weights"], None
    _shared["rows"] = None  # the rows read from it keep it open as long as they live
    if weights is not None:
        weights.close()


class SharedGather:
    """All-gathers among ranks on one host through a file in /dev/shm that every rank maps: each rank copies its
    share into its slot and, after a barrier, copies every slot into its output (two memory copies, where a gloo
    collective sends each share through a loopback socket). Shares larger than a slot go in pieces. The slots come
    in two sets used in turn, so one barrier per piece is enough: a rank a piece ahead writes the other set, and
    it cannot get two pieces ahead before every rank has passed the barrier that follows their reading.

    Where the ranks may read each other's memory (process_vm_readv: Linux, same user, no ptrace restriction;
    checked once, in open()), a gather is one copy instead: each rank puts where its share lies in its header,
    and after a barrier reads the others' shares straight into its output; a second barrier keeps every share in
    place until all have read it."""

    SLOT_BYTES = 4 << 20  # per rank and set: 16 MiB mapped by each of 2 ranks, 32 MiB by each of 4

    def __init__(self, path, world, rank, slot_bytes=None):
        self.world, self.rank, self.path = world, rank, path
        self.slot = slot_bytes or self.SLOT_BYTES
        self.slots = torch.from_file(path, shared=True, size=self.file_bytes(world, self.slot),
                                     dtype=torch.uint8).view(2, world, self.slot)
        self.turn = 0
        self.pids = None  # every rank's process id, when the ranks read each other's shares directly

    def _head(self, rank):
        """Where rank's share lies, in its process: the first 8 bytes of its first slot."""
        return self.slots[0, rank, :8].view(torch.int64)

    @classmethod
    def file_bytes(cls, world, slot_bytes=None):
        """The shared file's size: two sets of one slot per rank (open() wants four times that free)."""
        return 2 * world * (slot_bytes or cls.SLOT_BYTES)

    @classmethod
    def open(cls, slot_bytes=None, direct=True):
        """Every rank's SharedGather when all ranks are on this host and /dev/shm has room (a collective call), else
        None (and gather_into broadcasts); with direct, reading the others' shares straight from their memory
        where that works. The file is unlinked once every rank has mapped it: nothing is left behind, whatever ends
        the run."""
        w, me = dist.get_world_size(), dist.get_rank()
        size = cls.file_bytes(w, slot_bytes)
        here = (socket.gethostname(), _boot_id())
        hosts = [None] * w
        dist.all_gather_object(hosts, here)
        path = shm_file("", size, room=4, allowed=all(h == here for h in hosts))
        shared = None
        if path is not None:
            try:
                shared = cls(path, w, me, slot_bytes)
            except (OSError, RuntimeError):
                shared = None
        if not agreed(shared is not None, path):
            return None
        if direct and shared.slot % 8 == 0:
            shared.pids = _readable_peers()
        return shared

    def gather(self, output_tensor, input_tensor, group=None):
        out = output_tensor.view(-1).view(torch.uint8).view(self.world, -1)
        share = input_tensor.reshape(-1).view(torch.uint8)
        if out[self.rank].data_ptr() != share.data_ptr():  # (ZeRO-3 passes its share in place)
            out[self.rank].copy_(share)
        others = [r for r in range(self.world) if r != self.rank]
        if self.pids is not None:
            self._head(self.rank)[0] = out[self.rank].data_ptr()
            dist.barrier(group)
            for r in others:
                _read_peer(self.pids[r], int(self._head(r)[0]), out[r])
            dist.barrier(group)
            return
        for start in range(0, share.numel(), self.slot):
            n = min(self.slot, share.numel() - start)
            slots = self.slots[self.turn]
            self.turn ^= 1
            slots[self.rank, :n].copy_(share[start:start + n])
            dist.barrier(group)
            for r in others:
                out[r, start:start + n].copy_(slots[r, :n])


    def reduce(self, tensor, group=None):
        """Sum the contiguous CPU `tensor` over the ranks in place: each rank copies a piece into its slot and, after
        a barrier, sums every slot's piece in rank order (so every rank gets the same bits). The two sets of slots
        are used in turn, as in gather."""
        flat = tensor.view(-1)
        per = self.slot // flat.element_size()
        for start in range(0, flat.numel(), per):
            n = min(per, flat.numel() - start)
            slots = self.slots[self.turn].view(flat.dtype)  # [world, per]
            self.turn ^= 1
            piece = flat[start:start + n]
            slots[self.rank, :n].copy_(piece)
            dist.barrier(group)
            torch.sum(slots[:, :n], dim=0, out=piece)


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _process_vm_readv():
    try:
        fn = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return None
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.POINTER(_IOVec), ctypes.c_ulong,
                   ctypes.c_ulong]
    return fn


def _read_peer(pid, address, into):
    """Copy into.numel() bytes at `address` in process `pid` into the contiguous uint8 tensor `into`."""
    n, done = into.numel(), 0
    while done < n:
        local = _IOVec(into.data_ptr() + done, n - done)
        remote = _IOVec(address + done, n - done)
        got = _readv["fn"](pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            err = ctypes.get_errno()
            raise OSError(err, f"reading {n} bytes of rank process {pid}: {os.strerror(err)}")
        done += got


_readv = {"fn": None}


def _readable_peers():
    """Every rank's process id when each rank can read a test value out of every other rank's memory (a
    collective call), else None: ptrace restrictions (Yama's ptrace_scope 1 and up, seccomp) refuse it."""
    import secrets
    _readv["fn"] = _readv["fn"] or _process_vm_readv()
    probe = torch.tensor(list(secrets.token_bytes(16)), dtype=torch.uint8)
    peers = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (os.getpid(), probe.data_ptr(), probe.tolist()))
    ok = _readv["fn"] is not None
    for r, (pid, address, value) in enumerate(peers):
        if ok and r != dist.get_rank():
            seen = torch.empty(16, dtype=torch.uint8)
            try:
                _read_peer(pid, address, seen)
            except OSError:
                ok = False
            ok = ok and seen.tolist() == value
    agreed = torch.tensor([float(ok)])
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # probe stays alive until every rank has read it
    return [pid for pid, _, _ in peers] if agreed.item() == 1.0 else None


def shm_file(tag, size, room, allowed=True):
    """The path of a new file of `size` bytes in /dev/shm (named semalign-ds-TAGPID-RANDOM), made by rank 0 where
    `allowed` there and /dev/shm has `room` times `size` free; None on every rank otherwise (a collective call).
    Pass the path to agreed() once every rank has opened or mapped it."""
    import secrets
    path = None
    if dist.get_rank() == 0 and allowed and size and _shm_free() >= room * size:
        path = f"/dev/shm/semalign-ds-{tag}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
            os.close(fd)
        except OSError:
            path = None
    return broadcast_object(path)


def agreed(ok, path=None):
    """Whether `ok` holds on every rank (a collective call); rank 0 then unlinks the shm_file at `path`, which every
    rank has opened or failed to: nothing is left behind, whatever ends the run."""
    flag = torch.tensor([float(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if dist.get_rank() == 0 and path is not None:
        os.unlink(path)
    return flag.item() == 1.0


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _shm_free():
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0


def group_for_deepspeed():
    """DeepSpeed engines need a process group: a lone process (a DeepSpeed config on one rank) gets a world of one
    on a free loopback port, made as init() makes groups (without the shm op)."""
    if dist.is_initialized():
        return
    import deepspeed
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    _skip_shm_comm(cuda)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)


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


def comm_device() -> torch.device:
    """Where the backend's tensors live: this rank's GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _in_place(t: torch.Tensor, collective) -> torch.Tensor:
    """collective(t) in place, wherever t lives (NCCL takes only GPU tensors: a CPU t goes through this rank's GPU
    and back)."""
    if not dist.is_initialized():
        return t
    dev = comm_device()
    if t.device == dev:
        collective(t)
    else:
        moved = t.to(dev)
        collective(moved)
        t.copy_(moved)
    return t


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    return _in_place(t, lambda u: dist.all_reduce(u, op=op))


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    """t of rank src into t on every rank (the same shape everywhere)."""
    return _in_place(t, lambda u: dist.broadcast(u, src=src))


def reduce_sum_to(t: torch.Tensor, dst: int) -> torch.Tensor:
    """The sum over the ranks of t, into t on rank dst (on the others t is left undefined)."""
    return _in_place(t, lambda u: dist.reduce(u, dst=dst, op=dist.ReduceOp.SUM))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def row_counts(n: int) -> list:
    """[n of rank 0, n of rank 1, ...] on every rank."""
    if not dist.is_initialized():
        return [n]
    mine = torch.tensor([n], dtype=torch.int64, device=comm_device())
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(c) for c in sizes]


def all_gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(every rank's x concatenated along dim 0 in rank order, each rank's row count): the ranks' x may differ in
    their first dimension only."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, [x.shape[0]]
    home, x = x.device, x.to(comm_device())
    counts = row_counts(x.shape[0])
    most = max(max(counts), 1)
    padded = x.contiguous()
    if x.shape[0] != most:  # the ranks' shapes must agree: pad to the longest
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[:x.shape[0]] = x
    parts = padded.new_empty((len(counts), *padded.shape))
    (gather_into if dist.get_backend() == "gloo" else dist.all_gather_into_tensor)(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(home), counts


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


def lockstep(batches, collective=True, filler=None):
    """This rank's `batches` as (batch, real) pairs, padded with repeats of its first batch (real=False) so that
    every rank runs as many as the busiest one. The one place that knows the rule: under ZeRO-3 every forward
    gathers parameters collectively, and under ZeRO-2 every backward reduces gradients collectively, so a rank
    that stops early hangs the others. A rank with no batch of its own repeats `filler` (default `[0]`). A None in
    `batches` (this rank has no batch at a step where others have one) is a repeat too, of `filler` when given,
    else of the first batch; without `collective` it is dropped."""
    if not collective:
        return [(b, True) for b in batches if b is not None]
    batches = list(batches)
    real = [b for b in batches if b is not None]
    most = max(all_gather_object(len(batches)))
    gap = filler if filler is not None else (real[0] if real else [0])
    pad = real[0] if real else gap
    return [(gap, False) if b is None else (b, True) for b in batches] + [(pad, False)] * (most - len(batches))


def shard(n, r=None, w=None):
    """Indices 0..n-1 of rank r among w ranks (strided, so that ranks get near-equal shares)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return list(range(r, n, w))


def shutdown():
    _shared["gather"] = None
    unshare_partitions()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Preempted(Exception):
    """The run stopped on request (SIGUSR1, e.g. SLURM's warning before a time limit) at a point every rank agreed
    on, after saving what it had (a checkpoint, or the cache shards written so far); rerunning the same command
    resumes. The CLI exits with EXIT_PREEMPTED."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again
_stop = {"requested": False}


def request_stop(signum=None, frame=None):
    """Signal handler: stop at the next point where every rank can agree to (an optimizer step, a cache batch)."""
    _stop["requested"] = True


def stop_requested():
    return _stop["requested"]


def stop_agreed():
    """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
    return bool(all_reduce_sum(torch.tensor([float(_stop["requested"])]))[0] > 0)


def abort(err):
    """End this rank at once after a failure, showing its error, so that the other ranks fail fast on the broken
    connection (and their launcher stops them) instead of waiting in a collective until the timeout. On one
    process the error simply propagates."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    import traceback
    sys.stdout.flush()
    if isinstance(err, ConfigError):
        print(f"semalign-ds: error on rank {dist.get_rank()}: {err}", file=sys.stderr, flush=True)
    elif not isinstance(err, KeyboardInterrupt):
        print(f"semalign-ds: rank {dist.get_rank()} failed:", file=sys.stderr)
        traceback.print_exception(err)
    sys.stderr.flush()
    os._exit(2 if isinstance(err, ConfigError) else 1)


def main(argv=None):
    """`python -m semalign_ds.distributed show` prints what this process's environment says (run it under the
    launcher to check a rank mapping); `check-hostfile FILE [--batch-size N]` checks a deepspeed hostfile."""
    p = argparse.ArgumentParser(prog="python -m semalign_ds.distributed")
    # the deepspeed launcher passes --local_rank=N before the module's own arguments
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("show")
    hf = sub.add_parser("check-hostfile")
    hf.add_argument("path")
    hf.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args(argv)
    try:
        if args.command == "show":
            print(detect(local_rank_arg=args.local_rank))
        else:
            pool = check_hostfile(args.path, args.batch_size)
            print(f"{args.path}: {len(pool)} hosts, {sum(pool.values())} processes: "
                  + ", ".join(f"{h} ({s})" for h, s in pool.items()))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
