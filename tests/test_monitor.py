import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from semalign_ds.config import ConfigError
from semalign_ds.monitor import Monitor

HPARAMS = {"lr": 3e-4, "stage_steps": 7, "deepspeed": {"stage": 3, "offload": False}, "pairs": [1, 3], "seed": None}
FLAT = {"lr": 3e-4, "stage_steps": 7, "deepspeed.stage": 3, "deepspeed.offload": False, "pairs": "[1, 3]",
        "seed": "null"}


def _losses(n, seed):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).add(0.1).tolist()


STAGE2 = _losses(6, 0)


def _attempts(folder, monitor_kwargs, first, second, resume_at):
    """A run logs stage1 steps 0..len(first)-1 and stage2, is killed, then resumes stage1 at resume_at."""
    m = Monitor(folder, **monitor_kwargs)
    for step, loss in enumerate(first):
        m.log("stage1", {"loss": loss, "lr": 1e-3}, step)
    for step, loss in enumerate(STAGE2):  # a tag that is not resumed, with steps beyond the resumed one
        m.log("stage2", {"loss": loss}, step)
    m.close()
    m = Monitor(folder, **monitor_kwargs)
    m.resume("stage1", resume_at)
    for step, loss in enumerate(second, resume_at):
        m.log("stage1", {"loss": loss, "lr": 1e-3}, step)
    m.close()


def test_tensorboard_and_metrics_file_show_each_step_once_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    first, second = _losses(7, 1), _losses(5, 2)  # killed after step 6; resumed from step 4's checkpoint
    _attempts(str(tmp_path), dict(hparams=HPARAMS), first, second, resume_at=4)
    expected = first[:4] + second
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    stage1 = [(r["step"], r["loss"]) for r in lines if r["tag"] == "stage1"]
    assert stage1 == list(enumerate(expected))
    assert [(r["step"], r["loss"]) for r in lines if r["tag"] == "stage2"] == list(enumerate(STAGE2))
    events = EventAccumulator(str(tmp_path / "tb"))  # one TensorBoard run, as `tensorboard --logdir RUN/tb`
    events.Reload()
    scalars = events.Scalars("stage1/loss")
    assert [s.step for s in scalars] == list(range(9))
    assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6)  # stored as float32
    # the purge from step 4 hid every tag's events there: stage2's were written again
    stage2 = events.Scalars("stage2/loss")
    assert [s.step for s in stage2] == list(range(6)) and [s.value for s in stage2] == pytest.approx(STAGE2)
    assert [s.step for s in events.Scalars("stage1/lr")] == list(range(9))
    config = events
    start = plugin_data_pb2.HParamsPluginData.FromString(
        config.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    logged = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    # torch's hparams stores bools as numbers
    assert logged == pytest.approx({k: float(v) if isinstance(v, (int, float)) else v for k, v in FLAT.items()})
    text = config.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == FLAT


def test_trackers_are_checked_before_any_work(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to: wandb needs the wandb package.*pip install wandb"):
        Monitor(str(tmp_path / "run"), report_to=["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match=r"report_to: unknown tracker 'comet'; use any of tensorboard, wandb"):
        Monitor(str(tmp_path / "run"), report_to="comet", enabled=False)
    assert not (tmp_path / "run").exists()
    m = Monitor(str(tmp_path / "run"), report_to="none")
    m.log("stage1", {"loss": 1.25}, 3)
    m.close()
    assert not (tmp_path / "run" / "tb").exists()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"] == 1.25


def test_mlflow_gets_the_config_and_each_step_once(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="optional tracker: pip install mlflow-skinny")
    from mlflow import MlflowClient
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:" + str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    first, second = _losses(6, 3), _losses(5, 4)
    second[:3] = first[3:]  # a resume replays bitwise identical steps: the trackers already hold them
    _attempts(str(tmp_path / "run"), dict(report_to=["mlflow"], hparams=HPARAMS, run_name="tiny"),
              first, second, resume_at=3)
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in FLAT.items()}
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "stage1/loss"))
    assert history == list(enumerate(first[:3] + second))
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume continued the same run


@pytest.mark.slow  # W&B starts its service process
def test_wandb_offline_gets_the_config_and_each_step_once(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="optional tracker: pip install wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent, configs, real_log = [], [], wandb.sdk.wandb_run.Run.log

    def spy(run, data, *args, **kwargs):  # what W&B was given, as it keeps it in a binary log
        sent.append(dict(data))
        configs.append((run.id, dict(run.config)))
        return real_log(run, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    first, second = _losses(6, 5), _losses(4, 6)
    _attempts(str(tmp_path), dict(report_to=["wandb"], hparams=HPARAMS), first, second, resume_at=4)
    stage1 = [(d["stage1/step"], d["stage1/loss"]) for d in sent if "stage1/step" in d]
    assert stage1 == list(enumerate(first)) + [(6, second[2]), (7, second[3])]
    assert {run_id for run_id, _ in configs} == {json.loads((tmp_path / "trackers.json").read_text())["wandb"]}
    assert all(config == FLAT for _, config in configs)
    assert os.listdir(tmp_path / "wandb")


_HOLES = """
import ctypes, sys
from semalign_ds import summary
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
summary.map_large_allocations(sys.argv[1] == "on")
libc.free(libc.malloc(16 << 20))  # glibc's adaptive threshold: 4 MiB blocks now come from the heap
big, small = [], []
for _ in range(50):  # 4 MiB blocks between small ones, as gathered parameters between activations
    big.append(libc.malloc(4 << 20)); ctypes.memset(big[-1], 1, 4 << 20)
    small.append(libc.malloc(4096)); ctypes.memset(small[-1], 1, 4096)
before = rss()
for b in big:
    libc.free(b)
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_mapped_large_allocations_go_back_to_the_system_when_freed():
    """With map_large_allocations on, 200 MiB of 4 MiB blocks freed between small live ones leave the process;
    off (glibc's heap), they stay resident as holes."""
    returned = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", _HOLES, mode], capture_output=True, text=True, check=True)
        returned[mode] = int(out.stdout.split()[-1])
    assert returned["on"] >= 190 and returned["off"] <= 10, returned
