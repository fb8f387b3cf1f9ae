"""The GPU path in one command: kernel correctness, kernel speed, the tiny pipeline through DeepSpeed, and transfer
throughput at a real model shape, written to a results folder as they are measured.

    bash benchmarks/device_check.sh OUT              # on a GPU machine (installs .device-wheels/ when present)
    python benchmarks/device_check.py OUT --cpu      # the same code paths at tiny sizes on CPU (CI, plumbing)
    python benchmarks/device_check.py --commit-only OUT --commit-into .   # CUDA rows -> kernels/bench_results.csv,
                                                                          # OUT/gpu.md -> benchmarks/gpu.md

Steps, in order of importance (a run cut off by its time budget keeps what came before):

  kernels     the Triton kernels (Fisher quadratic, fused linear KL) against the float64 references of
              tests/references.py, float32 and bfloat16, loss and gradients w.r.t. x and W, at odd sizes and at
              one aligned to 16, with the tolerances of tests/test_kernels.py (TOL); one process per (loss, dtype).
              Top-k Fisher has no kernel (PyTorch only): not checked.
  bench       kernels/bench.py's cases at N=16384, V=128256, d=4096 and 8192, bf16: median ms, TFLOP/s (Fisher
              8*N*V*d, KL 2*N*V*(d_s + 3*d_t)), share of a plain bf16 matmul measured in the same case, peak memory
              against the naive loss's; Liger-Kernel's fused linear JSD (beta 0: forward KL) on the same inputs when
              importable.
  pipeline    launchers/configs/tiny.yaml on the device through DeepSpeed (ZeRO-3 source, ZeRO-2 target) at world 1
              (NCCL on CUDA), float32 and bfloat16, against the CPU goldens of tests/parity.py: float32 every step
              within rel 1e-3 (tests/test_matrix.py's bound for the same computation run differently), bfloat16
              each stage's first loss within rel 0.05 (tests/test_matrix.py's bf16 bound) and every loss finite.
              Then diagnostics, not part of pass/fail, in float32: with the PyTorch (chunked) loss, and without
              DeepSpeed, each against the goldens and the float32 run; every run records its layer pairing and
              its alignment map's norm.
  throughput  random-weight Llama-shaped models, ~1.2B source and ~0.5B target (vocabulary 128,256), built here
              and saved with a tokenizer: the frontier stages (semalign) and output KD, tokens/s per phase and
              model FLOPs utilisation against a bf16 matmul measured in the same run. FLOPs per token: attribution
              4*N_s (forward and the activations' backward), cache 2*N_s, cached training phases (frontier stages,
              output KD: the source's outputs come from the cache) 6*N_t; N counts every parameter once. A
              frontier stage trains one layer: mfu_stage_work counts its own work beside (stage_work).

Each step is guarded: an exception is recorded with its traceback in events.jsonl and the next step runs.
Exit status: 0 when every correctness check (kernels, pipeline) ran and passed and no step failed; 1 when a
correctness check failed or did not run; 2 when only a measurement step (bench, throughput) failed.

Results folder: events.jsonl (steps, tracebacks), kernels.jsonl, bench.csv (kernels/bench_results.csv's columns,
the device column the GPU's name), bench_memory.jsonl, pipeline.jsonl, throughput.csv, summary.json, gpu.md
(device, versions, date and every table; rewritten after each step). Every line is written and flushed as soon as
it is measured. Models and runs go to a temporary folder (--workdir), never into the results folder.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.references, tests.parity; semalign_ds when not installed

STEPS = ("kernels", "bench", "pipeline", "throughput")
CORRECTNESS = ("kernels", "pipeline")
BENCH_RESULTS = ROOT / "kernels" / "bench_results.csv"

# fp32 pipeline on another device: tests/test_matrix.py's bound for the same computation run differently;
# bf16: its bound for the first loss of each stage against the fp32 goldens
PIPELINE_TOL = {"float32": 1e-3, "bfloat16": 0.05}


# ---------------------------------------------------------------------------------------------------------------
# sizes per mode

def plan(cpu: bool) -> dict:
    """What each step runs: real sizes on a GPU, tiny ones on CPU (the same code paths, in minutes)."""
    if cpu:
        return dict(
            kernel_sizes=[(13, 40, 24, 301)],              # N, d_t, d_s, V: nothing a multiple of a block
            bench_cases=[("fisher", "triton", 64), ("kl", "triton", 64), ("fisher", "naive", 64),
                         ("kl", "naive", 64), ("kl", "liger", 64), ("fisher", "chunked", 64)],
            bench_n=64, bench_v=1000, bench_repeats=2,
            pipeline_dtypes=["float32", "bfloat16"], pipeline_steps=None,
            pipeline_variants=[dict(name="chunked", dtype="float32", device="cpu", set={"loss_backend": "chunked"}),
                               dict(name="no-deepspeed", dtype="float32", device="cpu", set={}, deepspeed=False)],
            models=dict(source=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2),
                        target=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2),
                        vocab=2048),
            throughput=dict(max_examples=8, max_seq_len=64, batch_size=4, stage_steps=2, dtype="float32"),
            budget_s=1800)
    return dict(
        # the CPU test's size; one with several row blocks and two vocabulary slices per block on a GPU; one with
        # widths and vocabulary multiples of 16, as real models have (Triton compiles another specialisation)
        kernel_sizes=[(37, 72, 56, 1000), (517, 264, 200, 4099), (515, 256, 256, 4096)],
        # most important first: the fused kernels, the naive peak they are measured against, Liger, d=8192
        bench_cases=[("fisher", "triton", 4096), ("kl", "triton", 4096), ("fisher", "naive", 4096),
                     ("kl", "naive", 4096), ("kl", "liger", 4096), ("fisher", "triton", 8192),
                     ("kl", "triton", 8192), ("kl", "liger", 8192), ("fisher", "naive", 8192),
                     ("kl", "naive", 8192), ("fisher", "chunked", 4096), ("kl", "chunked", 4096)],
        bench_n=16384, bench_v=128256, bench_repeats=5,
        pipeline_dtypes=["float32", "bfloat16"], pipeline_steps=None,
        # diagnostics beside the two runs (not part of pass/fail), float32 on the GPU: with the PyTorch loss instead
        # of the Triton kernels, and without DeepSpeed (the source whole, the target's stages under plain PyTorch).
        # On CPU, the GPU image's torch 2.11, transformers 5.17 and DeepSpeed 0.19.8 give the goldens to the bit.
        pipeline_variants=[dict(name="chunked", dtype="float32", device="cuda", set={"loss_backend": "chunked"}),
                           dict(name="no-deepspeed", dtype="float32", device="cuda", set={}, deepspeed=False)],
        # Llama-3.2-1B's shape (1.24B, tied) and a 0.5B target on its vocabulary
        models=dict(source=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8),
                    target=dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12,
                                num_attention_heads=24, num_key_value_heads=8),
                    vocab=128256),
        throughput=dict(max_examples=64, max_seq_len=512, batch_size=8, stage_steps=4, dtype="bfloat16"),
        # at most 8 minutes on the device, steps included; each step also has its own share (STEP_SHARE)
        budget_s=470)


# seconds a step may take at most, as a share of the whole budget (a slow step leaves time to the next ones); the
# last step run has all that is left
STEP_SHARE = {"kernels": 0.25, "bench": 0.40, "pipeline": 0.30, "throughput": 0.40}


# ---------------------------------------------------------------------------------------------------------------
# results

def bench_fields():
    """kernels/bench_results.csv's columns, read from its header (kernels/bench.py's FIELDS when it is absent)."""
    try:
        with open(BENCH_RESULTS, newline="") as f:
            return next(csv.reader(f))
    except (OSError, StopIteration):
        from semalign_ds.kernels.bench import FIELDS
        return list(FIELDS)


class Results:
    """The results folder. Every record goes to disk (flushed, fsynced) as soon as it exists."""

    def __init__(self, folder, device_name="", mode="cuda"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.device_name, self.mode = device_name, mode
        self.started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    def path(self, name):
        return self.folder / name

    def _append(self, name, text):
        with open(self.path(name), "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def jsonl(self, name, record):
        self._append(name, json.dumps(record, default=str) + "\n")

    def event(self, **record):
        self.jsonl("events.jsonl", {"time": time.strftime("%H:%M:%S"), **record})

    def csv_row(self, name, fields, row):
        new = not self.path(name).exists()
        with open(self.path(name), "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def bench_row(self, row):
        self.csv_row("bench.csv", bench_fields(), row)

    def read_jsonl(self, name):
        if not self.path(name).exists():
            return []
        with open(self.path(name)) as f:
            return [json.loads(line) for line in f if line.strip()]

    def read_csv(self, name):
        if not self.path(name).exists():
            return []
        with open(self.path(name), newline="") as f:
            return list(csv.DictReader(f))

    def write_json(self, name, obj):
        tmp = self.path(name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        os.replace(tmp, self.path(name))


def versions() -> dict:
    """torch, triton, CUDA, driver, transformers, deepspeed, liger-kernel, python: what is importable here."""
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "deepspeed", "liger_kernel"):
        try:
            from importlib.metadata import version
            out[name.replace("_", "-")] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 (absent, or metadata unreadable)
            out[name.replace("_", "-")] = "-"
    try:
        import torch
        out["cuda"] = torch.version.cuda or "-"
    except ImportError:
        out["cuda"] = "-"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "-"
    except (OSError, subprocess.SubprocessError, IndexError):
        out["driver"] = "-"
    # the caller's word first: a copy of the checkout may carry no .git, or a stale one (seen on a machine that
    # received the working tree: its HEAD was an earlier commit than the files)
    out["commit"] = os.environ.get("DEVICE_CHECK_COMMIT", "")[:7]
    if not out["commit"]:
        try:
            out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or "-"
        except (OSError, subprocess.SubprocessError):
            out["commit"] = "-"
    return out


def device_name(device) -> str:
    from semalign_ds.kernels.bench import _device_name
    return _device_name(device)


# ---------------------------------------------------------------------------------------------------------------
# the run: steps in order, each guarded

class Context:
    def __init__(self, args, results, sizes, device):
        self.args, self.results, self.sizes, self.device = args, results, sizes, device
        self.start = time.time()
        self.deadline = self.start + args.budget_s
        self.step_deadline = self.deadline
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="device-check-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def left(self):
        """Seconds left to the current step (its own share, within the whole budget)."""
        return self.step_deadline - time.time()

    def out_of_time(self, need=0.0):
        return self.left() <= need


def run_steps(ctx, steps) -> dict:
    """Run `steps` (name, function) in order; each records its outcome and the next one runs whatever happened.
    Returns {name: {"status": passed|failed|error|skipped|measured, ...}}."""
    outcome = {}
    for i, (name, fn) in enumerate(steps):
        remaining = ctx.deadline - time.time()
        if remaining <= 5:
            outcome[name] = {"status": "skipped", "reason": "out of time"}
            ctx.results.event(step=name, status="skipped", reason="out of time")
            continue
        share = 1.0 if i == len(steps) - 1 else STEP_SHARE.get(name, 1.0)  # nothing after it to leave time to
        ctx.step_deadline = min(ctx.deadline, time.time() + share * ctx.args.budget_s)
        ctx.results.event(step=name, status="started")
        t0 = time.time()
        try:
            info = fn(ctx) or {}
            status = info.pop("status", "measured")
            outcome[name] = {"status": status, "seconds": round(time.time() - t0, 1), **info}
        except Exception as err:  # noqa: BLE001 (the point: record it and go on)
            tb = traceback.format_exc()
            outcome[name] = {"status": "error", "seconds": round(time.time() - t0, 1),
                             "error": f"{type(err).__name__}: {err}"[:500], "traceback": tb[-6000:]}
        ctx.results.event(step=name, **outcome[name])
        ctx.results.write_json("summary.json", summary_of(ctx, outcome))
        write_markdown(ctx.results, outcome)
    return outcome


def exit_code(outcome, selected) -> int:
    """0: every correctness check ran and passed and nothing failed; 1: a correctness check failed or did not run;
    2: only a measurement step failed."""
    for name in CORRECTNESS:
        if name in selected and outcome.get(name, {}).get("status") != "passed":
            return 1
    if any(o.get("status") in ("error", "failed") for o in outcome.values()):
        return 2
    return 0


def summary_of(ctx, outcome):
    return {"mode": ctx.results.mode, "device": ctx.results.device_name, "started": ctx.results.started,
            "elapsed_s": round(time.time() - ctx.start, 1), "budget_s": ctx.args.budget_s, "versions": ctx.versions,
            "steps": {k: {kk: vv for kk, vv in v.items() if kk != "traceback"} for k, v in outcome.items()}}


# ---------------------------------------------------------------------------------------------------------------
# step 1: kernels against float64

def kernel_case(loss, dtype, n, d, d_s, v, tau, device, reduction="mean"):
    """The fused kernel on `dtype` copies of fresh random inputs against the float64 reference on the same rounded
    values: relative norm errors of the loss and of the gradients w.r.t. x and W, the tolerances, passed."""
    import torch

    from semalign_ds.kernels.fisher_quadratic import fused_fisher_quadratic
    from semalign_ds.kernels.linear_kl import fused_linear_kl
    from tests.references import fisher_reference, kl_reference, reduce
    from tests.test_kernels import TOL, make_inputs, rel_err, seed_of

    x, w, other, mask = make_inputs(loss, seed_of("device", loss, str(dtype), n, v), n=n, d=d, d_s=d_s, v=v)
    mask[0], mask[-1] = False, True  # at least one row masked and one counted, whatever the draw
    xk = x.to(device, dtype).requires_grad_()
    wk = w.to(device, dtype).requires_grad_()
    ok = [t.to(device, dtype) for t in other]
    mk = mask.to(device)
    # the reference: float64 on the same device, from the kernel's rounded inputs
    xr = xk.detach().double().requires_grad_()
    wr = wk.detach().double().requires_grad_()
    orr = [t.double() for t in ok]
    if loss == "fisher":
        out = fused_fisher_quadratic(xk, ok[0], wk, tau, mk, reduction)
        per_row = fisher_reference(xr, orr[0], wr, tau)
    else:
        out = fused_linear_kl(xk, wk, ok[0], ok[1], tau, mk, reduction)
        per_row = kl_reference(xr, wr, *orr, tau)
    expect = reduce(per_row, mk, reduction)
    upstream = torch.rand(expect.shape, generator=torch.Generator().manual_seed(1)).double() + 0.5
    (out * upstream.to(device, out.dtype)).sum().backward()
    (expect * upstream.to(device)).sum().backward()
    tol_loss, tol_grad = TOL[dtype]
    errs = {"loss": rel_err(out, expect), "grad_x": rel_err(xk.grad, xr.grad), "grad_w": rel_err(wk.grad, wr.grad)}
    masked_zero = bool((xk.grad[~mk] == 0).all())
    passed = (errs["loss"] < tol_loss and errs["grad_x"] < tol_grad and errs["grad_w"] < tol_grad and masked_zero
              and xk.grad.dtype == dtype and wk.grad.dtype == dtype)
    return {"loss": loss, "dtype": str(dtype).replace("torch.", ""), "n": n, "d": d, "d_s": d_s if loss == "kl" else d,
            "v": v, "tau": tau, "reduction": reduction, "err_loss": errs["loss"], "err_grad_x": errs["grad_x"],
            "err_grad_w": errs["grad_w"], "tol_loss": tol_loss, "tol_grad": tol_grad, "masked_rows_zero": masked_zero,
            "passed": bool(passed)}


KERNEL_DTYPES = ("float32", "bfloat16")


def kernel_checks(results, sizes, device, deadline, losses=("fisher", "kl"), dtypes=KERNEL_DTYPES):
    """Every kernel case of `sizes`, each recorded in kernels.jsonl as soon as it is measured (or raised)."""
    import torch
    for n, d, d_s, v in sizes:
        for name in dtypes:
            dtype = getattr(torch, name)
            for loss in losses:
                if time.time() >= deadline:
                    results.jsonl("kernels.jsonl", {"loss": loss, "dtype": name, "n": n, "d": d, "v": v,
                                                    "passed": False, "error": "out of time"})
                    continue
                t0 = time.time()
                try:
                    rec = kernel_case(loss, dtype, n, d, d_s, v, 2.0, device)
                except Exception as err:  # noqa: BLE001 (one failing case must not hide the others)
                    rec = {"loss": loss, "dtype": name, "n": n, "d": d, "v": v, "passed": False,
                           "error": f"{type(err).__name__}: {err}"[:500], "traceback": traceback.format_exc()[-3000:]}
                rec["seconds"] = round(time.time() - t0, 2)
                results.jsonl("kernels.jsonl", rec)


def step_kernels(ctx):
    """The checks run in child processes, one per (loss, dtype), side by side: Triton compiles each kernel's
    autotuning configs one after the other, so four processes compile four times as fast on a many-core host; a
    kernel that faults (a CUDA error poisons its process's context) or hangs cannot take the later steps with it,
    and the children are stopped at the step's deadline."""
    before = len(ctx.results.read_jsonl("kernels.jsonl"))
    jobs = [{"out": str(ctx.results.folder), "cpu": ctx.device == "cpu", "deadline": ctx.step_deadline,
             "device_name": ctx.results.device_name, "loss": loss, "dtype": dtype}
            for dtype in KERNEL_DTYPES for loss in ("fisher", "kl")]
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_kernels", json.dumps(job)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for job in jobs]
    errors = []
    for job, proc in zip(jobs, procs):
        try:
            _, err = proc.communicate(timeout=max(1.0, ctx.left() + 15))
            if proc.returncode != 0:
                errors.append(f"{job['loss']} {job['dtype']}: exit {proc.returncode}: {err.strip()[-800:]}")
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            errors.append(f"{job['loss']} {job['dtype']}: stopped at the step's deadline")
    records = ctx.results.read_jsonl("kernels.jsonl")[before:]
    expected = len(jobs) * len(ctx.sizes["kernel_sizes"])
    failed = sum(not r.get("passed") for r in records) + max(0, expected - len(records))
    info = {"status": "passed" if not failed and not errors else "failed", "checks": expected,
            "failed_checks": failed}
    if errors:
        info["error"] = "; ".join(errors)
    return info


# ---------------------------------------------------------------------------------------------------------------
# step 2: kernel speed and memory at a real size

def liger_case(case):
    """Liger-Kernel's fused linear JSD at beta 0 (forward KL) on bench.py's inputs: forward + backward timed, peak
    memory over the inputs, bf16 matmul rate; the record bench.run_case returns."""
    import torch
    from liger_kernel.transformers import LigerFusedLinearJSD

    from semalign_ds.kernels import bench
    device, dtype, gen, rand, x, w, mask = bench.case_inputs(torch, case)  # bench.run_case's inputs
    n, v, d, d_s = case["n"], case["v"], case["d"], case["d_s"]
    x_s, w_s = rand(n, d_s), rand(v, d_s, scale=d_s ** -0.5)  # then the source side, as run_case draws it
    labels = torch.where(mask, torch.zeros(n, dtype=torch.long, device=device), -100)
    loss_fn = LigerFusedLinearJSD(jsd_beta=0.0, temperature=2.0)

    def step():
        x.grad = None
        w.grad = None
        loss_fn(x, w, x_s, w_s, labels).backward()

    bench._sync(torch, device)
    base = bench._mem_now(torch, device)
    bench._reset_peak(torch, device)
    step()  # warm-up (and Triton's compile)
    bench._sync(torch, device)
    peak = bench._peak(torch, device) - base
    if device.type == "cuda":
        base = bench._mem_now(torch, device)
        bench._reset_peak(torch, device)
    times = []
    for _ in range(case["repeats"]):
        bench._sync(torch, device)
        t = time.perf_counter()
        step()
        bench._sync(torch, device)
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = bench._peak(torch, device) - base
    mm = bench._matmul_rate(torch, device, dtype if device.type == "cuda" else torch.float32, d, rows=min(n, 8192))
    return {"times": times, "peak": peak, "mm_flops": mm}


def liger_importable():
    try:
        import liger_kernel.transformers  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 (absent, or its import fails on this device)
        return False


def bench_row(ctx, loss, backend, d, note=""):
    """One case of kernels/bench.py in a fresh process (Liger's through this script's --_liger-case), as a row of
    kernels/bench_results.csv."""
    from semalign_ds.kernels import bench
    s = ctx.sizes
    dt = "bf16" if ctx.device == "cuda" else "fp32"
    args = argparse.Namespace(d_s=None, threads=1, train_weight=False,
                              repeats=s["bench_repeats"], timeout=max(10.0, ctx.left()), note=note)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    torch_v, triton_v = bench._versions()
    if backend != "liger":
        return bench._run_one(args, ctx.device, ctx.results.device_name, torch_v, triton_v, date, loss, backend, dt,
                              s["bench_n"], s["bench_v"], d)
    # Liger: bench._run_one's record, measured by liger_case
    case = dict(device=ctx.device, threads=args.threads, dtype=dt, n=s["bench_n"], v=s["bench_v"], d=d, d_s=d,
                loss=loss, backend=backend, train_weight=False, repeats=args.repeats)
    row = dict.fromkeys(bench.FIELDS, "")
    row.update(date=date, device=ctx.results.device_name, torch=torch_v, triton=triton_v, threads=args.threads,
               loss=loss, backend="liger-jsd", dtype=dt, n=case["n"], v=case["v"], d=d, d_s=d, train_weight=0,
               repeats=args.repeats, load_avg=f"{os.getloadavg()[0]:.2f}",
               note="; ".join(filter(None, ["Liger-Kernel LigerFusedLinearJSD beta=0 (forward KL)", note])))
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_liger-case", json.dumps(case)],
                              capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        row["note"] += "; timeout"
        return row
    result = next((ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        row["note"] += f"; failed: {err[:160]}"
        return row
    res = json.loads(result)
    med = statistics.median(res["times"])
    flops = bench._floor("kl", "liger", case["n"], case["v"], d, d, False)
    row.update(median_ms=f"{med * 1e3:.1f}", min_ms=f"{min(res['times']) * 1e3:.1f}",
               max_ms=f"{max(res['times']) * 1e3:.1f}", peak_mib=f"{res['peak'] / 2**20:.0f}",
               floor_gflop=f"{flops / 1e9:.1f}", tflops=f"{flops / med / 1e12:.3g}",
               mm_tflops=f"{res['mm_flops'] / 1e12:.3f}", frac_of_mm=f"{flops / med / res['mm_flops']:.3f}")
    return row


def step_bench(ctx):
    s = ctx.sizes
    have_liger = liger_importable()
    rows, skipped = [], []
    for loss, backend, d in s["bench_cases"]:
        if backend == "liger" and not have_liger:
            skipped.append(f"{loss} liger d={d}: liger_kernel not importable")
            continue
        if ctx.out_of_time(10):
            skipped.append(f"{loss} {backend} d={d}: out of time")
            continue
        note = "device check" + ("" if ctx.device == "cuda" else " (CPU mode: plumbing only)")
        row = bench_row(ctx, loss, backend, d, note=note)
        ctx.results.bench_row(row)
        rows.append(row)
    for text in skipped:
        ctx.results.event(step="bench", skipped=text)
    memory = peak_ratios(rows)
    if memory:
        ctx.results.jsonl("bench_memory.jsonl", memory)
    failed = [r for r in rows if not r.get("median_ms")]
    return {"status": "failed" if failed else "measured", "rows": len(rows), "failed_rows": len(failed),
            "skipped": skipped, "peak_vs_naive": memory}


def peak_ratios(rows):
    """Per (loss, d): each back end's peak memory as a share of the naive loss's."""
    naive = {(r["loss"], r["d"]): float(r["peak_mib"]) for r in rows if r["backend"] == "naive" and r.get("peak_mib")}
    out = {}
    for r in rows:
        key = (r["loss"], r["d"])
        if r["backend"] != "naive" and r.get("peak_mib") and naive.get(key):
            out[f"{r['loss']} {r['backend']} d={r['d']}"] = round(float(r["peak_mib"]) / naive[key], 4)
    return out


# ---------------------------------------------------------------------------------------------------------------
# step 3: the tiny pipeline through DeepSpeed, against the CPU goldens

def pipeline_env(device):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               DS_ACCELERATOR="cuda" if device == "cuda" else "cpu",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"))
    env.pop("SEMALIGN_DS_FAULT", None)
    return env


def compare_to_golden(got, golden, dtype):
    """Per stage: the largest relative deviation from the golden losses (every step for float32, the first loss
    for bfloat16) and whether it is within PIPELINE_TOL; every loss must be finite."""
    import math
    tol = PIPELINE_TOL[dtype]
    stages, ok = {}, sorted(got) == sorted(golden)
    for tag, want in golden.items():
        have = got.get(tag, [])
        finite = len(have) == len(want) and all(math.isfinite(x) for x in have)
        pairs = list(zip(have, want)) if dtype == "float32" else list(zip(have[:1], want[:1]))
        dev = max((abs(a - b) / abs(b) for a, b in pairs), default=float("inf"))
        stages[tag] = {"max_rel_dev": dev, "finite": finite, "passed": finite and dev <= tol}
        ok = ok and stages[tag]["passed"]
    return {"tolerance": tol, "stages": stages, "passed": ok}


def step_pipeline(ctx):
    """The tiny config at world 1 through DeepSpeed in each of pipeline_dtypes (pass/fail against the goldens), then
    the plan's diagnostic variants, each compared with the goldens and with the float32 run."""
    from tests.parity import GOLDEN
    golden = json.load(open(GOLDEN))["world1"]["losses"]
    runs = [dict(name="", dtype=dtype, device=ctx.device, set={}) for dtype in ctx.sizes["pipeline_dtypes"]]
    results, all_ok = [], True
    for run in runs + list(ctx.sizes.get("pipeline_variants", [])):
        rec = pipeline_run(ctx, run, golden)
        if run["name"]:
            main = next((r for r in results if not r["variant"] and r["dtype"] == "float32" and "losses" in r), None)
            if main is not None and "losses" in rec:
                rec["vs_float32_run"] = compare_to_golden(rec["losses"], main["losses"], "float32")["stages"]
        ctx.results.jsonl("pipeline.jsonl", rec)
        results.append(rec)
        if not run["name"]:
            all_ok = all_ok and rec.get("passed", False)
    return {"status": "passed" if all_ok else "failed",
            "runs": {r["dtype"]: r.get("passed", False) for r in results if not r["variant"]},
            "variants": {r["variant"]: r.get("passed", False) for r in results if r["variant"]}}


def pipeline_run(ctx, run, golden):
    """One launch of the tiny config: its losses against the goldens, its layer pairing and its alignment map's
    norm (what the stages' targets are made from)."""
    from tests.parity import command, summary
    deepspeed = run.get("deepspeed", True)
    ds = {"ds_source_config": str(ROOT / "ds_configs" / "source_zero3.json"),
          "ds_target_config": str(ROOT / "ds_configs" / "target_zero2.json")} if deepspeed else {}
    out = ctx.workdir / f"tiny-{run['name'] or 'run'}-{run['dtype']}"
    shutil.rmtree(out, ignore_errors=True)
    rec = {"variant": run["name"], "dtype": run["dtype"], "device": run["device"], "world": 1,
           "deepspeed": "ZeRO-3 source, ZeRO-2 target" if deepspeed else "none", "settings": run["set"]}
    if ctx.out_of_time(10):
        return {**rec, "passed": False, "error": "out of time"}
    settings = {**ds, "report_to": "none", "dtype": run["dtype"], **run["set"]}
    t0 = time.time()
    try:
        proc = subprocess.run(command(out, 1, settings), env=pipeline_env(run["device"]),
                              capture_output=True, text=True, timeout=max(10.0, ctx.left()), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**rec, "passed": False, "error": "timeout", "seconds": round(time.time() - t0, 1)}
    rec["seconds"] = round(time.time() - t0, 1)
    if proc.returncode != 0:
        return {**rec, "passed": False, "error": f"exit {proc.returncode}", "log_tail": proc.stderr[-3000:]}
    got = summary(out)["losses"]
    rec.update(losses=got, **compare_to_golden(got, golden, run["dtype"]))
    try:
        from safetensors.torch import load_file
        rec["pairs"] = json.loads((out / "plan.json").read_text())["pairs"]
        rec["alignment_norm"] = float(load_file(str(out / "alignment.safetensors"))["M"].double().norm())
    except (OSError, KeyError, ValueError) as err:
        rec["diagnostics_error"] = str(err)[:200]
    return rec


# ---------------------------------------------------------------------------------------------------------------
# step 4: throughput at a real model shape

THROUGHPUT_FIELDS = ["date", "device", "run", "phase", "seconds", "tokens", "tokens_per_s", "flops_per_token",
                     "flops_rule", "tflops", "mm_tflops", "mfu", "stage_work_per_token", "mfu_stage_work",
                     "n_source", "n_target", "dtype", "settings"]


def write_tokenizer(folder, vocab):
    """The committed 512-token byte-level BPE of the tiny config, its vocabulary padded with unreachable entries
    to `vocab` ids (as real tokenizers reserve ids): text tokenizes as with the tiny one, while the models' heads
    and the losses run over the full vocabulary."""
    from transformers import PreTrainedTokenizerFast
    tiny = ROOT / "launchers" / "configs" / "tiny"
    spec = json.loads((tiny / "tokenizer.json").read_text())
    table = spec["model"]["vocab"]
    ids = set(table.values()) | {t["id"] for t in spec.get("added_tokens", [])}
    assert ids == set(range(len(ids))), "the tiny tokenizer's ids are not contiguous"
    for k in range(len(ids), vocab):
        table[f"<|reserved_{k}|>"] = k
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", model_max_length=4096)
    assert len(tok) == vocab, (len(tok), vocab)
    tok.save_pretrained(folder)
    return tok


def build_model(folder, shape, vocab, seed, device, dtype):
    """A random-weight LlamaForCausalLM of `shape` (tied embeddings), saved with the padded tokenizer beside it;
    returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    write_tokenizer(folder, vocab)
    cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=4096, eos_token_id=0,
                      pad_token_id=0, bos_token_id=0, rms_norm_eps=1e-5, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="1GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n_params


def matmul_tflops(device, size=8192):
    """A plain [size, size] @ [size, size] product's rate (median of several), bf16 on CUDA, float32 on CPU."""
    import torch

    from semalign_ds.kernels import bench
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return bench._matmul_rate(torch, dev, dtype, size, rows=size, cols=size) / 1e12


def phase_flops(phase, n_s, n_t):
    if phase == "attribution":
        return 4 * n_s, "4*N_s (source forward + activation backward)"
    if phase == "cache":
        return 2 * n_s, "2*N_s (source forward)"
    if phase.startswith("stage_") or phase in ("output_kd", "finetune"):
        return 6 * n_t, "6*N_t (cached phase)"
    return None, ""


def stage_work(phase, shapes):
    """FLOPs per loss token that a frontier stage does (6*N_t counts the whole target, a stage trains one layer):
    the layer's forward and backward, 6 * its parameters, plus the loss with the head frozen, Fisher 8*V*d_t on
    the inner stages, the output KL 2*V*(d_s + 3*d_t) on the last. None for other phases."""
    if not phase.startswith("stage_") or not phase[6:].isdigit():
        return None
    t, v, d_s = shapes["target"], shapes["vocab"], shapes["source"]["hidden_size"]
    d, f, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
    layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q, o; k, v; gate, up, down; two norms
    loss = 8 * v * d if int(phase[6:]) < layers else 2 * v * (d_s + 3 * d)
    return 6 * layer + loss


def step_throughput(ctx):
    import torch
    s, dev = ctx.sizes, ctx.device
    m, tp = s["models"], s["throughput"]
    model_dtype = tp["dtype"]
    mm = matmul_tflops(dev, 8192 if dev == "cuda" else 512)
    ctx.results.event(step="throughput", matmul_tflops=round(mm, 3))
    folder = ctx.workdir / "throughput-models"
    shutil.rmtree(folder, ignore_errors=True)
    n_s = build_model(folder / "source", m["source"], m["vocab"], 0, dev, model_dtype)
    n_t = build_model(folder / "target", m["target"], m["vocab"], 1, dev, model_dtype)
    ctx.results.event(step="throughput", n_source=n_s, n_target=n_t)
    torch.cuda.empty_cache() if dev == "cuda" else None
    settings = {"source": str(folder / "source"), "target": str(folder / "target"), "data": "embedded:stdlib",
                "eval_data": None, "report_to": ["none"], "checkpoint_every": 0, "log_every": 1,
                "cache_shard_examples": tp["max_examples"], "pairing": "attribution", "lr": 1e-4,
                **tp}
    date = datetime.datetime.now().isoformat(timespec="seconds")
    runs, failed = [], []
    from semalign_ds import summary
    for run, method in (("semalign", "semalign"), ("output_kd", "output_kd")):
        if ctx.out_of_time(20):
            failed.append(f"{run}: out of time")
            continue
        out = ctx.workdir / f"throughput-{run}"
        shutil.rmtree(out, ignore_errors=True)
        cfg_path = ctx.workdir / f"throughput-{run}.yaml"
        cfg_path.write_text(json.dumps({**settings, "method": method, "output_dir": str(out)}))  # JSON is YAML
        cmd = [sys.executable, str(ROOT / "launchers" / "transfer.py"), "--config", str(cfg_path),
               "--output-dir", str(out)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=pipeline_env(dev), capture_output=True, text=True,
                                  timeout=max(10.0, ctx.left()), cwd=ROOT)
        except subprocess.TimeoutExpired:
            failed.append(f"{run}: timeout after {time.time() - t0:.0f} s")
            continue
        wall = time.time() - t0
        if proc.returncode != 0:
            failed.append(f"{run}: exit {proc.returncode}")
            ctx.results.event(step="throughput", run=run, error=f"exit {proc.returncode}",
                              log_tail=proc.stderr[-3000:])
            continue
        phases = summary.phase_rates(str(out))
        phases["run"] = {"seconds": wall, "tokens": None, "tokens_per_s_total": None}
        for phase, p in phases.items():
            rate = p.get("tokens_per_s_total")
            fpt, rule = phase_flops(phase, n_s, n_t)
            tflops = rate * fpt / 1e12 if rate and fpt else None
            row = {"date": date, "device": ctx.results.device_name, "run": run, "phase": phase,
                   "seconds": _fmt(p.get("seconds"), ".3f"), "tokens": p.get("tokens") or "",
                   "tokens_per_s": _fmt(rate, ".1f"), "flops_per_token": fpt or "", "flops_rule": rule,
                   "tflops": _fmt(tflops, ".4g"), "mm_tflops": f"{mm:.4g}", "mfu": _fmt(tflops / mm if tflops else None,
                                                                                     ".3f"),
                   "n_source": n_s, "n_target": n_t, "dtype": model_dtype,
                   "stage_work_per_token": stage_work(phase, m) or "",
                   "mfu_stage_work": _fmt(rate * stage_work(phase, m) / 1e12 / mm if rate and stage_work(phase, m)
                                          else None, ".3f"),
                   "settings": " ".join(f"{k}={v}" for k, v in tp.items())}
            ctx.results.csv_row("throughput.csv", THROUGHPUT_FIELDS, row)
        runs.append(run)
    shutil.rmtree(folder, ignore_errors=True)
    return {"status": "failed" if failed else "measured", "runs": runs, "failed": failed,
            "n_source": n_s, "n_target": n_t, "matmul_tflops": round(mm, 3)}


def _devs(stages):
    return ", ".join(f"{t} {s['max_rel_dev']:.2e}" for t, s in stages.items())


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------------------------------
# gpu.md

def _table(rows, cols):
    if not rows:
        return "(none)\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _detail(info):
    if info.get("error") or info.get("reason"):
        return info.get("error") or info.get("reason")
    if "checks" in info:
        return f"{info['checks']} checks, {info['failed_checks']} failed"
    if "rows" in info:
        return f"{info['rows']} rows, {info['failed_rows']} failed" + (f"; {len(info['skipped'])} skipped"
                                                                       if info.get("skipped") else "")
    if "runs" in info:
        runs = info["runs"]
        return ", ".join(f"{k} {'passed' if v else 'failed'}" for k, v in runs.items()) if isinstance(runs, dict) \
            else ", ".join(runs) + ("; failed: " + ", ".join(info["failed"]) if info.get("failed") else "")
    return ""


def _count(n):
    n = int(n)
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def clean_paths(text):
    """Machine paths out of what gets committed: the checkout as ".", installed packages from site-packages/."""
    text = text.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
    return re.sub(r"(?:/[^\s\"'/]+)+/(?:site|dist)-packages/", "site-packages/", text)


def write_markdown(results, outcome):
    """gpu.md: device, versions, date, each step's status and tables; rewritten after every step."""
    summ = json.loads(results.path("summary.json").read_text()) if results.path("summary.json").exists() else {}
    ver = summ.get("versions", {})
    title = "GPU device check" if results.mode == "cuda" else "Device check (CPU mode: plumbing only, no GPU figures)"
    md = [f"# {title}\n",
          f"- device: {results.device_name}",
          f"- date: {results.started}",
          "- versions: " + ", ".join(f"{k} {ver.get(k, '-')}" for k in
                                     ("torch", "triton", "cuda", "driver", "transformers", "deepspeed",
                                      "liger-kernel", "python", "commit")),
          "- command: `bash benchmarks/device_check.sh OUT` (benchmarks/device_check.py; its docstring says what "
          "each step measures and against what)\n",
          "## Steps\n",
          _table([{"step": k, "status": v.get("status"), "seconds": v.get("seconds", ""), "detail": _detail(v)}
                  for k, v in outcome.items()], ["step", "status", "seconds", "detail"])]
    kern = results.read_jsonl("kernels.jsonl")
    md += ["## 1. Kernels against float64 (relative norm errors; tolerances of tests/test_kernels.py)\n",
           _table([{**k, **{e: f"{k[e]:.2e}" for e in ("err_loss", "err_grad_x", "err_grad_w") if e in k}}
                   for k in kern],
                  ["loss", "dtype", "n", "d", "d_s", "v", "err_loss", "err_grad_x", "err_grad_w", "tol_loss",
                   "tol_grad", "passed", "error"])]
    bench = results.read_csv("bench.csv")
    md += ["## 2. Kernel benchmark (forward + backward w.r.t. x; peak memory over the inputs)\n",
           _table(bench, ["loss", "backend", "dtype", "n", "v", "d", "median_ms", "tflops", "mm_tflops",
                          "frac_of_mm", "peak_mib", "note"])]
    mem = results.read_jsonl("bench_memory.jsonl")
    if mem:
        md += ["Peak memory as a share of the naive loss's: " +
               ", ".join(f"{k} {v:.3f}" for k, v in mem[-1].items()) + "\n"]
    pipe = results.read_jsonl("pipeline.jsonl")
    md += ["## 3. Tiny pipeline through DeepSpeed (world 1) against the CPU goldens\n",
           _table([{"run": p.get("variant") or "run", "device": p.get("device", ""), "dtype": p["dtype"],
                    "passed": p.get("passed"), "tolerance": p.get("tolerance", ""),
                    "max rel dev per stage": _devs(p.get("stages", {})),
                    "vs the float32 run": _devs(p.get("vs_float32_run", {})),
                    "pairs": p.get("pairs", ""), "alignment norm": _fmt(p.get("alignment_norm"), ".9g"),
                    "seconds": p.get("seconds", ""), "error": p.get("error", "")} for p in pipe],
                  ["run", "device", "dtype", "passed", "tolerance", "max rel dev per stage", "vs the float32 run",
                   "pairs", "alignment norm", "seconds", "error"])]
    if any(p.get("variant") for p in pipe):
        md += ["Runs other than `run` are diagnostics beside the check (not part of pass/fail): `chunked` has the "
               "PyTorch loss in place of the Triton kernels, `no-deepspeed` the source whole and the stages under "
               "plain PyTorch.\n"]
    thr = results.read_csv("throughput.csv")
    md += ["## 4. Transfer throughput, random-weight Llama shapes\n",
           _table(thr, ["run", "phase", "seconds", "tokens", "tokens_per_s", "flops_rule", "tflops", "mm_tflops",
                        "mfu", "mfu_stage_work"])]
    if thr:
        md += [f"Source {_count(thr[0]['n_source'])}, target {_count(thr[0]['n_target'])} parameters, "
               f"{thr[0]['dtype']}; {thr[0]['settings']}. Stage tokens are loss tokens; `run` is the whole launch "
               "(start-up, loading, export). mfu counts 6*N_t per token on the training phases; a frontier "
               "stage trains one layer, so mfu_stage_work counts what it does (the layer's 6*N_layer and the loss "
               "over the vocabulary, Fisher 8*V*d_t or the final KL 2*V*(d_s + 3*d_t)).\n"]
    errors = [(k, v) for k, v in outcome.items() if v.get("traceback")]
    if errors:
        md += ["## Errors\n"] + [f"### {k}\n\n```\n{v['traceback'][-2500:]}\n```\n" for k, v in errors]
    tmp = results.path("gpu.md.tmp")
    tmp.write_text(clean_paths("\n".join(md)))
    os.replace(tmp, results.path("gpu.md"))


# ---------------------------------------------------------------------------------------------------------------
# committing the results into the repository

def commit_into(results_dir, repo):
    """Append results_dir/bench.csv's CUDA rows to repo/kernels/bench_results.csv (with its header's columns) and
    copy results_dir/gpu.md to repo/benchmarks/gpu.md. A CPU-mode folder is refused: it holds no GPU figures."""
    results_dir, repo = Path(results_dir), Path(repo)
    summ = json.loads((results_dir / "summary.json").read_text())
    if summ.get("mode") != "cuda":
        raise SystemExit(f"{results_dir} holds a {summ.get('mode')}-mode run: nothing to commit")
    target = repo / "kernels" / "bench_results.csv"
    with open(target, newline="") as f:
        fields = next(csv.reader(f))
    rows = []
    if (results_dir / "bench.csv").exists():
        with open(results_dir / "bench.csv", newline="") as f:
            rows = [{**r, "note": clean_paths(r.get("note", ""))} for r in csv.DictReader(f)
                if not r.get("device", "").startswith("cpu")]
    with open(target, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        w.writerows(rows)
    (repo / "benchmarks").mkdir(exist_ok=True)
    shutil.copyfile(results_dir / "gpu.md", repo / "benchmarks" / "gpu.md")
    return len(rows)


# ---------------------------------------------------------------------------------------------------------------
# entry point

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("out", nargs="?", type=Path, help="results folder (created; records are appended)")
    p.add_argument("--cpu", "--dry", dest="cpu", action="store_true",
                   help="the same code paths at tiny sizes on CPU (Triton's interpreter for the kernels)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run, in this order")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for all steps (default: 470 on a GPU, 1800 with --cpu)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where models and runs go (default: a temporary folder, removed at the end); never the "
                        "results folder, which comes back from the device")
    p.add_argument("--commit-into", type=Path, default=None, metavar="REPO",
                   help="after the run (or with --commit-only), append the CUDA rows to REPO/kernels/"
                        "bench_results.csv and write REPO/benchmarks/gpu.md")
    p.add_argument("--commit-only", action="store_true", help="run nothing: commit the results folder OUT")
    p.add_argument("--_liger-case", dest="liger_case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_kernels", dest="kernels_job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.liger_case is None and args.kernels_job is None and args.out is None:
        p.error("the results folder OUT is required")
    if args.commit_only and args.commit_into is None:
        p.error("--commit-only needs --commit-into REPO")
    if args.budget_s is None:
        args.budget_s = plan(args.cpu)["budget_s"]
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    args.steps = [s for s in STEPS if s in args.steps]  # always in the order of importance
    return args


def step_functions():
    return {"kernels": step_kernels, "bench": step_bench, "pipeline": step_pipeline, "throughput": step_throughput}


def main(argv=None):
    args = parse_args(argv)
    if args.liger_case:
        print("RESULT " + json.dumps(liger_case(json.loads(args.liger_case))), flush=True)
        return 0
    if args.kernels_job:
        job = json.loads(args.kernels_job)
        kernel_checks(Results(job["out"], job["device_name"]), plan(job["cpu"])["kernel_sizes"],
                      "cpu" if job["cpu"] else "cuda", job["deadline"], [job["loss"]], [job["dtype"]])
        return 0
    if args.commit_only:
        n = commit_into(args.out, args.commit_into)
        print(f"appended {n} rows to {args.commit_into / 'kernels' / 'bench_results.csv'}; wrote "
              f"{args.commit_into / 'benchmarks' / 'gpu.md'}")
        return 0
    import torch
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: run with --cpu for the CPU code paths")
    if args.cpu:
        # before anything imports a kernel module (Triton reads it then); children inherit both
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cpu" if args.cpu else "cuda"
    results = Results(args.out, device_name(device), mode=device)
    ctx = Context(args, results, plan(args.cpu), device)
    ctx.versions = versions()
    results.event(step="start", mode=device, device=results.device_name, versions=ctx.versions,
                  steps=args.steps, budget_s=args.budget_s)
    fns = step_functions()
    try:
        outcome = run_steps(ctx, [(name, fns[name]) for name in args.steps])
    finally:
        if args.workdir is None:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
    code = exit_code(outcome, args.steps)
    results.event(step="end", exit_code=code, elapsed_s=round(time.time() - ctx.start, 1))
    print(json.dumps({k: v.get("status") for k, v in outcome.items()}), f"exit {code}; results in {args.out}")
    if args.commit_into is not None and not args.cpu:
        n = commit_into(args.out, args.commit_into)
        print(f"appended {n} rows to kernels/bench_results.csv; wrote benchmarks/gpu.md")
    return code


if __name__ == "__main__":
    sys.exit(main())
