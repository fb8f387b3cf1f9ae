"""What a finished (or stopped) run did, on one screen, read back from its run directory; and this process's
memory, for TensorBoard scalars and the throughput benchmark.

`summarize(run_dir)` reads config.json, state.json, metrics.json(l) and report.json, nothing else, so it works on a
run directory copied from a cluster as well as at the end of a run: `python -m semalign_ds.summary RUN_DIR`.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import sys

import torch


# --- memory ----------------------------------------------------------------------------------------------------
def _status_kib(field):
    """A field of /proc/self/status in KiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


_EARLIER_PEAK = 0  # the process's peak before the last reset of VmHWM


def _hwm_bytes() -> int:
    """Peak resident memory since the process started or since the last reset_phase_peak() (VmHWM)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def peak_rss_bytes() -> int:
    """The most resident memory this process has held so far (VmHWM; ru_maxrss where /proc is missing)."""
    return max(_EARLIER_PEAK, _hwm_bytes())


def reset_phase_peak() -> bool:
    """Start a new phase peak: VmHWM is set back to the resident memory of now (Linux: /proc/self/clear_refs);
    peak_rss_bytes() still reports the whole process's. False where it cannot be reset."""
    global _EARLIER_PEAK
    _EARLIER_PEAK = peak_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory():
    """Hand memory freed by a finished phase back to the system. glibc keeps freed heap memory for reuse, so the
    transient gigabytes of one phase (the activations of attribution's backward) would otherwise stay resident
    for the rest of the run."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def map_large_allocations(on: bool):
    """While a ZeRO-3 source runs on CPU, let glibc serve every allocation of 1 MiB or more by its own mapping,
    returned to the system when freed. Its gathered parameters interleave with the batch's activations in the heap,
    where what one batch frees does not fit the next: a 0.40B source at 2 ranks (attribution, batches of 4 x 128
    tokens) peaked on rank 0 at 4,420, 5,005, 4,382, 4,596 MiB batch by batch, and at 3,146-3,163 MiB mapped (the
    model whole on 1 rank: 3,557-3,778). Off: a fixed 32 MiB threshold, the most glibc's own adaptive one reaches
    (mapping everything costs a plain model a third of its speed in page faults)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).mallopt(-3, 2**20 if on else 32 * 2**20)  # -3: M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc
            pass


def memory_scalars(device=None, phase_peak=False) -> dict:
    """Memory of this process in MiB: resident now and at peak, and on CUDA allocated now and at peak; with
    phase_peak, also the peak since the last reset_phase_peak() (rss_phase_peak_mib)."""
    out = {"rss_peak_mib": peak_rss_bytes() / 2**20}
    if phase_peak:
        out["rss_phase_peak_mib"] = _hwm_bytes() / 2**20
    now = _status_kib("VmRSS")
    if now is not None:
        out["rss_mib"] = now / 1024
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        out["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# --- reading a run directory -------------------------------------------------------------------------------------
def _json(run_dir, name, default=None):
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def metric_lines(run_dir):
    """Every line of metrics.jsonl (a resumed run appends: later lines of a tag are the later session)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    lines = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill
    return lines


def last_of(lines, tag):
    found = [line for line in lines if line.get("tag") == tag]
    return found[-1] if found else None


def _first(d, *names):
    return next((d[n] for n in names if d and d.get(n) is not None), None)


def _transfer_set(run_dir):
    path = os.path.join(run_dir, "data", "transfer.safetensors")
    if not os.path.isfile(path):
        return None
    from semalign_ds.data import TokenizedSet
    return TokenizedSet.load(path)


def phase_rates(run_dir) -> dict:
    """Per phase: seconds, tokens (all ranks), tokens/s in total and on rank 0, as far as the run directory says.
    Phases: attribution, cache, stage_K (loss tokens of the global batches) or output_kd."""
    cfg = _json(run_dir, "config.json", {})
    state = _json(run_dir, "state.json", {})
    lines = metric_lines(run_dir)
    data = _transfer_set(run_dir)
    out = {}
    attr = last_of(lines, "attribution")
    if attr:
        total = _first(attr, "tokens_per_s_total", "tokens_per_s")
        tokens = None
        if data is not None:
            n = len(data) if cfg.get("attribution_examples") is None else min(cfg["attribution_examples"], len(data))
            tokens = int(data.lengths[:n].sum())
        seconds = attr.get("seconds") or (tokens / total if tokens and total else None)
        out["attribution"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s_total": total,
                              "tokens_per_s_rank0": attr.get("tokens_per_s_rank0")}
    cache = last_of(lines, "cache")
    if cache:
        total = _first(cache, "tokens_per_s_total", "tokens_per_s")
        tokens = int(data.offsets[-1]) if data is not None else None  # every sequence, when cached in one session
        seconds = cache.get("seconds") or (tokens / total if tokens and total else None)
        out["cache"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s_total": total,
                        "tokens_per_s_rank0": _first(cache, "tokens_per_s_rank0", "tokens_per_s")}
    stages = state.get("stage_metrics") or {}
    for key in sorted(stages, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0)):
        m = stages[key]
        tag = f"stage_{key}" if key.isdigit() else key
        tokens = m.get("loss_positions")  # recorded by fit(); older runs: recounted from the seeded batches
        if tokens is None and data is not None:
            tokens = _stage_tokens(data, cfg, key, m.get("steps"))
        seconds = m.get("seconds")
        out[tag] = {"seconds": seconds, "tokens": tokens,
                    "tokens_per_s_total": tokens / seconds if tokens and seconds else None,
                    "tokens_per_s_rank0": _first(m, "loss_tokens_per_s_rank0", "loss_tokens_per_s"),
                    "first_loss": m.get("first_loss"), "last_loss": m.get("last_loss"), "steps": m.get("steps")}
    return out


def _stage_tokens(data, cfg, key, steps):
    """Loss tokens of all global batches of a stage: the batches are seeded, the same whatever the world size."""
    from semalign_ds.data import batch_order
    if not steps or "batch_size" not in cfg:
        return None
    counts = data.loss_counts
    order = batch_order(len(data), cfg["batch_size"], steps, cfg.get("seed", 0), int(key) if key.isdigit() else 0)
    return int(sum(int(counts[b].sum()) for b in order))


# --- the one-screen summary ----------------------------------------------------------------------------------------
def _short(spec):
    """A model spec without the folders above it: '/a/b/configs/tiny/source.json' -> 'tiny/source.json'."""
    spec = str(spec)
    parts = spec.replace(os.sep, "/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else spec


def _phases(done):
    """Finished phases, consecutive stages folded: 'plan, cache, stages 1-9, export'."""
    if not done:
        return "nothing yet"
    out, run = [], []
    for name in done + [None]:
        k = name[len("stage_"):] if name and name.startswith("stage_") else None
        if k is not None and k.isdigit() and (not run or int(k) == run[-1] + 1):
            run.append(int(k))
            continue
        if run:
            out.append(f"stage {run[0]}" if len(run) == 1 else f"stages {run[0]}-{run[-1]}")
            run = []
        if k is not None and k.isdigit():
            run = [int(k)]
        elif name is not None:
            out.append(name)
    return ", ".join(out)


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def _rate(x):
    if x is None:
        return "-"
    return f"{x / 1000:.1f}k" if x >= 10000 else f"{x:.0f}"


def _schedule(cfg):
    """'40 steps/stage', '16 steps/stage + 9 joint', '187 joint steps (no stages)', or for the baselines that train
    every layer at once '19 steps per target layer'."""
    stages, joint = cfg.get("stage_steps"), cfg.get("joint_steps") or 0
    if cfg.get("method") in ("output_kd", "finetune"):
        return f"{stages} steps per target layer, all layers at once"
    if stages == 0:
        return f"{joint} joint steps (no stages)"
    return f"{stages} steps/stage" + (f" + {joint} joint" if joint else "")


def summarize(run_dir) -> str:
    """The run on one screen: what is done, each phase's time and tokens/s, each stage's first and last loss,
    memory, and the NLL report."""
    cfg = _json(run_dir, "config.json", {})
    state = _json(run_dir, "state.json", {"done": {}})
    report = _json(run_dir, "report.json")
    lines = metric_lines(run_dir)
    done = list(state.get("done", {}))
    rows = phase_rates(run_dir)
    if cfg.get("target"):
        target = _short(cfg["target"])
    elif cfg.get("target_keep_layers") is not None:
        target = f"layers {cfg['target_keep_layers']} of it"
    else:  # cut by width (and depth) by the prune phase
        depth = cfg.get("target_num_layers") or "all"
        target = (f"a cut of it: width {cfg.get('target_hidden_size') or 'the same'}, {depth} layers "
                  f"by {(cfg.get('target_depth') or 'keep_layers').replace('_', ' ')}")
    out = [f"summary of {run_dir}",
           f"  {_short(cfg.get('source'))} -> {target}",
           f"  method {cfg.get('method', 'semalign')}, pairing {cfg.get('pairing')}, batch {cfg.get('batch_size')}, "
           f"{_schedule(cfg)}, {cfg.get('max_examples')} examples",
           f"  done: {_phases(done)}"]
    plan = _json(run_dir, "plan.json")
    if plan:
        out.append(f"  pairs (target layer k <- source layer): {plan.get('pairs')}")
    out.append(f"  {'phase':<14}{'seconds':>9}{'tok/s all':>11}{'tok/s r0':>10}   loss first -> last (steps)")
    for tag, r in rows.items():
        loss = ""
        if r.get("first_loss") is not None:
            loss = f"   {r['first_loss']:.4g} -> {r['last_loss']:.4g} ({r.get('steps')})"
        name = tag.replace("stage_", "stage ") if tag.startswith("stage_") else tag
        out.append(f"  {name:<14}{_fmt(r['seconds'], '.2f'):>9}{_rate(r['tokens_per_s_total']):>11}"
                   f"{_rate(r['tokens_per_s_rank0']):>10}{loss}")
    stage_secs = [r["seconds"] for t, r in rows.items() if t.startswith("stage_") and r.get("seconds")]
    if len(stage_secs) > 1:
        out.append(f"  stage time slowest/fastest: {max(stage_secs) / min(stage_secs):.2f}x")
    mem = [line for line in lines if "rss_peak_mib" in line or "cuda_peak_mib" in line]
    if mem:
        peak = max(line.get("rss_peak_mib", 0) for line in mem)
        cuda = max(line.get("cuda_peak_mib", 0) for line in mem)
        out.append(f"  peak memory (rank 0): {peak:.0f} MiB resident" + (f", {cuda:.0f} MiB CUDA" if cuda else ""))
    src = last_of(lines, "memory")
    if src and "source_param_bytes_rank0" in src:
        out.append(f"  source parameters on rank 0 (ZeRO-3): {src['source_param_bytes_rank0'] / 2**20:.1f} MiB "
                   f"({100 * src.get('source_param_fraction_rank0', 0):.0f}% of the model)")
    if report:
        nll = {k: report[k]["nll"] for k in ("source", "target_before", "target_after") if k in report}
        out.append(f"  NLL ({report.get('source', {}).get('tokens', '?')} eval tokens, nats/token): "
                   + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in nll.items())
                   + ("" if "target_after" not in report else
                      f"; gap closed {100 * report['gap_closed']:.1f}%" if report.get("gap_closed") is not None
                      else "; gap closed: undefined"))
    if os.path.isdir(os.path.join(run_dir, "target")):
        out.append(f"  exported target: {os.path.join(run_dir, 'target')}")
    return "\n".join(out)


if __name__ == "__main__":
    for folder in sys.argv[1:] or ["."]:
        print(summarize(folder))


# --- the report of a run's evaluation ------------------------------------------------------------------------------
def finish_report(report):
    """Add the change in NLL and the share of the source-target gap closed. The gap is only defined when the
    target starts worse than the source (a random-init or pruned target can start better)."""
    s, b, a = (report[k]["nll"] for k in ("source", "target_before", "target_after"))
    report["nll_change"] = a - b
    report["gap_closed"] = (b - a) / (b - s) if b > s else None
    return report


def report_markdown(report, eval_spec):
    rows = [("source", report["source"]), ("target before", report["target_before"]),
            ("target after", report["target_after"])]
    lines = [f"NLL of {eval_spec} responses ({report['source']['tokens']} tokens), nats/token", "",
             "| model | NLL |", "|---|---|"]
    lines += [f"| {name} | {r['nll']:.3f} |" for name, r in rows]
    lines += ["", f"change in the target's NLL: {report['nll_change']:+.3f} nats/token"]
    if report["gap_closed"] is None:
        lines += ["share of the source-target gap closed: undefined (the target started at or below the "
                  "source's NLL)"]
    else:
        lines += [f"share of the source-target gap closed: {100 * report['gap_closed']:.1f}%"]
    return "\n".join(lines + [""])
