"""Peak memory and time of the alignment phase, before (float64 pinv of both V x d heads) and after (the blocked
Gram-matrix path of semalign_ds.alignment), on random float32 heads of real models' shapes.

    python benchmarks/alignment_memory.py                      # V=262144, d=640 (Gemma-3-270M)
    python benchmarks/alignment_memory.py --shape 128256 2048  # Llama-3.2-1B's head shape

Each measurement runs in a fresh process: peak = VmHWM at the end minus VmRSS once the heads exist (the heads
themselves are not counted; tracemalloc does not see torch's allocations). Both maps are checked against each
other."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def pinv_map(w_t, w_s, dtype=torch.float64):
    """The former implementation: float64 pseudo-inverses of the V x d heads, unit columns, S_t S_s^T."""
    def basis(w):
        b = torch.linalg.pinv(w.to(dtype))
        n = b.norm(dim=0, keepdim=True)
        return torch.where(n <= n.max() * 1e-6, torch.zeros((), dtype=dtype), b / n.clamp(min=torch.finfo(dtype).tiny))
    return (basis(w_t) @ basis(w_s).T).float()


def measure(impl, vocab, d_t, d_s, seed=0):
    from semalign_ds import alignment
    gen = torch.Generator().manual_seed(seed)
    w_t = torch.randn(vocab, d_t, generator=gen)
    w_s = torch.randn(vocab, d_s, generator=gen)
    base = _status("VmRSS")
    t0 = time.perf_counter()
    m = pinv_map(w_t, w_s) if impl == "pinv" else alignment.alignment_map(w_t, w_s)
    seconds = time.perf_counter() - t0
    m_file = os.path.join(tempfile.gettempdir(), f"alignment_bench_{impl}_{os.getpid()}.pt")
    torch.save(m, m_file)
    return {"impl": impl, "vocab": vocab, "d_t": d_t, "d_s": d_s, "seconds": round(seconds, 1),
            "peak_mib": round((_status("VmHWM") - base) / 2 ** 20), "threads": torch.get_num_threads(),
            "m_file": m_file}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", nargs=2, type=int, default=[262144, 640], metavar=("V", "D"))
    p.add_argument("--impl", choices=["pinv", "blocked", "both"], default="both")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    vocab, d = args.shape
    if args.child:
        print(json.dumps(measure(args.impl, vocab, d, d)))
        return
    from semalign_ds import alignment
    rows = []
    for impl in (["pinv", "blocked"] if args.impl == "both" else [args.impl]):
        out = subprocess.run([sys.executable, __file__, "--child", "--impl", impl, "--shape", str(vocab), str(d)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    if len(rows) == 2:
        a, b = (torch.load(r["m_file"]).double() for r in rows)
        print(f"relative difference of the two maps: {((a - b).norm() / a.norm()).item():.2e}")
    for r in rows:
        os.remove(r["m_file"])
    cost = alignment.alignment_cost(vocab, d, d, 8)
    print(f"alignment_cost: peak {cost['peak_bytes'] / 2 ** 20:.0f} MiB, {cost['flops'] / 1e12:.2f} TFLOP")
    print("load average:", os.getloadavg())


if __name__ == "__main__":
    main()
