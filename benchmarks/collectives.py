"""CPU collectives under gloo: gloo's all-gather against semalign_ds.distributed's replacements (one broadcast per
rank; SharedGather, what ranks on one host use: through slots of a shared file, or reading the other ranks' shares
straight from their memory where the host allows it), with gloo's all-reduce beside them, at 2 and 4 ranks, one
thread each.

    python benchmarks/collectives.py            # prints the table, writes benchmarks/collectives.md

The rates are what arrives at each rank: (ranks - 1) shares per all-gather. DeepSpeed's ZeRO-3 gathers every
source layer through its all-gather, and ZeRO-1/2 gathers each step's updated partitions through it, so on CPU
this is the rate at which a second rank pays for the memory it saves.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "launchers"))
RESULTS = os.path.join(ROOT, "benchmarks", "collectives.md")
SIZES_MIB = (8, 64, 256)
REPEATS = 3


def _rank(rank, world, port, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from semalign_ds.distributed import SharedGather, gather_into  # gather_into: broadcasts (no init())
    shared, slotted = SharedGather.open(), SharedGather.open(direct=False)
    rows = []
    for mib in SIZES_MIB:
        share = torch.randn(mib * 2**20 // 4)
        out = torch.empty(share.numel() * world)
        ops = {"gloo all_gather_into_tensor": lambda: dist.all_gather_into_tensor(out, share),
               "gather_into (broadcasts)": lambda: gather_into(out, share),
               "SharedGather (shared slots)": lambda: slotted.gather(out, share),
               "SharedGather (reads from the other ranks" + ("" if shared.pids else ": refused here, slots") + ")":
                   lambda: shared.gather(out, share),
               "gloo all_reduce": lambda: dist.all_reduce(share)}
        for name, op in ops.items():
            op()  # the first call sets up gloo's buffers
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(REPEATS):
                op()
            seconds = (time.perf_counter() - t0) / REPEATS
            received = mib * (world - 1) if "gather" in name.lower() else mib
            rows.append((world, mib, name, seconds * 1000, received / 1024 / seconds))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(target, world, *args, timeout=600):
    """Run target(rank, world, port, *args, queue) in `world` spawned processes (gloo on loopback, a free port);
    returns what rank 0 puts on the queue."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=timeout)
    for p in procs:
        p.join()
    return rows


def measure(world):
    return spawn_ranks(_rank, world)


def main():
    import benchmark  # launchers/benchmark.py: versions and device name
    load = os.getloadavg()[0]
    rows = [row for world in (2, 4) for row in measure(world)]
    info = benchmark.versions()
    lines = ["# CPU collectives (gloo)", "",
             f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, {benchmark.device_name()}, "
             f"{os.cpu_count()} cores, load average {load:.2f} before / {os.getloadavg()[0]:.2f} after, torch "
             f"{info['torch']}, one thread per rank, loopback; `python benchmarks/collectives.py`.", "",
             "| ranks | MiB per rank | collective | ms | GiB/s into each rank |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {mib} | {name} | {ms:.1f} | {rate:.2f} |" for w, mib, name, ms, rate in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(RESULTS, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
