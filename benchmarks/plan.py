"""The dry run's plan past this machine: per-rank memory and time of every phase for the paper's pair (Llama-2-13B
into 7B) and a 70B source into an 8B target (Llama-3 shapes, V = 128,256), at 8, 16 and 64 ranks, bf16.

    python benchmarks/plan.py            # prints the table and writes benchmarks/plan.md

The figures are semalign-ds --dry-run's (semalign_ds/dryrun.py: first-order estimates, 400 TFLOP/s per rank);
nothing is run. A phase whose per-rank peak exceeds an 80 GB accelerator is marked."""
from __future__ import annotations

import datetime
import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = {"Llama-2-13B -> 7B": "launchers/configs/llama2-13b-to-7b.yaml",
         "Llama-3-70B -> 8B": "launchers/configs/llama3-70b-to-8b.yaml"}
WORLDS = (8, 16, 64)
GPU = 80e9
NOTES = """What the table says, and what to change before submitting such a job. The peak is a rank's resident
memory, host and device together (semalign_ds/dryrun.py, Phase.held: the runtime, the target held through the
source phases, the source head's gathered copy, the data, what ZeRO-3 holds gathered, and in the stages the
cached rows and frontiers); the marked rows exceed 80 GB in that sum.
- Attribution fits at 2,048 tokens because both configs set attribution_recompute: its backward keeps each source
  layer's input and one layer's activations at a time, for one more forward of every layer: 4.0-4.1 GiB for the
  13B source at 2 sequences and 4.5-4.7 GiB for the 70B one at 1. Without it the backward keeps every layer's
  activations (ZeRO-3 shards parameters, not activations): 92 and 147 GiB per rank, whatever the world size (the
  dry run says so in a note). The column does not grow with the world size: the NLL takes one rank's positions
  at a time on this rank's vocabulary rows (it took every rank's at once before, with their [positions, d]
  float32 gradient: 9.0 GiB for 13B at 64 ranks).
- The cache's activation column is mostly host memory: each rank holds one cache shard's rows (cache_shard_examples
  64 x 2,048 positions x (L_t d_t + d_s) float32, 71-76 GiB here) until the shard is written. cache_shard_examples 8
  brings it to about 9 GiB. On the device, the cache holds the partition and what one ZeRO-3 forward gathers (it
  starts a new trace: replaying attribution's kept the whole source gathered, 24 GiB for 13B and 131 GiB for 70B).
- The frontier stages' device part fits at every size (the whole target, one layer's training state, one layer's
  activations), but each rank holds its share of the frontier (float32, the current one and the next while a
  stage advances it) and of the cached rows a stage reads in host memory: 254 GiB per rank for 13B -> 7B at 8 ranks,
  32 GiB at 64. (ZeRO-2 trains a copy of each layer; the target file's pages it was read from are unmapped, where
  before they stayed: 12.6 GiB for the 7B target by the last stage.)
- Weights scale out as they should: the source's per-rank share falls with the world size (3.0 -> 0.4 GiB for 13B,
  16.4 -> 2.1 GiB for 70B from 8 to 64 ranks), and the alignment map costs a few GiB at V = 128,256."""


def rows():
    from semalign_ds import config as config_mod, dryrun, engines
    # a plan for GPUs: the source config's prefetch bucket "auto" as it resolves on CUDA, wherever this runs
    engines.prefetch_bucket = functools.partial(engines.prefetch_bucket, cuda=True)
    for pair, path in PAIRS.items():
        cfg = config_mod.load(os.path.join(ROOT, path))
        for world in WORLDS:
            plan = dryrun.plan(cfg, world)
            for ph in plan.phases:
                if not ph.in_total and "each" not in ph.name:
                    continue
                peak = ph.peak_bytes
                yield (pair, world, ph.name, ph.param_bytes, ph.train_bytes, ph.activation_bytes,
                       sum(ph.held.values()), peak, ph.flops / world / 400e12)


def main():
    lines = ["| pair | ranks | phase | params GiB | grad+AdamW GiB | activations GiB | held GiB | peak GiB | "
             "time at 400 TFLOP/s |", "|---|---|---|---|---|---|---|---|---|"]
    for pair, world, name, params, train, act, held, peak, seconds in rows():
        mark = " **> 80 GB**" if peak > GPU else ""
        lines.append(f"| {pair} | {world} | {name} | {params / 2**30:.1f} | {train / 2**30:.2f} | {act / 2**30:.1f} | "
                     f"{held / 2**30:.1f} | {peak / 2**30:.1f}{mark} | {seconds / 60:.1f} min |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(ROOT, "benchmarks", "plan.md"), "w") as f:
        f.write(f"# The dry run's plan past this machine\n\n{__doc__.split(chr(10), 1)[1].strip()}\n\n"
                f"Configs: {', '.join(PAIRS.values())} (bf16, 20,000 examples of 2,048 tokens, batch 64, 500 steps "
                f"per stage). Written {datetime.date.today()} by benchmarks/plan.py.\n\n{text}\n\n{NOTES}\n")


if __name__ == "__main__":
    sys.exit(main())
