"""Files of the run directory are written whole or not at all (rundir's writers), and a resumed run accepts them."""
import json
import os

import pytest

from semalign_ds import config as config_mod, pipeline, report as report_mod, rundir
from tests.helpers import TINY_YAML


def leftovers(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if ".tmp" in f]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "report.md")
    rundir.write_text(path, "old\n")

    def dies_half_way(tmp):
        with open(tmp, "w") as f:
            f.write("new, cut sh")
        raise OSError("killed")
    with pytest.raises(OSError, match="killed"):
        rundir.write_file(path, dies_half_way)
    assert open(path).read() == "old\n" and leftovers(tmp_path) == []
    rundir.write_json(path, {"folder": tmp_path}, default=str)
    assert json.load(open(path)) == {"folder": str(tmp_path)}


def test_the_report_files_are_complete(tmp_path):
    report = {"settings": {"benchmarks": ["mbpp", "nll"], "world_size": 1, "dtype": "float32"},
              "metrics": {"mbpp": ["pass@1", "MBPP pass@1", True], "nll": ["nll", "NLL nats/token", False]},
              "models": {"tiny/target": {"results": {"mbpp": {"pass@1": 0.5, "n": 2}, "nll": {"nll": 3.25, "n": 2}}}}}
    samples = {("tiny/target", "mbpp"): [{"task_id": 1, "passed": True}, {"task_id": 2, "passed": False}],
               ("tiny/target", "nll"): None}
    report_mod.write_report(report, samples, str(tmp_path))
    assert json.loads((tmp_path / "report.json").read_text()) == report
    table = (tmp_path / "report.md").read_text()
    assert table.startswith("# Evaluation\n\n| model |") and "| tiny/target | 50.00 | 3.250 |" in table
    assert table.endswith("![scores](report.png)\n")
    lines = (tmp_path / "samples" / "tiny_target" / "mbpp.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == samples[("tiny/target", "mbpp")]
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    assert leftovers(tmp_path) == []


def test_a_resumed_run_accepts_the_saved_config(tmp_path, monkeypatch):
    cfg = config_mod.load(TINY_YAML, {"output_dir": str(tmp_path / "run")})
    rd = rundir.RunDir(cfg.output_dir)
    rd.make("data")
    rundir.write_json(rd.path("config.json"), cfg.to_dict())  # as the pipeline saves it
    rd.write_state({"done": {"attribution": {}}})
    assert pipeline.resume_state(cfg, rd) == {"done": {"attribution": {}}}
    # a save cut short (a kill before the rename) leaves the earlier config, which a resume still accepts
    monkeypatch.setattr(rundir, "commit", lambda tmp, path: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        rundir.write_json(rd.path("config.json"), {**cfg.to_dict(), "lr": 0.5})
    monkeypatch.undo()
    assert pipeline.resume_state(cfg, rd) == {"done": {"attribution": {}}} and leftovers(rd.root) == []
    with pytest.raises(config_mod.ConfigError, match="different config \\(lr differ"):
        pipeline.resume_state(config_mod.load(TINY_YAML, {"output_dir": cfg.output_dir, "lr": 0.5}), rd)
