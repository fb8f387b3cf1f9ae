"""The comparison launcher: every variant at equal training compute over 2 seeds, mean and standard deviation, on
the validation split and both held-out evaluations; and all models evaluated in one table."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY_YAML


@pytest.mark.slow
def test_compare_variants_on_tiny_at_equal_compute(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, os.path.join(ROOT, "launchers", "compare.py"), "--config", TINY_YAML,
           "--output-dir", str(out), "--variants", "semalign,output-kd,finetune", "--benchmarks", "nll",
           "--limit", "4", "--seeds", "0", "1"]
    cmd += [f"--set={k}={v}" for k, v in {"max_examples": 16, "stage_steps": 4, "eval_max_examples": 4,
                                          "cache_shard_examples": 8, "batch_size": 4, "validation_fraction": 0.25,
                                          "report_to": "none"}.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["source", "target before", "semalign", "output-kd", "finetune"]
    assert "training budget" in proc.stdout and "Best by validation NLL" in (out / "compare.md").read_text()
    flops = {}
    for name in ("semalign", "output-kd", "finetune"):
        runs = [json.loads((out / name / f"seed{s}" / "budget.json").read_text())["training"]["flops"]
                for s in (0, 1)]
        flops[name] = sum(runs) / 2
        mean, sd = rows[name]["training_flops"]
        assert mean == pytest.approx(flops[name])
        for key in ("validation", "eval", "second"):
            m, sd = rows[name][key]
            assert m > 0 and sd > 0, (name, key)  # two seeds, two different models
        reports = [json.loads((out / name / f"seed{s}" / "report.json").read_text()) for s in (0, 1)]
        assert rows[name]["eval"][0] == pytest.approx(sum(r["target_after"]["nll"] for r in reports) / 2)
    # data_seed: both seeds drew the same examples and validation split (embedded:stdlib shuffles by the seed)
    assert "every seed trains on the same examples" in proc.stdout
    for part in ("transfer", "validation"):
        a, b = ((out / "semalign" / f"seed{s}" / "data" / f"{part}.safetensors").read_bytes() for s in (0, 1))
        assert a == b, part
    # equal compute: the baselines' steps were chosen to match the reference's FLOPs (one step's granularity)
    assert rows["output-kd"]["stage_steps"] != 4 or rows["finetune"]["stage_steps"] != 4
    for name in ("output-kd", "finetune"):
        assert abs(flops[name] / flops["semalign"] - 1) < 0.3, (name, flops)
    # the evaluation of every model on --benchmarks: a run's own NLL is the evaluation's on the same problems
    report = json.loads((out / "eval" / "report.json").read_text())
    assert list(report["models"])[:3] == ["source", "target before", "semalign-seed0"]
    nll = {name: m["results"]["nll"]["nll"] for name, m in report["models"].items()}
    run_report = json.loads((out / "semalign" / "seed0" / "report.json").read_text())
    assert abs(run_report["source"]["nll"] - nll["source"]) < 1e-5
    assert abs(run_report["target_after"]["nll"] - nll["semalign-seed0"]) < 1e-5
    second = json.loads((out / "eval-second" / "report.json").read_text())
    assert second["settings"]["data"]["nll"] == "embedded:idlelib"
    # the baselines reused the reference's source phases of the same seed: the same files, not copies
    for name in ("output-kd", "finetune"):
        for seed in (0, 1):
            assert f"{out / name / f'seed{seed}'} starts from the source phases" in proc.stdout
            for shard in (out / "semalign" / f"seed{seed}" / "cache").iterdir():
                twin = out / name / f"seed{seed}" / "cache" / shard.name
                assert twin.stat().st_ino == shard.stat().st_ino, twin
            ours = json.loads((out / name / f"seed{seed}" / "budget.json").read_text())["phases"]
            ref = json.loads((out / "semalign" / f"seed{seed}" / "budget.json").read_text())["phases"]
            assert ours["cache"] == ref["cache"] and ours["attribution"] == ref["attribution"]


def test_which_variants_share_the_source_phases():
    """Only a variant whose source side computes the same cache may reuse the reference's."""
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    import compare
    from semalign_ds import config as config_mod
    assert set(config_mod.Config.TRAINING_KEYS) <= set(config_mod.Config.model_fields)  # no misspelt key
    base = config_mod.load(TINY_YAML)
    ref = compare.variant_config(base, compare.REFERENCE, 0, "out")
    shared = {name: compare.shares_source_phases(ref, compare.variant_config(base, name, 0, "out"))
              for name in compare.VARIANTS if name != compare.REFERENCE}
    assert shared == {"semalign-uniform": False, "semalign-cosine": True, "semalign-geometry": False,
                      "semalign-lsq": False, "semalign-topk": False, "semalign-lora": True, "semalign-joint": True, "semalign-kd": True,
                      "semalign-aux": True, "layerwise": False,
                      "output-kd": True, "finetune": True}
    assert not compare.shares_source_phases(ref, compare.variant_config(base, "output-kd", 1, "out"))  # the seed
    topk = config_mod.from_dict({**ref.to_dict(), "fisher_topk": 8})
    assert not compare.shares_source_phases(topk, compare.variant_config(base, "output-kd", 0, "out"))


def reference_budget(compare, overrides):
    """(base config, lengths, transfer set, target shape, budget FLOPs) of the tiny config with `overrides` on a
    random transfer set of 23 sequences of odd lengths."""
    import torch
    from semalign_ds import budget, config as config_mod
    base = config_mod.load(TINY_YAML, overrides)
    lengths = torch.randint(40, 97, (23,))
    transfer = type("Set", (), {"lengths": lengths, "loss_counts": lengths // 3})
    shape = compare.target_shape(base, 211)
    ref = compare.variant_config(base, compare.REFERENCE, 0, "out")
    return base, lengths, transfer, shape, budget.predicted_training(ref, shape, lengths, transfer.loss_counts)


def test_a_variant_without_stages_gets_the_whole_budget_as_joint_steps():
    """semalign-aux: stage_steps 0, and the joint steps whose predicted FLOPs come closest to the budget."""
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    import compare
    from semalign_ds import budget
    base, lengths, transfer, shape, flops = reference_budget(compare, {"stage_steps": 7})
    aux = compare.variant_config(base, "semalign-aux", 0, "out")
    steps = compare.equal_compute_steps(aux, flops, shape, transfer)
    assert steps["stage_steps"] == 0
    per = [budget.predicted_training(aux.model_copy(update={"stage_steps": 0, "joint_steps": j}), shape, lengths,
                                     transfer.loss_counts) for j in (steps["joint_steps"] - 1, steps["joint_steps"],
                                                                     steps["joint_steps"] + 1)]
    assert abs(per[1] - flops) <= min(abs(per[0] - flops), abs(per[2] - flops))  # the closest number of steps
    assert abs(per[1] / flops - 1) < 0.2


def test_a_reference_that_is_not_semalign_is_refused_before_any_run(tmp_path, capsys):
    """The reference sets the budget and is SemAlign: a baseline config (the embedded default's output KD) is
    refused with the config to use instead, and nothing is written."""
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    import compare
    out = tmp_path / "cmp"
    for config, extra in (("depth-kd.yaml", []), ("tiny.yaml", ["--set", "method=output_kd"])):
        argv = ["--config", os.path.join(ROOT, "launchers", "configs", config), "--output-dir", str(out), *extra]
        assert compare.main(argv) == 2
        err = capsys.readouterr().err
        assert "must be a SemAlign recipe" in err and "launchers/configs/default.yaml or acl.yaml" in err, err
    assert not out.exists()


def test_a_reference_without_stages_takes_only_the_variants_that_do_not_need_them(tmp_path, capsys):
    """default.yaml (the cross-width pair) has no frontier stages (a joint phase only): variants that re-divide stages are refused by
    name before any run, with the ones that apply; output KD and fine-tuning get steps per layer at equal compute."""
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    import compare
    from semalign_ds import budget
    out = tmp_path / "cmp"
    config = os.path.join(ROOT, "launchers", "configs", "default.yaml")
    argv = ["--config", config, "--output-dir", str(out), "--variants", "output-kd,semalign-kd,semalign-cosine"]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert "semalign-kd, semalign-cosine re-divide" in err and "output-kd, finetune" in err, err
    assert not out.exists()
    # the budget on a joint-only reference, shared out to a baseline as steps per target layer
    base, lengths, transfer, shape, flops = reference_budget(
        compare, {"stage_steps": 0, "joint_steps": 9, "layer_objective": "cosine"})
    kd = compare.variant_config(base, "output-kd", 0, "out")
    assert (kd.method, kd.joint_steps) == ("output_kd", 0)
    steps = compare.equal_compute_steps(kd, flops, shape, transfer)
    assert set(steps) == {"stage_steps"} and steps["stage_steps"] >= 1
    got = budget.predicted_training(kd.model_copy(update=steps), shape, lengths, transfer.loss_counts)
    assert abs(got / flops - 1) < 0.5, (got, flops)


def test_data_seed_fixes_the_examples_and_is_compared_by_the_seed_it_stands_for():
    """data_seed null means seed: a run directory of seed 3 resumes under data_seed 3, and not under data_seed 4;
    the seed alone no longer changes the rows when data_seed is set."""
    from semalign_ds import config as config_mod
    a = config_mod.load(TINY_YAML, {"seed": 3})
    assert a.rows_seed == 3 and a.differs(config_mod.load(TINY_YAML, {"seed": 3, "data_seed": 3})) == []
    assert a.differs(config_mod.load(TINY_YAML, {"seed": 3, "data_seed": 4})) == ["data_seed"]
    b = config_mod.load(TINY_YAML, {"seed": 5, "data_seed": 3})
    assert b.rows_seed == 3 and a.differs(b) == ["seed"]


@pytest.mark.slow
def test_a_stop_request_ends_compare_with_exit_75_and_a_rerun_resumes(tmp_path):
    """SIGUSR1 in the middle of a variant's training: the run saves a checkpoint, compare exits 75 (try again)
    with the reason and no traceback, and the same command finishes from there."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, os.path.join(ROOT, "launchers", "compare.py"), "--config", TINY_YAML,
           "--output-dir", str(out), "--variants", "semalign,output-kd", "--limit", "2"]
    cmd += [f"--set={k}={v}" for k, v in {"max_examples": 12, "stage_steps": 3, "eval_max_examples": 2,
                                          "cache_shard_examples": 6, "batch_size": 4, "checkpoint_every": 1,
                                          "report_to": "none"}.items()]
    env = {**os.environ, "SEMALIGN_DS_FAULT": "stage_step:2:*:usr1"}
    stopped = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    stop = re.search(r"stage (\d+)/\d+: stopped on request after step (\d+) of 3", stopped.stderr)
    assert stop and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert not (out / "compare.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"stage {stop[1]}/" in done.stdout and f"resuming at step {stop[2]} of 3" in done.stdout
    assert list(json.loads((out / "compare.json").read_text())["rows"])[2:] == ["semalign", "output-kd"]
