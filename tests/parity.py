"""Loss parity: the tiny config's per-step losses of every stage and the exported target's tensor norms, on 1 and
2 ranks, against committed golden values (torchtitan's loss-parity idea). A refactor that changes nothing passes;
a deliberate change of the numbers regenerates the goldens with `python -m tests.parity --write` and says why in
its commit.

The transfer rows are a committed file, tests/golden/tiny_transfer.jsonl: the first rows that the tiny config's
`embedded:stdlib` draws (seed 0) from Python 3.11's standard library, written out once. The embedded set itself is
read from the running interpreter's library, so on another Python release it holds other functions, and a run on it
other losses: the goldens would hold for one CPython release alone.

The goldens are compared within a tolerance, not bit for bit: the same run on another CPU model (another set of
vector instructions, so other kernels in torch's BLAS) differs in the last bits (up to 3e-6 relative in a loss). Bitwise
equality is what a resumed run owes an uninterrupted one on the same machine: the fault tests compare with the
uninterrupted run of the same session (the `uninterrupted` fixture in tests/conftest.py).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "launchers", "configs", "tiny.yaml")
GOLDEN = os.path.join(ROOT, "tests", "golden", "tiny_parity.json")
TINY_DATA = os.path.join(ROOT, "tests", "golden", "tiny_transfer.jsonl")
SETTINGS = {"data": TINY_DATA, "max_examples": 20, "stage_steps": 6, "eval_max_examples": 4,
            "cache_shard_examples": 6, "batch_size": 4, "checkpoint_every": 2, "eval_max_seq_len": 160, "log_every": 1}


def command(out, world, extra=None):
    """The command line of the tiny config into `out` on `world` ranks (torchrun for 2)."""
    script = os.path.join(ROOT, "launchers", "transfer.py")
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
                              if world > 1 else []) + [script, "--config", TINY_YAML, "--output-dir", str(out)]
    return cmd + [f"--set={k}={v}" for k, v in {**SETTINGS, **(extra or {})}.items()]


def environment(fault=None):
    """One thread per rank (the goldens depend on it); SEMALIGN_DS_FAULT only when asked for."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SEMALIGN_DS_FAULT", None)
    if fault:
        env["SEMALIGN_DS_FAULT"] = fault
    return env


def launch(out, world, extra=None, fault=None, timeout=600):
    """Run the tiny config into `out` on `world` ranks, one thread per rank; the finished process."""
    return subprocess.run(command(out, world, extra), env=environment(fault), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def tensor_checksum(path):
    """sha256 over the tensors of a safetensors file (names sorted, raw bytes), independent of its metadata."""
    digest = hashlib.sha256()
    with safe_open(path, framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            digest.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
            digest.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_norms(path):
    """{name: float64 norm} of every tensor of a safetensors file: the target's fingerprint across machines."""
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name).double().norm().item() for name in sorted(f.keys())}


def summary(out):
    """Per-step losses of every training tag, and the exported target's checksum and tensor norms."""
    losses = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                losses.setdefault(row["tag"], {})[str(row["step"])] = row["loss"]
    return {"losses": {tag: [steps[s] for s in sorted(steps, key=int)] for tag, steps in losses.items()},
            "target_checksum": tensor_checksum(os.path.join(out, "target", "model.safetensors")),
            "target_norms": tensor_norms(os.path.join(out, "target", "model.safetensors"))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--write", action="store_true", help="regenerate the golden file")
    p.add_argument("--workdir", default="/tmp/semalign-parity")
    args = p.parse_args()
    import shutil
    import torch
    result = {"torch": torch.__version__.split("+")[0],
              "settings": {**SETTINGS, "data": os.path.relpath(TINY_DATA, ROOT)}}
    for world in (1, 2):
        out = os.path.join(args.workdir, f"world{world}")
        shutil.rmtree(out, ignore_errors=True)
        proc = launch(out, world)
        if proc.returncode != 0:
            sys.exit(proc.stdout[-2000:] + proc.stderr[-4000:])
        result[f"world{world}"] = summary(out)
    if args.write:
        with open(GOLDEN, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({k: v["target_checksum"] for k, v in result.items() if k.startswith("world")}, indent=1))


if __name__ == "__main__":
    main()
