"""Benchmark of the fused losses: time of forward + backward and peak memory per back end, against the FLOP floor.

    python -m semalign_ds.kernels.bench --cpu-default          # the CPU case the project tracks
    python -m semalign_ds.kernels.bench --n 8192 --v 128256 --d 4096 --dtype bf16 --backends chunked triton
    python -m semalign_ds.kernels.bench --cpu-topk                 # top-k Fisher against exact, embedded default

Every case runs in a fresh subprocess (an out-of-memory naive case cannot take the others down, and CPU peak
memory is that process's own). Peak memory is the increase over the inputs: torch.cuda.max_memory_allocated on
a GPU, the resident-set high-water mark (/proc/self/status VmHWM, reset through /proc/self/clear_refs) on a CPU.
The FLOP floor is 8*N*V*d for the Fisher loss and 2*N*V*(d_s + 3*d_t) for KL (docs/method.md; a trainable weight
adds 2*N*V*d_t); "of mm" is the achieved FLOP rate over a plain matrix multiply measured on the same device and
dtype with the case's d (on a CPU in float32 whatever the case's dtype: the CPU back ends compute in float32).
The floor is the fused one-pass formulation's: naive and chunked form dloss/dz and multiply by W once (6*N*V*d
for Fisher, 2*N*V*(d_s + 2*d_t) for KL), so their fraction can exceed 1.
Top-k Fisher (backend "topk<k>", --topk): the support (ids, z*, tail) is computed once before timing, as the cache
does, and its time goes into the note; the loss's floor is 4*N*k*d (W_S x and the gradient's k-row product; a
trainable weight adds 2*N*k*d). Its speed-up is read from median_ms against the exact back ends'.
Rows are printed and appended to kernels/bench_results.csv with device, versions, date and load average.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "bench_results.csv"
FIELDS = ["date", "device", "torch", "triton", "threads", "loss", "backend", "dtype", "n", "v", "d", "d_s",
          "train_weight", "repeats", "median_ms", "min_ms", "max_ms", "peak_mib", "floor_gflop", "tflops",
          "mm_tflops", "frac_of_mm", "load_avg", "note"]
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------------------------------------------
# one case, in its own process

def _mem_now(torch, device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status("VmRSS")


def _proc_status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


def _reset_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak(torch, device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status("VmHWM")


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_rate(torch, device, dtype, d, rows, cols=8192):
    """FLOP/s of a plain [rows, d] @ [d, cols] product (median of several): the rate the losses are measured
    against, on the same device, dtype and width."""
    repeats = 20 if device.type == "cuda" else 5
    a = torch.randn(rows, d, device=device, dtype=dtype)
    b = torch.randn(cols, d, device=device, dtype=dtype)
    (a @ b.T).sum()
    times = []
    for _ in range(repeats):
        _sync(torch, device)
        t = time.perf_counter()
        a @ b.T
        _sync(torch, device)
        times.append(time.perf_counter() - t)
    return 2 * rows * cols * d / statistics.median(times)


def case_inputs(torch, case):
    """(device, dtype, generator, rand, x, w, mask): the seeded draws every benchmark of `case` starts from, in this
    order (logits of order one, a tenth of rows masked); rand(*shape, scale) draws the rest from the same generator,
    so that another implementation measured on `case` sees the same inputs."""
    device = torch.device(case["device"])
    dtype = getattr(torch, DTYPES[case["dtype"]])
    n, v, d = case["n"], case["v"], case["d"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    x = rand(n, d).requires_grad_()
    w = rand(v, d, scale=d ** -0.5).requires_grad_(case["train_weight"])
    mask = torch.rand(n, generator=gen, device=device) > 0.1
    return device, dtype, gen, rand, x, w, mask


def run_case(case):
    import torch

    from semalign_ds.losses import fisher_quadratic_loss, fisher_topk_loss, fisher_topk_support, linear_kl_loss

    if case["device"] == "cpu":
        torch.set_num_threads(case["threads"])
    device, dtype, gen, rand, x, w, mask = case_inputs(torch, case)
    n, v, d, d_s = case["n"], case["v"], case["d"], case["d_s"]
    backend, extra = case["backend"], {}
    if case["loss"] == "fisher":
        y = (x.detach().float() + 0.3 * torch.randn(n, d, generator=gen, device=device)).to(dtype)
        if backend.startswith("topk"):
            _sync(torch, device)
            t = time.perf_counter()
            support = fisher_topk_support(y, w.detach(), int(backend[4:]), 2.0)
            _sync(torch, device)
            extra["support_s"] = time.perf_counter() - t

            def loss_fn():
                return fisher_topk_loss(x, w, *support, temperature=2.0, mask=mask)
        else:
            def loss_fn():
                return fisher_quadratic_loss(x, y, w, temperature=2.0, mask=mask, backend=backend)
    else:
        x_s, w_s = rand(n, d_s), rand(v, d_s, scale=d_s ** -0.5)

        def loss_fn():
            return linear_kl_loss(x, w, x_s, w_s, temperature=2.0, mask=mask, backend=backend)

    def step():
        x.grad = None
        w.grad = None
        loss_fn().backward()

    # CPU: the peak is read on the first step. Later steps reuse heap memory that glibc keeps after the first
    # frees (its mmap threshold grows with them), so their high-water mark barely moves above the inputs.
    # GPU: read on the timed steps, after autotuning (whose benchmarking allocates a cache-flush buffer).
    _sync(torch, device)
    base = _mem_now(torch, device)
    can_reset = _reset_peak(torch, device)
    step()
    _sync(torch, device)
    peak = _peak(torch, device) - base if can_reset else float("nan")
    times = []
    if device.type == "cuda":
        base = _mem_now(torch, device)
        _reset_peak(torch, device)
    for _ in range(case["repeats"]):
        _sync(torch, device)
        t = time.perf_counter()
        step()
        _sync(torch, device)
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = _peak(torch, device) - base
    mm = _matmul_rate(torch, device, dtype if device.type == "cuda" else torch.float32, d, rows=min(n, 8192))
    return {"times": times, "peak": peak, "mm_flops": mm, **extra}


# ---------------------------------------------------------------------------------------------------------------
# driver

def _floor(loss, backend, n, v, d, d_s, train_weight):
    if backend.startswith("topk"):
        k = int(backend[4:])
        return 4 * n * k * d + (2 * n * k * d if train_weight else 0)
    flops = 8 * n * v * d if loss == "fisher" else 2 * n * v * (d_s + 3 * d)
    return flops + (2 * n * v * d if train_weight else 0)


def _device_name(device):
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name(0)
    return f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _versions():
    import torch
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "-"
    return torch.__version__, tv


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-default", action="store_true",
                   help="the tracked CPU case: N=8192 V=49152 d=576 fp32, naive vs chunked, both losses")
    p.add_argument("--n", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--v", type=int, nargs="+", default=[32000, 49152, 128256, 262144])
    p.add_argument("--d", type=int, nargs="+", default=[576, 2048, 4096])
    p.add_argument("--d-s", type=int, default=None, help="source width for KL (default: d)")
    p.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                   help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--cpu-topk", action="store_true",
                   help="top-k Fisher at k=64, 256, 1024 against exact chunked: N=2048 V=49152 d=576, fp32 and bf16")
    p.add_argument("--backends", nargs="+", default=None, choices=["naive", "chunked", "triton"],
                   help="default: all three on a GPU, naive and chunked on a CPU")
    p.add_argument("--topk", type=int, nargs="+", default=[],
                   help="also time the top-k Fisher loss at these k (Fisher only)")
    p.add_argument("--loss", nargs="+", default=["fisher", "kl"], choices=["fisher", "kl"])
    p.add_argument("--train-weight", action="store_true", help="the head weight requires grad (dW timed too)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--csv", type=Path, default=RESULTS)
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--note", default="")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._case:
        print("RESULT " + json.dumps(run_case(json.loads(args._case))))
        return

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cpu_default:
        device, args.n, args.v, args.d, args.dtype, args.backends = "cpu", [8192], [49152], [576], ["fp32"], \
            ["naive", "chunked"]
    if args.cpu_topk:
        device, args.n, args.v, args.d, args.dtype, args.backends, args.loss = "cpu", [2048], [49152], [576], \
            ["fp32", "bf16"], ["chunked"], ["fisher"]
        args.topk = args.topk or [64, 256, 1024]
    dtypes = args.dtype or (["bf16"] if device == "cuda" else ["fp32"])
    backends = args.backends or (["naive", "chunked", "triton"] if device == "cuda" else ["naive", "chunked"])
    if device != "cuda" and "triton" in backends:
        print("triton back end skipped: no CUDA device")
        backends = [b for b in backends if b != "triton"]

    torch_v, triton_v = _versions()
    dev_name = _device_name(device)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"# {dev_name}; torch {torch_v}, triton {triton_v}; {date}; threads {args.threads}")
    header = f"{'loss':6} {'backend':8} {'dtype':5} {'N':>6} {'V':>7} {'d':>5} {'ms':>10} {'peak MiB':>9} " \
             f"{'TFLOP/s':>8} {'of mm':>6}"
    print(header)
    rows = []
    for loss in args.loss:
        for dt in dtypes:
            for n in args.n:
                for v in args.v:
                    for d in args.d:
                        for backend in backends + ([f"topk{k}" for k in args.topk] if loss == "fisher" else []):
                            row = _run_one(args, device, dev_name, torch_v, triton_v, date, loss, backend, dt, n,
                                           v, d)
                            rows.append(row)
                            print(f"{loss:6} {backend:8} {dt:5} {n:>6} {v:>7} {d:>5} {row['median_ms']:>10} "
                                  f"{row['peak_mib']:>9} {row['tflops']:>8} {row['frac_of_mm']:>6}"
                                  + (f"  {row['note']}" if row["note"] else ""), flush=True)
    if not args.no_csv:
        new = not args.csv.exists()
        with open(args.csv, "a", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                wr.writeheader()
            wr.writerows(rows)
        print(f"appended {len(rows)} rows to {args.csv}")
    return rows


def _run_one(args, device, dev_name, torch_v, triton_v, date, loss, backend, dt, n, v, d):
    d_s = args.d_s or d
    case = dict(device=device, threads=args.threads, dtype=dt, n=n, v=v, d=d, d_s=d_s, loss=loss, backend=backend,
                train_weight=args.train_weight, repeats=args.repeats)
    row = dict.fromkeys(FIELDS, "")
    row.update(date=date, device=dev_name, torch=torch_v, triton=triton_v, threads=args.threads, loss=loss,
               backend=backend, dtype=dt, n=n, v=v, d=d, d_s=d_s, train_weight=int(args.train_weight),
               repeats=args.repeats, load_avg=f"{os.getloadavg()[0]:.2f}", note=args.note)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        out = subprocess.run([sys.executable, "-m", "semalign_ds.kernels.bench", "--_case", json.dumps(case)],
                             capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        row["note"] = (row["note"] + " timeout").strip()
        return row
    result = next((ln[7:] for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or result is None:
        err = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        oom = "out of memory" in out.stderr.lower() or out.returncode in (-9, 137)
        row["note"] = (row["note"] + (" OOM" if oom else f" failed: {err[:120]}")).strip()
        return row
    res = json.loads(result)
    med = statistics.median(res["times"])
    flops = _floor(loss, backend, n, v, d, d_s, args.train_weight)
    row.update(median_ms=f"{med * 1e3:.1f}", min_ms=f"{min(res['times']) * 1e3:.1f}",
               max_ms=f"{max(res['times']) * 1e3:.1f}", peak_mib=f"{res['peak'] / 2**20:.0f}",
               floor_gflop=f"{flops / 1e9:.1f}", tflops=f"{flops / med / 1e12:.3g}",
               mm_tflops=f"{res['mm_flops'] / 1e12:.3f}", frac_of_mm=f"{flops / med / res['mm_flops']:.3f}")
    if "support_s" in res:
        row["note"] = "; ".join(filter(None, [f"support {res['support_s']:.1f} s", row["note"]]))
    return row


if __name__ == "__main__":
    main()
