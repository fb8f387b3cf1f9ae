"""The pipeline end to end on tiny random-init models: outputs, resume, and bad input refused early."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from semalign_ds import config as config_mod, models, pipeline
from semalign_ds.cli import main
from semalign_ds.config import ConfigError
from tests.helpers import TINY, TINY_YAML, tiny_model_dir

FAST = {"max_examples": 20, "stage_steps": 4, "eval_max_examples": 6, "cache_shard_examples": 8,
        "batch_size": 4}


def tiny_config(out, **overrides):
    return config_mod.load(TINY_YAML, {**FAST, "output_dir": str(out), **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["--config", TINY_YAML, "--output-dir", str(out)] +
                [f"--set={k}={v}" for k, v in FAST.items()]) == 0
    return out


@pytest.mark.slow
def test_outputs(tiny_run):
    from transformers import AutoModelForCausalLM
    target = AutoModelForCausalLM.from_pretrained(tiny_run / "target")
    assert target.config.num_hidden_layers == 3
    plan = json.loads((tiny_run / "plan.json").read_text())
    assert plan["pairs"][-1] == 6 and len(plan["scores"]) == 6 and plan["strategy"] == "attribution"
    metrics = json.loads((tiny_run / "metrics.json").read_text())["stages"]
    assert sorted(metrics) == ["1", "2", "3"]
    assert all(m["steps"] == 4 and m["last_loss"] > 0 for m in metrics.values())
    report = json.loads((tiny_run / "report.json").read_text())
    assert {"source", "target_before", "target_after", "gap_closed"} <= set(report)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tiny_run / "tb"))
    tags = {json.loads(line)["tag"] for line in open(tiny_run / "metrics.jsonl")}
    assert {"stage_1", "stage_2", "stage_3", "cache", "attribution"} <= tags
    for name in ("semalign_plan.json", "semalign_config.json", "semalign_metrics.json"):
        assert (tiny_run / "target" / name).is_file()


@pytest.mark.slow
def test_only_layers_change_and_the_frontier_is_the_trained_prefix(tiny_run):
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(tiny_run)
    before = pipeline.initial_target(cfg).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tiny_run / "target")
    for name, p in after.state_dict().items():
        if ".layers." not in name:
            assert torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), name  # every layer was trained
    # the last frontier is the exported target's residual stream after its last layer
    from semalign_ds.data import TokenizedSet
    data = TokenizedSet.load(tiny_run / "data" / "transfer.safetensors")
    frontier = load_file(tiny_run / "frontier" / "frontier-3.rank0of1.safetensors")["states"]
    ad = models.Adapter(after.eval())
    for i in (0, 7):
        a, b = int(data.offsets[i]), int(data.offsets[i + 1])
        ids = data.ids[a:b].unsqueeze(0)
        with torch.no_grad():
            h = ad.hidden_states(ids, torch.ones_like(ids))[-1][0]
        torch.testing.assert_close(frontier[a:b], h, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the pipeline through its cache phase
def test_a_stage_changes_only_its_own_layer(tmp_path):
    from semalign_ds import alignment, cache, pairing, rundir, training
    cfg = tiny_config(tmp_path / "r", stage_steps=3)
    rd = rundir.RunDir(cfg.output_dir)
    s = pipeline.prepare(cfg, rd)
    pipeline.open_run_dir(s, pipeline.resume_state(cfg, rd))
    target = pipeline.initial_target(cfg)
    tgt = models.Adapter(target)
    head_t = tgt.head.weight[:s.vocab]
    _, src, runner, head_s = pipeline.load_source(s)
    plan = pairing.make_plan("uniform", None, s.n_source, s.n_target, 0.0)
    cache.phase(s, src, runner, plan, alignment.phase(s, head_t, head_s))
    cache.write_source_head(s, head_s)
    mine = list(range(len(s.data)))
    frontier = training.frontier_after(s, tgt, 0, mine)
    # stage 2 on the embeddings frontier is enough to see what a stage touches
    before = {n: p.clone() for n, p in target.state_dict().items()}
    store = cache.ActivationCache(rd.path("cache"), len(s.data), cfg.cache_shard_examples)
    from semalign_ds import objectives
    training.train_stage(s, tgt, objectives.recipe(cfg), head_t, None, 2, frontier,
                         {"aligned.2": store.rows("aligned.2", mine, s.data.loss_counts)})
    changed = [n for n, p in target.state_dict().items() if not torch.equal(p, before[n])]
    assert changed and all(n.startswith("model.layers.1.") for n in changed), changed
    s.monitor.close()
    rd.unlock()


@pytest.mark.slow
def test_resume_after_a_crash_gives_the_same_target(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    pipeline.run(tiny_config(straight, stage_steps=6, checkpoint_every=2))
    crashed = tmp_path / "crashed"
    from semalign_ds import training
    real = training.stage_step
    calls = {"n": 0}

    def dies_in_stage_2(tgt, recipe, head, source_head, k, *args, **kw):
        if k == 2:
            calls["n"] += 1
            if calls["n"] == 4:  # step 3 of stage 2, after the checkpoint at step 2
                raise KeyboardInterrupt("killed")
        return real(tgt, recipe, head, source_head, k, *args, **kw)

    monkeypatch.setattr(training, "stage_step", dies_in_stage_2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(tiny_config(crashed, stage_steps=6, checkpoint_every=2))
    state = json.loads((crashed / "state.json").read_text())
    assert "stage_1" in state["done"] and "stage_2" not in state["done"]
    pointer = json.loads((crashed / "stages" / "checkpoint-stage_2" / "latest.json").read_text())
    assert pointer["current"]["meta"]["step"] == 2
    assert (crashed / "stages" / "checkpoint-stage_2" / pointer["current"]["tag"] / "stage.pt").is_file()
    monkeypatch.setattr(training, "stage_step", real)
    calls_before_resume = dict(state["done"])
    pipeline.run(tiny_config(crashed, stage_steps=6, checkpoint_every=2))
    assert "cache" in calls_before_resume
    a = load_file(straight / "target" / "model.safetensors")
    b = load_file(crashed / "target" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # a finished run reruns as a no-op
    mtime = os.path.getmtime(crashed / "target" / "model.safetensors")
    pipeline.run(tiny_config(crashed, stage_steps=6, checkpoint_every=2))
    assert os.path.getmtime(crashed / "target" / "model.safetensors") == mtime


# ---------------------------------------------------------------------------------------------------------------
# bad input: refused before any model runs and before anything is written

def refused(out, match, **overrides):
    with pytest.raises(ConfigError, match=match):
        pipeline.run(tiny_config(out, **overrides))
    assert not os.path.exists(out)


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in overrides: stage_stepz\. Valid keys: source, "):
        config_mod.load(None, {"stage_stepz": 3})
    assert main(["--config", TINY_YAML, "--set", "nope=1"]) == 2


def test_target_with_more_layers(tmp_path):
    big = tiny_model_dir(tmp_path, "big", layers=8)
    refused(tmp_path / "out", r"target has more layers \(8\) than the source \(6\)", target=big)


def test_different_tokenizers(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    tok = json.loads(open(os.path.join(TINY, "tokenizer.json")).read())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    shutil.copy(os.path.join(TINY, "tokenizer_config.json"), other)
    shutil.copy(os.path.join(TINY, "target.json"), other / "target.json")
    refused(tmp_path / "out", r"must share one tokenizer: 2 tokens have different ids.*target tokenizer: .*other",
            target=str(other / "target.json"))


def test_missing_paths_and_empty_data(tmp_path):
    refused(tmp_path / "o1", "source model not found", source=str(tmp_path / "nowhere"))
    refused(tmp_path / "o2", "data not found", data=str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "p", "response": " "}\n')
    refused(tmp_path / "o3", r"no usable rows \(1 dropped: 1 empty", data=str(empty))


@pytest.mark.slow
def test_changed_config_is_not_silently_resumed(tiny_run):
    with pytest.raises(ConfigError, match="different config \\(lr differ"):
        pipeline.run(tiny_config(tiny_run, lr=1.0))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["layerwise", "output_kd", "finetune"])
def test_baselines_train_what_they_should(tmp_path, method):
    """The baselines of the comparison: the layer-wise one trains every layer stage by stage on cached source
    states; output KD trains all layers at once for as many steps as the stages together."""
    out = tmp_path / method
    pipeline.run(tiny_config(out, method=method, eval_data=None))
    metrics = json.loads((out / "metrics.json").read_text())["stages"]
    if method in ("output_kd", "finetune"):
        assert list(metrics) == [method] and metrics[method]["steps"] == 3 * FAST["stage_steps"]
        assert metrics[method]["last_loss"] < metrics[method]["first_loss"]
    else:
        assert sorted(metrics) == ["1", "2", "3"]
        shard = load_file(out / "cache" / "shard-00000.safetensors")
        assert {"source.1", "source.2", "source.3"} <= set(shard)
        torch.testing.assert_close(shard["source.2"].norm(dim=-1), torch.ones(len(shard["source.2"])))
    cfg = tiny_config(out, method=method, eval_data=None)
    before = pipeline.initial_target(cfg).state_dict()
    from transformers import AutoModelForCausalLM
    after = AutoModelForCausalLM.from_pretrained(out / "target").state_dict()
    changed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    assert changed == {n for n in after if ".layers." in n}


def test_the_default_run_is_the_committed_default_config():
    """`semalign-ds` without --config and launchers/configs/default.yaml describe the same run."""
    import yaml

    from semalign_ds.embedded import DEFAULT_RUN
    from tests.helpers import ROOT
    with open(os.path.join(ROOT, "launchers", "configs", "default.yaml")) as f:
        assert yaml.safe_load(f) == DEFAULT_RUN
    import argparse
    args = argparse.Namespace(config=None, set=["joint_steps=3"], output_dir=None)
    cfg = config_mod.from_args(args, base=DEFAULT_RUN)
    assert cfg.joint_steps == 3 and cfg.target_hidden_size == DEFAULT_RUN["target_hidden_size"] == 384


def test_every_shipped_config_loads_and_output_kd_yaml_is_the_default_pair():
    """The configs the README names load and validate; output-kd.yaml trains the embedded default's pair (the same
    cut, data, batch and lr) by output KD, so that the two are one flag apart."""
    import glob

    from tests.helpers import ROOT
    folder = os.path.join(ROOT, "launchers", "configs")
    loaded = {os.path.basename(p): config_mod.load(p) for p in sorted(glob.glob(os.path.join(folder, "*.yaml")))}
    assert {"default.yaml", "output-kd.yaml", "depth-kd.yaml", "acl.yaml", "tiny.yaml"} <= set(loaded)
    default, kd = loaded["default.yaml"], loaded["output-kd.yaml"]
    assert (default.method, kd.method) == ("semalign", "output_kd")
    same = ("source", "target_hidden_size", "target_num_heads", "target_num_kv_heads", "target_intermediate_size",
            "target_depth", "target_num_layers", "prune_calibration_examples", "data", "max_examples", "max_seq_len",
            "chat_template", "validation_fraction", "eval_data", "batch_size", "lr", "seed")
    assert {k: getattr(kd, k) for k in same} == {k: getattr(default, k) for k in same}


def test_a_finished_run_without_eval_data_resumes_without_loading_the_source(tmp_path, monkeypatch):
    """With eval_data null the evaluation before training is still marked done, so a rerun of a run whose source
    phases are finished (here: the whole run) never loads the source again."""
    out = tmp_path / "run"
    pipeline.run(tiny_config(out, eval_data=None, stage_steps=2))
    assert json.loads((out / "state.json").read_text())["done"]["eval_before"] == {}

    def refuse(s):
        raise AssertionError("the source was loaded again")
    monkeypatch.setattr(pipeline, "load_source", refuse)
    pipeline.run(tiny_config(out, eval_data=None, stage_steps=2))
