"""Scale-out benchmark: a named synthetic source (semalign_ds/synthetic.py) through attribution, the activation
cache and a few frontier steps on 1, 2, 4 ranks; per phase, tokens/s and every rank's peak resident memory.

    python launchers/scale_benchmark.py --source synthetic:llama-0.5b --world 1 2 4
    python launchers/scale_benchmark.py --source synthetic:llama-1b --target synthetic:llama-0.4b --world 1 2

Each rank's resident memory (VmRSS) is sampled from /proc every 0.25 s by this process, outside the run, and each
sample is put in the phase the run is in (the phases rank 0 has marked done in state.json so far), so the peaks
include what the run's own memory/PHASE scalars (rank 0 only) cannot see. The dry run's predicted per-rank peak
of each phase (semalign_ds/dryrun.py, Phase.peak_bytes) is printed beside the measured one; compare it with
rank0_phase_peak_mib_run, the run's own peak over exactly that phase (a sampled window also holds what comes
between two phases: the alignment before the cache, the source until its release in stage 1's). Rows go to
benchmarks/scale.csv (device, versions, date, load average); benchmarks/scale.png is drawn from all its rows
(--replot: only that).

Before each world size the machine itself is measured (host_* columns): one process's float32 GEMM rate, the
speed-up of `world` such processes at once over it (on 2 cores, the most a compute-bound phase can gain from a
second rank at that moment), the rate at which one process gets new memory pages, and the free memory (the page
cache not counted: once a run has used the free memory up, every new page waits on reclaim). On a shared virtual
machine the speed-up and the page rate move by several times from one hour to the next; a world's rows taken while
they were low, or with little memory free, measure the host, not the trainer.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "launchers"))
import benchmark  # noqa: E402  (launchers/benchmark.py: launch command, run-directory rates, versions)

RESULTS = os.path.join(ROOT, "benchmarks", "scale.csv")
# the reduced work of a scale measurement: what matters is the source's memory and the phases' rates
# (batch 4: divisible by 1, 2 and 4 ranks; several attribution batches and cache shards on every rank even at 4
# ranks, because a ZeRO-3 source's memory can grow after its first batch, when DeepSpeed replays the trace;
# float32 bases: the alignment's pinv of the V x d heads in float64 takes minutes on a CPU and is the same work at
# every world size)
REDUCED = {"data": "embedded:stdlib", "max_examples": 32, "attribution_examples": 16, "attribution_batch_size": 4,
           "stage_steps": 1, "eval_data": None, "cache_shard_examples": 8, "max_seq_len": 128,
           "chat_template": "off", "batch_size": 4, "checkpoint_every": 0, "report_to": "none",
           "basis_dtype": "float32"}
COLUMNS = ["date", "device", "cores", "load_1m", "source", "target", "settings", "world", "phase", "seconds", "tokens",
           "tokens_per_s_total", "peak_rss_mib_per_rank", "peak_rss_mib_max", "rank0_phase_peak_mib_run",
           "dryrun_peak_mib_per_rank", "torch", "deepspeed", "transformers", "python", "commit", "host_gflops_alone",
           "host_speedup_ceiling", "host_new_pages_gib_s", "host_free_gib"]
PLOTTED = {"plan": "o-", "cache": "s--", "stages": "^:"}  # phases drawn in scale.png, with their line styles


# --- sampling every rank's memory from outside -----------------------------------------------------------------
def _children(pid):
    """Every descendant of pid (from /proc/*/stat's parent ids)."""
    parent = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [c for c, pp in parent.items() if pp in frontier]
        found += frontier
    return found


def _rank_and_rss(pid):
    """(rank, VmRSS MiB) of a rank process (RANK in its environment; a plain python run is rank 0), else None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None
    if b"--worker" not in cmd:  # torchrun's agent, compilers: not a rank
        return None
    return int(env.get(b"RANK", b"0")), rss / 1024


class Sampler(threading.Thread):
    """Peak VmRSS per (phase, rank) of the process tree under `pid`; the phase is the one the run is in."""

    def __init__(self, pid, run_dir, period=0.25):
        super().__init__(daemon=True)
        self.pid, self.run_dir, self.period = pid, run_dir, period
        self.peaks = {}  # (number of phases done, rank) -> MiB
        self.stop = threading.Event()

    def done(self):
        try:
            with open(os.path.join(self.run_dir, "state.json")) as f:
                return list(json.load(f).get("done", {}))
        except (OSError, json.JSONDecodeError):
            return None  # not written yet, or being replaced

    def run(self):
        n_done = 0
        while not self.stop.is_set():
            found = self.done()
            n_done = len(found) if found is not None else n_done
            for child in [self.pid] + _children(self.pid):  # one rank: the launched process itself
                got = _rank_and_rss(child)
                if got is not None:
                    key = (n_done, got[0])
                    self.peaks[key] = max(self.peaks.get(key, 0.0), got[1])
            self.stop.wait(self.period)

    def by_phase(self):
        """{phase: [peak MiB of rank 0, rank 1, ...]}: samples taken while k phases were done belong to the
        (k+1)-th phase marked (the first also holds start-up and loading the source)."""
        names = self.done() or []
        out = {}
        for (k, rank), mib in sorted(self.peaks.items()):
            name = names[k] if k < len(names) else "after"
            out.setdefault(name, {})[rank] = mib
        return {n: [r[i] for i in sorted(r)] for n, r in out.items()}


# --- the machine's own ceiling ---------------------------------------------------------------------------------
_GEMM = """
import sys, time, torch
torch.set_num_threads(1)
a, b = torch.randn(512, 1024), torch.randn(1024, 4096)
a @ b
while time.time() < float(sys.argv[1]):
    time.sleep(0.001)
n, t0 = 0, time.time()
while time.time() - t0 < float(sys.argv[2]):
    a @ b
    n += 1
print(n * 2 * 512 * 1024 * 4096 / (time.time() - t0) / 1e9)
"""


def host_rates(processes, seconds=4.0):
    """GFLOP/s of each of `processes` one-thread processes running the same float32 GEMM at once (started
    together). With 1, how fast this machine is right now; the sum with world of them over that: the most a
    compute-bound phase can speed up at that world size here (cores that share caches, memory and clock)."""
    start = time.time() + 3.0  # after every process has imported torch
    procs = [subprocess.Popen([sys.executable, "-c", _GEMM, str(start), str(seconds)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(processes)]
    return [float(proc.communicate()[0]) for proc in procs]


_PAGES = """
import time, torch
n, t0 = 0, time.time()
while time.time() - t0 < 3.0:
    x = torch.empty(64 * 2**20)  # 256 MiB, a new mapping each time: every page faulted in and zeroed
    x.fill_(1.0)
    del x
    n += 1
print(n / 4 / (time.time() - t0))
"""


def free_gib():
    """The machine's free memory (MemFree, GiB; None where /proc/meminfo has none). Memory that the page cache
    holds counts as available but not free: once a run has used up the free memory, each new page waits on reclaim
    (the 1.5B pair's stages at 2 ranks slowed by up to half from the tenth stage on with 7.5 of 24 GiB free)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemFree:")) / 2**20
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def host_ceiling(world):
    """(GFLOP/s of one process alone, the speed-up of world processes at once over it, GiB/s of new pages one
    process touches: memory that a phase allocates, frees and allocates again costs this, and a virtual machine's
    host can make it several times slower while the GEMM runs as fast as ever; free memory, free_gib). The pages
    are 4 KiB ones, the same measure in every row, whatever THP_MEM_ALLOC_ENABLE the runs are given."""
    alone = host_rates(1)[0]
    pages = float(subprocess.run([sys.executable, "-c", _PAGES], capture_output=True, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1", THP_MEM_ALLOC_ENABLE="0")).stdout)
    return alone, (sum(host_rates(world)) / alone if world > 1 else 1.0), pages, free_gib()


# --- one world size --------------------------------------------------------------------------------------------
def write_config(path, args):
    import yaml
    cfg = {**REDUCED, "source": args.source}
    if args.target:
        cfg["target"] = args.target
    else:
        cfg["target_keep_layers"] = args.keep_layers
    for item in args.set:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return cfg


def run_one(world, args, config_path, workdir):
    run_dir = os.path.join(workdir, f"world{world}")
    cmd = benchmark.launch_command(world, ["--config", config_path, "--output-dir", run_dir])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    env.pop("SEMALIGN_DS_FAULT", None)
    print(f"[world {world}] {' '.join(cmd)}  (load {os.getloadavg()[0]:.2f})", flush=True)
    log_path = os.path.join(workdir, f"world{world}.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid, run_dir)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.time() - t0
    if rc != 0:
        with open(log_path) as f:
            raise SystemExit(f"the world-{world} run failed (exit {rc}); log {log_path}:\n{f.read()[-4000:]}")
    from semalign_ds import summary
    phases = summary.phase_rates(run_dir)
    rank0 = {}
    for line in summary.metric_lines(run_dir):  # the run's own view: rank 0's peak within each phase
        tag = str(line.get("tag"))
        if tag.startswith("memory/") and "rss_phase_peak_mib" in line:
            rank0[tag.removeprefix("memory/")] = line["rss_phase_peak_mib"]
    sampled = sampler.by_phase()
    stages_together(phases, sampled, rank0)
    return {"world": world, "wall": wall, "load": os.getloadavg()[0], "phases": phases,
            "sampled": sampled, "rank0": rank0, "log": log_path}


def stages_together(phases, sampled, rank0):
    """Adds the phase "stages": every frontier stage of the run as one (their seconds and loss tokens summed, each
    rank's peak over them): one stage's few steps are too short a measure of the stages' rate. In place."""
    names = [n for n in phases if n.startswith("stage_") and n.removeprefix("stage_").isdigit()]
    timed = [phases[n] for n in names if phases[n].get("seconds") and phases[n].get("tokens")]
    if not names or len(timed) < len(names):
        return
    seconds, tokens = sum(p["seconds"] for p in timed), sum(p["tokens"] for p in timed)
    phases["stages"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s_total": tokens / seconds}
    peaks = [sampled[n] for n in names if n in sampled]
    if peaks:
        sampled["stages"] = [max(p[i] for p in peaks if i < len(p)) for i in range(max(map(len, peaks)))]
    if any(n in rank0 for n in names):
        rank0["stages"] = max(rank0[n] for n in names if n in rank0)


def drop_earlier_runs(workdir):
    """Every file under workdir (the earlier world sizes' runs, which no later run reads) advised out of the page
    cache: without it, world 2 starts with world 1's files filling memory that world 1 had free."""
    from semalign_ds import models
    models.drop_from_page_cache([os.path.join(d, f) for d, _, files in os.walk(workdir) for f in files])


def predicted(config_path, world):
    """The dry run's phases (their per-rank peaks: Phase.peak_bytes)."""
    from semalign_ds import config as config_mod, dryrun
    return dryrun.plan(config_mod.load(config_path), world).phases


# --- reporting -------------------------------------------------------------------------------------------------
def table(results):
    lines = [f"{'phase':<14}" + "".join(f"{'w' + str(r['world']) + ' s':>9}{'tok/s':>9}{'r0 MiB':>9}{'max MiB':>9}"
                                        for r in results)]
    names = []
    for r in results:
        names += [n for n in r["sampled"] if n not in names]
    for name in names:
        row = f"{name:<14}"
        for r in results:
            p = r["phases"].get({"plan": "attribution"}.get(name, name), {})
            peaks = r["sampled"].get(name, [])
            row += (f"{benchmark._num(p.get('seconds'), '.1f'):>9}{benchmark._num(p.get('tokens_per_s_total'), '.0f'):>9}"
                    f"{benchmark._num(peaks[0] if peaks else None, '.0f'):>9}"
                    f"{benchmark._num(max(peaks) if peaks else None, '.0f'):>9}")
        lines.append(row)
    for r in results:
        lines.append(f"world {r['world']}: host before it {r['host'][0]:.1f} GFLOP/s alone, {r['host'][1]:.2f}x with "
                     f"{r['world']} at once, new pages {r['host'][2]:.2f} GiB/s, "
                     f"{benchmark._num(r['host'][3], '.1f')} GiB free")
        lines.append(f"world {r['world']}: {r['wall']:.0f} s wall, load average {r['load']:.2f}; rank 0's own "
                     f"memory/PHASE peaks: " + ", ".join(f"{k} {v:.0f}" for k, v in r["rank0"].items()))
        if r.get("dryrun"):
            lines.append("  dry-run predicted per-rank peak MiB: " +
                         ", ".join(f"{ph.name} {ph.peak_bytes / 2**20:.0f}" for ph in r["dryrun"]))
    return "\n".join(lines)


def write_rows(path, results, args, info):
    """info: benchmark.versions() as the runs started (the commit whose code they ran)."""
    common = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": benchmark.device_name(), "cores": os.cpu_count(), "source": args.source,
              "target": args.target or f"source layers {args.keep_layers}", "settings": " ".join(args.set), **info}
    from semalign_ds import rundir
    old = []
    if os.path.isfile(path):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))  # rows of an older header get the new columns empty
    rows = []
    for r in results:
        for name, peaks in r["sampled"].items():
            p = r["phases"].get({"plan": "attribution"}.get(name, name), {})
            rows.append({**common, "load_1m": f"{r['load']:.2f}", "world": r["world"], "phase": name,
                         "host_gflops_alone": f"{r['host'][0]:.1f}", "host_speedup_ceiling": f"{r['host'][1]:.2f}",
                         "host_new_pages_gib_s": f"{r['host'][2]:.2f}",
                         "host_free_gib": benchmark._num(r["host"][3], ".1f"),
                         "seconds": benchmark._num(p.get("seconds"), ".2f"), "tokens": p.get("tokens") or "",
                         "tokens_per_s_total": benchmark._num(p.get("tokens_per_s_total"), ".1f"),
                         "peak_rss_mib_per_rank": ";".join(f"{m:.0f}" for m in peaks),
                         "peak_rss_mib_max": f"{max(peaks):.0f}",
                         "rank0_phase_peak_mib_run": benchmark._num(r["rank0"].get(name), ".0f"),
                         "dryrun_peak_mib_per_rank": benchmark._num(_dry_peak(r, name), ".0f")})

    def write(tmp):  # the whole file replaced at once: a crash while writing leaves the rows that were there
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
            w.writeheader()
            w.writerows(old + rows)

    rundir.write_file(path, write)


def _dry_peak(r, name):
    """The dry run's per-rank peak (MiB) of a run phase, if it estimates that phase."""
    from semalign_ds import dryrun
    ph = dryrun.phase_of(r.get("dryrun") or [], name)
    return ph.peak_bytes / 2**20 if ph is not None else None


def plot_csv(path, results_csv):
    """Draw every source's rows of the results file: rank 0's own peak (rank0_phase_peak_mib_run) and tokens/s of
    attribution, the cache and the stages together against ranks, the newest row of each point measured more than
    once. Returns what it drew: {(source, phase): [(world, MiB, tokens/s)]}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(results_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] in PLOTTED]
    series = {}
    for r in rows:
        source = " ".join(filter(None, (r["source"], r.get("settings"))))  # a setting makes its own series
        series.setdefault((source, r["phase"]), {})[int(r["world"])] = (
            float(r["rank0_phase_peak_mib_run"]), float(r["tokens_per_s_total"]))
    series = {k: [(w, *v[w]) for w in sorted(v)] for k, v in sorted(series.items())}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4 + 0.15 * len(series)))
    for (source, phase), points in series.items():
        label = textwrap.fill(f"{source.split(':')[-1]} {'attribution' if phase == 'plan' else phase}", 90)
        style = PLOTTED[phase]
        a.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
        b.plot([p[0] for p in points], [p[2] for p in points], style, label=label)
    worlds = sorted({p[0] for points in series.values() for p in points})
    loads = [float(r["load_1m"]) for r in rows]
    a.set(xlabel="ranks", ylabel="rank 0's peak resident MiB", xticks=worlds, title="memory per rank")
    b.set(xlabel="ranks", ylabel="tokens/s (all ranks)", xticks=worlds,
          title=f"throughput (load average {min(loads):.1f}-{max(loads):.1f})")
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=6)  # the series' settings
    fig.suptitle(f"{os.path.basename(results_csv)}: {rows[0]['device']}, {rows[0]['cores']} cores", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * len(series), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return series


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--source", default="synthetic:llama-0.5b", help="source model spec (default: %(default)s)")
    p.add_argument("--target", default=None, help="target model spec (default: --keep-layers of the source)")
    p.add_argument("--keep-layers", type=int, nargs="+", default=[0, 23],
                   help="target made of these source layers when no --target (default: %(default)s)")
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default: 1 2 4)")
    p.add_argument("--threads", type=int, default=1, help="threads per rank (default 1: ranks compared alike)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--results", default=RESULTS, help="CSV rows are appended to (default: %(default)s)")
    p.add_argument("--plot", default=os.path.join(ROOT, "benchmarks", "scale.png"), help="(default: %(default)s)")
    p.add_argument("--no-results", action="store_true", help="print the table only")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder, kept)")
    p.add_argument("--replot", action="store_true", help="only draw --plot from the rows of --results")
    args = p.parse_args(argv)
    if args.replot:
        plot_csv(args.plot, args.results)
        print(f"plot {args.plot} from {args.results}")
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="semalign-scale-")
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.yaml")
    write_config(config_path, args)
    from semalign_ds import models
    models.resolve(args.source)  # a synthetic model is written once, before any run is timed
    if args.target:
        models.resolve(args.target)
    info = benchmark.versions()  # now: the code the runs will import, whatever is edited while they run
    results = []
    for world in args.world:
        drop_earlier_runs(workdir)
        host = host_ceiling(world)  # how fast this machine is just before the run, alone and `world` at once
        print(f"[world {world}] host: one process {host[0]:.1f} GFLOP/s; {world} at once {host[1]:.2f}x of it "
              f"(the most a compute-bound phase can speed up now); new pages {host[2]:.2f} GiB/s; "
              f"{benchmark._num(host[3], '.1f')} GiB free", flush=True)
        r = run_one(world, args, config_path, workdir)
        r["host"] = host
        r["source"] = args.source
        r["dryrun"] = predicted(config_path, world)
        results.append(r)
        print(table(results), flush=True)
    if not args.no_results:
        write_rows(args.results, results, args, info)
        plot_csv(args.plot, args.results)
        print(f"rows appended to {args.results}; plot {args.plot} from all its rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
