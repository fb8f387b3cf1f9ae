"""The typed config: values coerced and checked at load (YAML, JSON, --set), with messages naming key, value and
what is allowed; the interface the rest of the code uses."""
import argparse
import json
import os

import pytest

from semalign_ds import config as config_mod, rundir
from semalign_ds.config import Config, ConfigError
from semalign_ds.embedded import DEFAULT_RUN
from tests.helpers import ROOT

TINY_YAML = os.path.join(ROOT, "launchers", "configs", "tiny.yaml")


def args(*sets, config=None, output_dir=None):
    return argparse.Namespace(config=config, set=list(sets), output_dir=output_dir)


def test_defaults_and_interface(tmp_path):
    cfg = Config()
    assert (cfg.lr, cfg.stage_steps, cfg.dtype, cfg.target) == (1e-4, 100, "float32", None)
    assert (cfg.lr_schedule, cfg.warmup_steps, cfg.min_lr_ratio, cfg.grad_accum_steps) == ("constant", 0, 0.0, 1)
    assert cfg.report_to == ["tensorboard"] and cfg.lora_targets == ["up_proj", "down_proj", "v_proj", "o_proj"]
    assert (cfg.fisher_topk, cfg.lora_rank, cfg.joint_steps, cfg.joint_lr, cfg.validation_fraction) == (0, 0, 0,
                                                                                                           None, 0.0)
    assert (cfg.max_row_chars, cfg.data_format, cfg.layer_objective, cfg.alignment_map) == (200000, "auto",
                                                                                             "fisher", "semantic")
    # every key has a description, and the defaults round-trip through save/from_dict
    assert all(f.description for f in Config.model_fields.values())
    cfg = config_mod.load(TINY_YAML)
    rundir.write_json(tmp_path / "c.json", cfg.to_dict())
    again = config_mod.from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert again == cfg and again.differs(cfg) == [] and again.to_dict() == cfg.to_dict()
    assert "  lr" in str(cfg) and "= 0.003" in str(cfg)
    # the tiny yaml's paths are relative to the file
    assert cfg.source == os.path.join(ROOT, "launchers", "configs", "tiny", "source.json")
    changed = config_mod.from_dict({**cfg.to_dict(), "lr": 0.5, "report_to": ["none"], "log_every": 3})
    assert cfg.differs(changed) == ["lr"]  # report_to and log_every are run-only
    assert "report_to" in Config.RUN_ONLY_KEYS


@pytest.mark.parametrize("text, value", [("2e-4", 2e-4), ("3e-3", 3e-3), ("1.5E-5", 1.5e-5), ("7", 7.0)])
def test_yaml_1_1_floats_are_coerced(tmp_path, text, value):
    """YAML 1.1 reads 2e-4 (no dot) as a string: in a file and in --set it must still be a float."""
    path = tmp_path / "c.yaml"
    path.write_text(f"target_keep_layers: [0, 1]\nlr: {text}\n")
    cfg = config_mod.load(str(path))
    assert isinstance(cfg.lr, float) and cfg.lr == value
    cfg = config_mod.from_args(args(f"lr={text}"), base=DEFAULT_RUN)
    assert isinstance(cfg.lr, float) and cfg.lr == value


@pytest.mark.parametrize("key, value, match", [
    ("stage_steps", 2.5, r"stage_steps=2\.5 is not valid \(.*fractional part\); stage_steps must be an integer >= 0"),
    ("batch_size", 4.5, r"batch_size=4\.5 is not valid .* must be an integer >= 1$"),
    ("batch_size", 0, r"batch_size=0 is not valid \(Input should be greater than or equal to 1\)"),
    ("lr", -1e-3, r"lr=-0\.001 is not valid .* lr must be a number > 0"),
    ("lr", "fast", r"lr='fast' is not valid .*unable to parse"),
    ("lr", True, r"lr=True is not valid \(a boolean is not a number\)"),
    ("lr", float("inf"), r"lr=inf is not valid \(Input should be a finite number\)"),
    ("dtype", "float64", r"dtype='float64' is not valid .* dtype must be one of float32, bfloat16, float16"),
    ("lr_schedule", "step", r"lr_schedule='step' .* one of constant, linear, cosine"),
    ("min_lr_ratio", 1.5, r"min_lr_ratio=1\.5 .* a number >= 0 and <= 1"),
    ("validation_fraction", 0.5, r"validation_fraction=0\.5 .* a number >= 0 and < 0\.5"),
    ("report_to", ["wandb", "comet"], r"report_to=\['wandb', 'comet'\] .* each one of tensorboard, wandb, mlflow"),
    ("report_to", ["none", "wandb"], r"`none` cannot be combined"),
    ("max_examples", 0, r"max_examples=0 .* an integer >= 1, or null"),
    ("joint_lr", 0, r"joint_lr=0 .* a number > 0, or null"),
    ("lora_alpha", 0.0, r"lora_alpha=0\.0 .* a number > 0"),
    ("grad_accum_steps", 3, r"batch_size 8 is not divisible by grad_accum_steps 3"),
    ("target_keep_layers", [0, 2.5], r"target_keep_layers=\[0, 2\.5\] .* a list, each an integer, or null"),
    ("target_keep_layers", [3, 1], r"strictly increasing"),
    ("prompt_field", 7, r"prompt_field=7 .* a string"),
    ("ds_source_config", "/nowhere.json", r"ds_source_config: no such file"),
    ("source_sharding", "fsdp", r"source_sharding='fsdp' .* one of zero3, replicated, auto"),
    ("layer_objective", "fishr", r"no layer objective 'fishr': one of fisher, cosine, geometry"),
])
def test_bad_values_are_refused_with_key_value_and_what_is_allowed(key, value, match):
    with pytest.raises(ConfigError, match=match) as err:
        config_mod.load(None, {key: value}, DEFAULT_RUN)
    if key == "batch_size" and value == 4.5:
        assert "4.0" not in str(err.value) and str(err.value).startswith("overrides: ")


def test_a_replicated_source_with_a_zero3_config_is_refused():
    from semalign_ds import engines
    with pytest.raises(ConfigError, match=r"ds_source_config .* source_sharding is replicated .* drop one of them"):
        config_mod.load(None, {"source_sharding": "replicated",
                               "ds_source_config": engines.default_config_path("source_zero3")}, DEFAULT_RUN)


def test_a_key_that_the_method_ignores_is_refused():
    with pytest.raises(ConfigError, match=r"fisher_weight 0\.5 adds the layer objective .* method output_kd .* set "
                                          r"fisher_weight=0"):
        config_mod.load(None, {"method": "output_kd", "stage_steps": 12, "joint_steps": 0, "fisher_weight": 0.5},
                        DEFAULT_RUN)


def test_errors_name_the_file_or_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("target_keep_layers: [0, 1]\nstage_steps: 2.5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: stage_steps=2\.5"):
        config_mod.load(str(path))
    with pytest.raises(ConfigError, match=r"(?m)^overrides: batch_size='x'"):
        config_mod.from_args(args("batch_size=x", config=str(path)))
    path.write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path} is not valid YAML"):
        config_mod.load(str(path))
    with pytest.raises(ConfigError, match=r"unknown key 'lrr'\. Valid keys: source, "):
        config_mod.from_args(args("lrr=1"))


def test_coercions_that_are_meant():
    cfg = config_mod.load(None, {"batch_size": "16", "stage_steps": 4.0, "report_to": "wandb",
                                 "chat_template": False, "normalize_source": "no"}, DEFAULT_RUN)
    assert (cfg.batch_size, cfg.stage_steps, cfg.report_to, cfg.chat_template, cfg.normalize_source) == \
        (16, 4, ["wandb"], "off", False)
    assert type(cfg.stage_steps) is int
    with pytest.raises(ConfigError, match="float16 needs a GPU, but device is cpu"):
        config_mod.load(None, {"dtype": "float16", "device": "cpu"}, DEFAULT_RUN)
    assert config_mod.load(None, {"dtype": "float16"}, DEFAULT_RUN).dtype == "float16"  # checked at run start


def test_assignment_is_checked_too():
    cfg = config_mod.load(TINY_YAML)
    with pytest.raises(Exception, match="fractional part"):
        cfg.stage_steps = 2.5


def test_float16_and_cuda_are_checked_at_run_start(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="float16 needs a GPU and none is visible"):
        config_mod.check_device(config_mod.load(None, {"dtype": "float16"}, DEFAULT_RUN))
    with pytest.raises(ConfigError, match="device cuda, but no GPU is visible"):
        config_mod.check_device(config_mod.load(None, {"device": "cuda"}, DEFAULT_RUN))
    config_mod.check_device(config_mod.load(None, {"dtype": "bfloat16"}, DEFAULT_RUN))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config_mod.check_device(config_mod.load(None, {"dtype": "float16"}, DEFAULT_RUN))
