"""The command line: --version, --print-config, --help with every key described, refusals before any work."""
import os
import re
import subprocess
import sys

import pytest
import yaml

from semalign_ds import cli, config as config_mod, distributed
from semalign_ds.config import Config
from semalign_ds.embedded import DEFAULT_RUN
from tests.helpers import ROOT

TINY_YAML = os.path.join(ROOT, "launchers", "configs", "tiny.yaml")


def test_version(capsys):
    with open(os.path.join(ROOT, "setup.py")) as f:
        expected = re.search(r'version="([^"]+)"', f.read()).group(1)
    assert cli.version() == expected
    try:
        cli.main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0
    assert capsys.readouterr().out.strip() == f"semalign-ds {expected}"


def test_print_config_is_the_resolved_config(capsys, tmp_path):
    assert cli.main(["--print-config", "--set", "lr=2e-4", "--output-dir", str(tmp_path / "o")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert list(printed) == list(Config.model_fields)  # defaults included, in order
    assert printed == config_mod.from_dict({**DEFAULT_RUN, "lr": 2e-4, "output_dir": str(tmp_path / "o")}).to_dict()
    assert config_mod.from_dict(printed).lr == 2e-4  # it loads back as the same config
    assert not os.path.exists(tmp_path / "o")
    assert cli.main(["--print-config", "--config", TINY_YAML]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == config_mod.load(TINY_YAML).to_dict()


def test_help_describes_every_key_with_the_default_runs_values():
    text = cli.parser().format_help()
    for name, info in Config.model_fields.items():
        line = re.search(rf"^  {name}\*? = (.*)  \((.*)\)$", text, re.M)
        assert line, name
        shown = DEFAULT_RUN.get(name, info.default)
        assert line.group(1) == repr(shown) and line.group(2) == config_mod.allowed(name)
        assert " ".join(info.description.split()[:4]) in " ".join(text.split())
    assert "  stage_steps* = 0  (an integer >= 0)" in text  # the embedded default, not the model default 100
    for flag in ("--version", "--print-config", "--dry-run", "--world", "--accelerator-tflops"):
        assert flag in text


def test_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--config", TINY_YAML, "--output-dir", str(out), "--set", "stage_steps=2.5"]) == 2
    err = capsys.readouterr().err
    assert "stage_steps=2.5 is not valid" in err and "must be an integer >= 0" in err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_distributed_show_takes_the_launchers_local_rank():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    done = subprocess.run([sys.executable, "-m", "semalign_ds.distributed", "--local_rank=1", "show"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(distributed.detect(env, 1))
    assert "rank=1, world=2, local_rank=1" in done.stdout
