"""The comparison launcher trains each variant and evaluates all models in one table."""
import json
import os
import subprocess
import sys

from tests.helpers import ROOT, TINY_YAML


def test_compare_variants_on_tiny(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, os.path.join(ROOT, "launchers", "compare.py"), "--config", TINY_YAML,
           "--output-dir", str(out), "--variants", "semalign,output-kd,layerwise", "--benchmarks", "nll",
           "--limit", "4"]
    cmd += [f"--set={k}={v}" for k, v in {"max_examples": 16, "stage_steps": 3, "eval_max_examples": 4,
                                          "cache_shard_examples": 8, "batch_size": 4}.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert list(report["models"]) == ["source", "target before", "semalign", "output-kd", "layerwise"]
    nll = {name: m["results"]["nll"]["nll"] for name, m in report["models"].items()}
    assert len(set(nll.values())) == 5  # five different models
    # the same 4 problems: the evaluation's NLL of each model is the one the runs themselves reported
    run_report = json.loads((out / "semalign" / "report.json").read_text())
    assert abs(run_report["source"]["nll"] - nll["source"]) < 1e-5
    assert abs(run_report["target_before"]["nll"] - nll["target before"]) < 1e-5
    assert abs(run_report["target_after"]["nll"] - nll["semalign"]) < 1e-5
    assert (out / "eval" / "report.png").is_file()
