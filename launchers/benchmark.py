"""Transfer-throughput benchmark: the whole pipeline on 1 and on N ranks, tokens/s per phase, peak memory per rank.

    python launchers/benchmark.py --world 1 2   # the ACL recipe on the embedded pair (launchers/configs/acl.yaml)
    python launchers/benchmark.py --config launchers/configs/tiny.yaml --world 1 2 --threads 1

Each world size runs the pipeline from scratch in a fresh run directory, as a subprocess: plain `python` for one
rank, `torchrun --standalone` for more, with OMP_NUM_THREADS = cores / world unless --threads is given (--threads 1
compares ranks at one thread each). Tokens/s come from the run's own metrics (metrics.jsonl, state.json):

    attribution   source forwards over the transfer set: all tokens / rank 0's time
    cache         source forwards writing the activation cache: all ranks' tokens / rank 0's time
    stage K       frontier stage K: loss tokens of every global batch / the stage's time on rank 0
    run           the transfer set's tokens / the wall time of the whole launch (start-up, evaluation, export)

"per rank" is the total / world (rank 0's own figure is in the run's metrics.jsonl). Peak memory is each rank's
peak resident set (VmHWM) and, on CUDA, its peak allocated memory, written by every rank as it exits.
The table goes to stdout; rows (date, device, versions, world size, threads, load) are appended to the results
file (default benchmarks/transfer_throughput.csv).
"""
from __future__ import annotations

import argparse
import atexit
import csv
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "transfer_throughput.csv")
MEMORY_ENV = "SEMALIGN_BENCH_MEMORY_DIR"
COLUMNS = ["date", "device", "cores", "threads_per_rank", "world", "config", "settings", "phase", "seconds",
           "tokens", "tokens_per_s_total", "tokens_per_s_per_rank", "speedup_vs_1", "peak_mem_mib_per_rank",
           "torch", "deepspeed", "transformers", "python", "commit", "load_1m", "rank0_peak_mib_at_phase_end",
           "rank0_phase_peak_mib"]


# --- the worker: one rank of a benchmarked run ---------------------------------------------------------------------
def worker(argv):
    """Run the transfer (the same entry point as launchers/transfer.py); on exit write this rank's peak memory."""
    sys.path.insert(0, ROOT)
    from semalign_ds import distributed, summary
    from semalign_ds.cli import main

    def write_memory():
        folder = os.environ.get(MEMORY_ENV)
        if not folder:
            return
        mem = summary.memory_scalars()
        rank = distributed.launch().rank
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, **mem}, f)

    atexit.register(write_memory)
    return main(argv)


def plain_forward(run_dir):
    """A plain single-process Hugging Face forward (all hidden states) over the run's transfer set, in the batches
    the cache uses: the yardstick for the ZeRO-3 cache."""
    sys.path.insert(0, ROOT)
    import torch

    from semalign_ds import config as config_mod, models
    from semalign_ds.data import TokenizedSet, pad_id
    from semalign_ds.data import index_batches
    from semalign_ds import summary
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = config_mod.from_dict(json.load(f))
    model = models.load_model(cfg.source, cfg.source_gguf_file, cfg.dtype, cfg.seed)
    data = TokenizedSet.load(os.path.join(run_dir, "data", "transfer.safetensors"))
    pad = pad_id(models.load_tokenizer(cfg.source, cfg.source_gguf_file))
    t0 = time.time()
    with torch.no_grad():
        for idx in index_batches(len(data), cfg.eval_batch_size):
            ids, attn, _ = data.batch(idx, pad)
            model(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False)
    seconds = time.time() - t0
    tokens = int(data.offsets[-1])
    print(json.dumps({"seconds": seconds, "tokens": tokens, "tokens_per_s_total": tokens / seconds,
                      "memory": summary.memory_scalars()["rss_peak_mib"]}))


# --- the driver ------------------------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(world, transfer_args):
    script = [os.path.abspath(__file__), "--worker"]
    if world == 1:
        return [sys.executable] + script + transfer_args
    import torch
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise SystemExit(f"--world {world} needs {world} GPUs on this node, found {torch.cuda.device_count()}")
    # --standalone picks a free rendezvous port: benchmarks beside other runs on the same machine do not collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)] + \
        script + transfer_args


def run_one(world, threads, args, workdir):
    out = tempfile.mkdtemp(prefix=f"world{world}-", dir=workdir)
    run_dir = os.path.join(out, "run")
    mem_dir = os.path.join(out, "memory")
    os.makedirs(mem_dir)
    transfer_args = ["--config", args.config, "--output-dir", run_dir] + [f"--set={s}" for s in args.set]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", **{MEMORY_ENV: mem_dir})
    env.pop("SEMALIGN_DS_FAULT", None)
    cmd = launch_command(world, transfer_args)
    print(f"[world {world}, {threads} thread(s) per rank] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    log_path = os.path.join(out, "log.txt")
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"the world-{world} run failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return {"world": world, "threads": threads, "wall": wall, "run_dir": run_dir, "out": out,
            **measure(run_dir, mem_dir, world, wall)}


def measure(run_dir, mem_dir, world, wall):
    from semalign_ds import summary
    phases = summary.phase_rates(run_dir)
    data = summary._transfer_set(run_dir)
    tokens = int(data.offsets[-1]) if data is not None else None
    phases["run"] = {"seconds": wall, "tokens": tokens, "tokens_per_s_total": tokens / wall if tokens else None}
    memory = {}
    for name in sorted(os.listdir(mem_dir)):
        with open(os.path.join(mem_dir, name)) as f:
            m = json.load(f)
        memory[m["rank"]] = m.get("cuda_peak_mib") or m.get("rss_peak_mib")
    source_params = next((line.get("source_param_bytes_rank0") for line in summary.metric_lines(run_dir)
                          if line.get("tag") == "memory"), None)
    for line in summary.metric_lines(run_dir):  # rank 0's peak resident memory by the end of each phase
        tag = line.get("tag")
        if tag in phases and line.get("rss_peak_mib") is not None:
            phases[tag]["rank0_peak_mib"] = line["rss_peak_mib"]
        # rank 0's peak within each phase, from its memory/ line (the plan's ends attribution)
        name = {"memory/plan": "attribution"}.get(tag, str(tag).removeprefix("memory/"))
        if str(tag).startswith("memory/") and name in phases and "rss_phase_peak_mib" in line:
            phases[name]["rank0_phase_peak_mib"] = line["rss_phase_peak_mib"]
    return {"phases": phases, "memory": [memory[r] for r in sorted(memory)],
            "source_param_mib_rank0": source_params / 2**20 if source_params else None}


# --- reporting -------------------------------------------------------------------------------------------------------
def device_name():
    import torch
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu: {model}"


CODE = ["semalign_ds", "kernels", "launchers", "ds_configs", "setup.py"]


def versions():
    import deepspeed
    import torch
    import transformers
    commit = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "?"
        # the code only: results and docs written beside a run do not make its commit another
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "commit": commit}


def phase_order(results):
    names = []
    for r in results:
        for name in r["phases"]:
            if name not in names and name != "run":
                names.append(name)
    return names + ["run"]


def _num(x, spec):
    return "-" if x is None else format(x, spec)


def table(results):
    base = next((r for r in results if r["world"] == 1), None)
    lines = []
    head = f"{'phase':<13}" + "".join(f"{'w' + str(r['world']) + ' s':>9}{'tok/s':>10}{'/rank':>9}"
                                      + ("" if r is base or base is None else f"{'x w1':>7}") for r in results)
    lines.append(head)
    for name in phase_order(results):
        row = f"{name.replace('stage_', 'stage '):<13}"
        for r in results:
            p = r["phases"].get(name, {})
            total = p.get("tokens_per_s_total")
            row += f"{_num(p.get('seconds'), '.2f'):>9}{_num(total, '.0f'):>10}" \
                   f"{_num(total / r['world'] if total else None, '.0f'):>9}"
            if base is not None and r is not base:
                row += f"{_num(speedup(r, base, name), '.2f'):>7}"
        lines.append(row)
    for r in results:
        mem = ", ".join(f"rank {i}: {m:.0f}" for i, m in enumerate(r["memory"]))
        lines.append(f"world {r['world']} ({r['threads']} thread(s)/rank): peak memory MiB {mem}"
                     + (f"; source parameters on rank 0 under ZeRO-3: {r['source_param_mib_rank0']:.0f} MiB"
                        if r.get("source_param_mib_rank0") else ""))
        peaks = [f"{n} {p['rank0_phase_peak_mib']:.0f}" for n, p in r["phases"].items() if p.get("rank0_phase_peak_mib")]
        if peaks:
            lines.append(f"  rank 0's peak MiB within each phase: {', '.join(peaks)}")
        stages = {n: p["seconds"] for n, p in r["phases"].items() if n.startswith("stage_") and p.get("seconds")}
        if len(stages) > 1:
            ratio = max(stages.values()) / min(stages.values())
            inner = dict(list(stages.items())[:-1])  # the final stage adds the output loss over the vocabulary
            inner_ratio = max(inner.values()) / min(inner.values()) if len(inner) > 1 else None
            lines.append(f"  stage time slowest/fastest: {ratio:.2f}x over all stages"
                         + (f", {inner_ratio:.2f}x without the final stage (which adds the output loss)"
                            if inner_ratio else ""))
    return "\n".join(lines)


def speedup(r, base, name):
    a, b = r["phases"].get(name, {}).get("tokens_per_s_total"), base["phases"].get(name, {}).get("tokens_per_s_total")
    return a / b if a and b else None


def append_rows(path, results, args, cores):
    base = next((r for r in results if r["world"] == 1), None)
    info = versions()
    common = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": device_name(),
              "cores": cores, "config": os.path.relpath(args.config, ROOT),
              "settings": " ".join(args.set), "load_1m": f"{os.getloadavg()[0]:.2f}", **info}
    new = not os.path.isfile(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not new:  # a results file from before a column was added: rewritten with the columns of now
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
        if old and list(old[0]) != COLUMNS:
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
                w.writeheader()
                w.writerows(old)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in results:
            mem = ";".join(f"{m:.0f}" for m in r["memory"])
            for name in phase_order([r]):
                p = r["phases"][name]
                total = p.get("tokens_per_s_total")
                up = speedup(r, base, name) if base is not None and r is not base else None
                w.writerow({**common, "threads_per_rank": r["threads"], "world": r["world"], "phase": name,
                            "seconds": _num(p.get("seconds"), ".3f"), "tokens": p.get("tokens") or "",
                            "tokens_per_s_total": _num(total, ".1f"),
                            "tokens_per_s_per_rank": _num(total / r["world"] if total else None, ".1f"),
                            "speedup_vs_1": _num(up, ".3f") if up else "", "peak_mem_mib_per_rank": mem,
                            "rank0_peak_mib_at_phase_end": _num(p.get("rank0_peak_mib"), ".0f"),
                            "rank0_phase_peak_mib": _num(p.get("rank0_phase_peak_mib"), ".0f")})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    if argv[:1] == ["--plain-worker"]:
        return plain_forward(argv[1])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default=os.path.join(ROOT, "launchers", "configs", "acl.yaml"),
                   help="config file (default: the ACL recipe on the embedded pair, %(default)s)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--world", type=int, nargs="+", default=[1, 2], help="world sizes to run (default: 1 2)")
    p.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / world)")
    p.add_argument("--results", default=RESULTS, help="CSV file rows are appended to (default: %(default)s)")
    p.add_argument("--no-results", action="store_true", help="print the table only")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--plain-forward", action="store_true",
                   help="also time a plain single-process Hugging Face forward of the source over the same tokens "
                        "with all cores (the yardstick for the ZeRO-3 cache); shown as phase hf_forward of world 1")
    args = p.parse_args(argv)
    if any(w < 1 for w in args.world):
        p.error("--world takes world sizes >= 1")
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, without its warning
    args.config = os.path.abspath(args.config)
    if not os.path.isfile(args.config):
        p.error(f"config file not found: {args.config}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workdir = args.workdir or tempfile.mkdtemp(prefix="semalign-bench-")
    os.makedirs(workdir, exist_ok=True)
    results = []
    try:
        for world in args.world:
            threads = args.threads or max(1, cores // world)
            results.append(run_one(world, threads, args, workdir))
        base = next((r for r in results if r["world"] == 1), None)
        if args.plain_forward and base is not None:
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads * max(args.world) if args.threads else cores))
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--plain-worker", base["run_dir"]],
                                  env=env, cwd=ROOT, capture_output=True, text=True, check=True)
            plain = json.loads(proc.stdout.strip().splitlines()[-1])
            base["phases"]["hf_forward"] = plain
            print(f"plain HF forward: {plain['tokens_per_s_total']:.0f} tokens/s, peak {plain['memory']:.0f} MiB")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(results))
    if not args.no_results:
        append_rows(args.results, results, args, cores)
        print(f"appended {sum(len(phase_order([r])) for r in results)} rows to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
