"""What two ranks in lockstep can gain on this host: a plain model's forward (no DeepSpeed, the whole model in
each process, one thread each) on 1 rank, and on 2 ranks run six ways:

  free       each rank its own batch, nothing shared during the forward (the host's own ceiling for this work)
  lockstep   a barrier before every decoder layer: the coupling that ZeRO-3's per-layer parameter gather imposes,
             with nothing moved
  mapped     lockstep with the source run's 1 MiB mmap threshold (semalign_ds.summary.map_large_allocations):
             every allocation of 1 MiB or more, the forward's activations included, is a new mapping, its pages
             faulted in as they are first touched
  slots      lockstep through SharedGather's shared slots instead of a barrier: before every layer, each rank
             gathers a buffer of that layer's size from the two ranks' halves into newly allocated memory, each
             half copied into a slot and out again, with the source run's 1 MiB mmap threshold
  gathered   the same, each rank reading the other's half straight from its memory (one copy): SharedGather.open(direct=True),
             where the host allows it
  reused     the gathers of `gathered` into one buffer allocated once: what the new memory's page faults cost

    python benchmarks/lockstep.py                       # synthetic:llama-1.5b, batch 16 x 128: about 20 minutes
    python benchmarks/lockstep.py --batch 4 --seq 64    # a quick look

Speed-up = 2 x (seconds per forward on 1 rank) / (seconds per forward on 2 ranks, the slower rank): the most that
attribution and the activation cache, which are such forwards (and backwards) of the ZeRO-3 source, can gain from
a second rank here. The table goes to benchmarks/lockstep.md with the device, versions, date and load average.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "launchers"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from collectives import spawn_ranks  # noqa: E402  (benchmarks/collectives.py)

RESULTS = os.path.join(ROOT, "benchmarks", "lockstep.md")
MODES = ("free", "lockstep", "mapped", "slots", "gathered", "reused")


def _forward_seconds(model, ids, iters):
    """Seconds per forward: the median of `iters` after one untimed warm-up (of an even count, the upper one)."""
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _rank(rank, world, port, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from transformers import AutoModelForCausalLM

    from semalign_ds import models, summary
    from semalign_ds.distributed import SharedGather
    model = AutoModelForCausalLM.from_pretrained(models.resolve(args.source)[0], dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(rank + 1))
    shared = SharedGather.open() if world > 1 else None
    slotted = SharedGather.open(direct=False) if world > 1 else None
    if world > 1 and (shared is None or slotted is None):
        raise SystemExit("lockstep.py gathers through shared memory: /dev/shm needs room for "
                         f"{SharedGather.file_bytes(world) * 4 / 2**20:.0f} MiB (SharedGather.open)")
    halves = [torch.randn(-(-sum(p.numel() for p in layer.parameters()) // world)) for layer in model.model.layers]
    reused = torch.empty(max(h.numel() for h in halves) * world)
    mode = {"now": "free"}

    def before_layer(layer_index):
        def hook(module, inputs):
            if mode["now"] in ("lockstep", "mapped"):
                dist.barrier()
            elif mode["now"] in ("slots", "gathered"):
                out = torch.empty(halves[layer_index].numel() * world)  # new memory, as ZeRO-3 allocates it
                (slotted if mode["now"] == "slots" else shared).gather(out, halves[layer_index])
            elif mode["now"] == "reused":
                shared.gather(reused[:halves[layer_index].numel() * world], halves[layer_index])
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(before_layer(i))
    rows = []
    for name in (args.modes if world > 1 else ("alone",)):
        mode["now"] = name
        summary.map_large_allocations(name not in ("alone", "free", "lockstep"))
        dist.barrier()
        seconds = torch.tensor([_forward_seconds(model, ids, args.iters)])
        every = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(every, seconds)
        direct = name not in ("gathered", "reused") or shared.pids is not None
        rows.append((world, name if direct else f"{name} (slots: this host refuses direct reads)",
                     [float(t) for t in every]))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def table(rows):
    alone = next(max(t) for w, name, t in rows if w == 1)
    lines = ["| ranks | mode | s per forward (each rank) | speed-up over 1 rank |", "|---|---|---|---|"]
    for w, name, t in rows:
        lines.append(f"| {w} | {name} | {' / '.join(f'{x:.2f}' for x in t)} | {w * alone / max(t):.2f}x |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--source", default="synthetic:llama-1.5b", help="model spec (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="sequences per forward and rank (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--iters", type=int, default=2, help="timed forwards per mode, after one warm-up "
                                                        "(default: %(default)s)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), metavar="MODE",
                   help=f"2-rank modes to run, in this order (default: all: {' '.join(MODES)})")
    p.add_argument("--results", default=RESULTS, help="(default: %(default)s)")
    p.add_argument("--no-results", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    if min(args.batch, args.seq, args.iters) < 1:
        p.error("--batch, --seq and --iters must be at least 1")
    import benchmark  # launchers/benchmark.py: versions and device name

    from semalign_ds import models
    models.resolve(args.source)  # a synthetic model is written once, before anything is timed
    load = os.getloadavg()[0]
    rows = spawn_ranks(_rank, 1, args, timeout=3600) + spawn_ranks(_rank, 2, args, timeout=3600)
    info = benchmark.versions()
    lines = ["# Two ranks in lockstep: the host's ceiling for a ZeRO-3 source's forwards", "",
             f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, {benchmark.device_name()}, "
             f"{os.cpu_count()} cores, load average {load:.2f} before / {os.getloadavg()[0]:.2f} after, torch "
             f"{info['torch']}, transformers {info['transformers']}, one thread per rank; {args.source} in float32, "
             f"batches of {args.batch} x {args.seq} tokens, upper median of {args.iters} forwards after a warm-up; "
             f"`{' '.join(['python benchmarks/lockstep.py'] + list(sys.argv[1:] if argv is None else argv))}`.", ""] + table(rows)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_results:
        with open(args.results, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
