"""Top-k Fisher against the exact loss on the embedded default: the stage phase's time and the final NLL.

    python launchers/topk_benchmark.py --k 0 64 256 1024 --set max_examples=128 --set stage_steps=8

Each k (0: exact) runs the whole pipeline from scratch into its own run directory, one process, the given threads.
Reported per k: the cache phase's seconds (top-k computes its support there), the stage phase's seconds (all layer
stages and the output stage), the final NLL of the evaluation set, and the mean tail mass of the layer stages.
The table goes to stdout; rows (date, device, versions, settings) are appended to benchmarks/topk_stages.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "topk_stages.csv")
COLUMNS = ["date", "device", "threads", "config", "settings", "k", "cache_s", "stages_s", "stage_speedup",
           "final_nll", "nll_vs_exact", "mean_tail_mass", "torch", "commit", "load_1m"]


def run(k, args, workdir):
    out = os.path.join(workdir, f"k{k}")
    cmd = [sys.executable, os.path.join(ROOT, "launchers", "transfer.py"), "--config", args.config,
           "--output-dir", out, f"--set=fisher_topk={k}"] + [f"--set={s}" for s in args.set]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"k={k} failed:\n{proc.stderr[-3000:]}")
    state = json.load(open(os.path.join(out, "state.json")))
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    cache_s = next(line["seconds"] for line in lines if line["tag"] == "cache")
    stages = state.get("stage_metrics", {})
    tails = [line["tail_mass"] for line in lines if "tail_mass" in line]
    report = json.load(open(os.path.join(out, "report.json")))
    return {"k": k, "cache_s": cache_s, "stages_s": sum(m["seconds"] for m in stages.values()),
            "final_nll": report["target_after"]["nll"], "mean_tail_mass": sum(tails) / len(tails) if tails else 0.0}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "launchers", "configs", "acl.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--k", type=int, nargs="+", default=[0, 64, 256, 1024])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args()
    import torch
    with tempfile.TemporaryDirectory(prefix="topk-bench-") as workdir:
        rows = [run(k, args, workdir) for k in args.k]
    exact = next((r for r in rows if r["k"] == 0), None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    common = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "threads": args.threads, "config": os.path.relpath(args.config, ROOT), "settings": " ".join(args.set),
              "torch": torch.__version__, "commit": commit, "load_1m": f"{os.getloadavg()[0]:.2f}"}
    print("\n| k | cache s | stages s | stage speed-up | final NLL | vs exact | mean tail mass |\n|---|---|---|---|---|---|---|")
    new = not os.path.isfile(args.results)
    with open(args.results, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            up = exact["stages_s"] / r["stages_s"] if exact else None
            rel = r["final_nll"] / exact["final_nll"] - 1 if exact else None
            print(f"| {r['k'] or 'exact'} | {r['cache_s']:.1f} | {r['stages_s']:.1f} | "
                  f"{up:.2f}x | {r['final_nll']:.4f} | {100 * rel:+.2f}% | {r['mean_tail_mass']:.4f} |")
            w.writerow({**common, **{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()},
                        "stage_speedup": f"{up:.3f}" if up else "", "nll_vs_exact": f"{rel:.5f}" if rel is not None else ""})
    print(f"rows appended to {args.results}")


if __name__ == "__main__":
    main()
