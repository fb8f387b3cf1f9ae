"""Data-parallel evaluation: 2 ranks (torchrun, gloo on CPU) give the same scores and per-example results as 1."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, TINY
from test_evaluate import GSM8K, HUMANEVAL, MBPP, MMLU, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.sandbox]  # torchrun; runs generated code


def launch(args, nproc, tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    env.pop("SEMALIGN_DS_SHM_COMM", None)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    script = os.path.join(ROOT, "launchers", "evaluate.py")
    runner = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node", str(nproc)]
    proc = subprocess.run(runner + [script] + args, env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def results(out):
    report = json.loads((out / "report.json").read_text())
    samples = {}
    for path in sorted((out / "samples").rglob("*.jsonl")):
        samples[str(path.relative_to(out))] = [json.loads(line) for line in path.read_text().splitlines()]
    return report, samples


def test_two_ranks_give_the_same_scores_as_one(tmp_path):
    data = {"mmlu": MMLU, "gsm8k": GSM8K, "humaneval": HUMANEVAL, "mbpp": MBPP + MBPP[:1]}
    args = ["--model", f"source={os.path.join(TINY, 'source.json')}",
            "--model", f"target={os.path.join(TINY, 'target.json')}",
            "--benchmarks", "mmlu,gsm8k,humaneval,mbpp,nll", "--limit", "5", "--batch-size", "2",
            "--max-new-tokens", "6", "--dtype", "float64", "--allow-code-execution"]
    for name, rows in data.items():
        args += [f"--data-{name}", write_jsonl(tmp_path / f"{name}.jsonl", rows)]
    # one-shot prompts, the examples drawn from the fixtures themselves (mmlu: one row per subject)
    args += ["--num-fewshot", "1"] + [f"--fewshot-{name}={tmp_path / f'{name}.jsonl'}" for name in ("mmlu", "gsm8k",
                                                                                                   "mbpp")]
    one_out = launch(args + ["--output-dir", str(tmp_path / "one")], 1, tmp_path)
    launch(args + ["--output-dir", str(tmp_path / "two")], 2, tmp_path)
    one, one_samples = results(tmp_path / "one")
    two, two_samples = results(tmp_path / "two")
    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    assert "| model | MMLU acc (%)" in one_out and (tmp_path / "two" / "report.png").is_file()
    assert len(one_samples) == 8  # 4 per-example benchmarks x 2 models
    # predictions, generations and test outcomes are identical; log-likelihoods agree to rounding (float64)
    strip = {k: [{f: v for f, v in r.items() if f != "loglikelihoods"} for r in rows] for k, rows in
             one_samples.items()}
    assert strip == {k: [{f: v for f, v in r.items() if f != "loglikelihoods"} for r in rows] for k, rows in
                     two_samples.items()}
    for k, rows in one_samples.items():
        for r, s in zip(rows, two_samples[k]):
            assert r.get("loglikelihoods", []) == pytest.approx(s.get("loglikelihoods", []), abs=1e-9)
    for name in ("source", "target"):
        a, b = one["models"][name]["results"], two["models"][name]["results"]
        for bench in ("mmlu", "gsm8k", "humaneval", "mbpp"):
            key = "pass@1" if bench in ("humaneval", "mbpp") else "accuracy"
            assert a[bench][key] == b[bench][key] and a[bench]["n"] == b[bench]["n"]
        assert (a["nll"]["n"], a["nll"]["tokens"]) == (b["nll"]["n"], b["nll"]["tokens"]) == (5, a["nll"]["tokens"])
        # NLL is a sum in a different order (response_nll accumulates float32 logits' cross-entropy)
        assert a["nll"]["nll"] == pytest.approx(b["nll"]["nll"], rel=1e-6)
