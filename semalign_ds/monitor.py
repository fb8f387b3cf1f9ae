"""What a run reports as it goes: console lines, a JSON-lines metrics file, and the trackers named in `report_to`:
TensorBoard (the default), Weights & Biases and MLflow (optional installs: `pip install semalign-ds[trackers]`).

The config goes to every tracker as hyper-parameters. A resumed run replays steps after its last checkpoint; it says
so with `resume(tag, step)`, and no step is then shown twice: metrics.jsonl drops the tag's lines at or after the
step; TensorBoard (one run folder, tb/) is reopened with purge_step, which hides every tag's events at or after it, so
the other tags' events there are written again from metrics.jsonl; the append-only trackers (W&B, MLflow) are not
sent again the steps they already hold. W&B and MLflow continue the same run: their run ids are kept in trackers.json.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time

from semalign_ds import rundir
from semalign_ds.config import ConfigError

# tracker -> (module to import, what to pip install)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}
PROJECT = "semalign-ds"  # W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say


def check_report_to(report_to):
    """The trackers as a tuple; a ConfigError for an unknown or uninstalled one, before any work is done."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n.strip() for name in names for n in name.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker {name!r}; use any of {', '.join(TRACKERS)}, or none")
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"report_to: {name} needs the {package} package, which is not installed: "
                              f"pip install {package} (or pip install semalign-ds[trackers]), or drop {name} "
                              f"from report_to")
    return tuple(dict.fromkeys(names))


def flat_hparams(hparams, prefix=""):
    """A nested config as one flat {key: int | float | str | bool} dict, as trackers take hyper-parameters."""
    flat = {}
    for key, value in (hparams or {}).items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


class Monitor:
    def __init__(self, folder, enabled=True, report_to=("tensorboard",), hparams=None, run_name=None):
        self.report_to = check_report_to(report_to)  # on every rank, so all refuse together
        self.enabled, self.folder = enabled, folder
        self.hparams = flat_hparams(hparams)
        self.run_name = run_name or os.path.basename(os.path.abspath(folder))
        self.writer = None  # TensorBoard's, opened at the first scalar, after any resume() call
        self.purge = {}  # tag -> the step it resumes from
        self.sent = {}  # tag -> the last step W&B and MLflow already hold
        self.axes = set()  # tags whose W&B step axis is defined
        self.lines = self.wandb = self.mlflow = self.mlflow_run = None
        if not enabled:
            return
        os.makedirs(folder, exist_ok=True)
        self.lines = open(self.path("metrics.jsonl"), "a")
        ids = self._read_ids()
        if "wandb" in self.report_to:
            import wandb
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=self.run_name,
                                    id=ids.get("wandb"), resume="allow", dir=folder, config=self.hparams)
            ids["wandb"] = self.wandb.id
        if "mlflow" in self.report_to:
            ids["mlflow"] = self.mlflow_run = self._start_mlflow(ids.get("mlflow"))
        rundir.write_json(self.path("trackers.json"), ids)

    def path(self, name):
        return os.path.join(self.folder, name)

    def _read_ids(self):
        try:
            with open(self.path("trackers.json")) as f:
                ids = json.load(f)
            return ids if isinstance(ids, dict) else {}
        except (OSError, ValueError):
            return {}  # a new run, or a damaged file: trackers start a new run rather than fail the training

    def _tensorboard(self):
        """The writer; after a resume, one that purges from the earliest resumed step and writes again the other
        tags' scalars from there (metrics.jsonl holds them; the resumed tags' replayed lines are gone from it)."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        purge = min(self.purge.values()) if self.purge else None
        self.writer = SummaryWriter(os.path.join(self.folder, "tb"), purge_step=purge)
        self.writer.add_text("config", "```\n" + json.dumps(self.hparams, indent=1) + "\n```", 0)
        for summary in hparams(self.hparams, {}):
            self.writer.file_writer.add_summary(summary)
        if purge is not None:
            self.lines.flush()
            for record in _records(self.path("metrics.jsonl")):
                if record.get("step", -1) >= purge:
                    for name, value in record.items():
                        if name not in ("tag", "step", "time") and isinstance(value, (int, float)):
                            self.writer.add_scalar(f"{record['tag']}/{name}", value, record["step"],
                                                   walltime=record.get("time"))
        return self.writer

    def _start_mlflow(self, run_id):
        import mlflow
        from mlflow.entities import Param
        if "MLFLOW_TRACKING_URI" not in os.environ:  # a file store beside the run; a server is the user's choice
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri("file:" + os.path.abspath(self.path("mlruns")))
        self.mlflow = mlflow.MlflowClient()
        if run_id is not None:
            try:
                self.mlflow.get_run(run_id)
                return run_id
            except mlflow.exceptions.MlflowException:
                pass  # the store was moved or cleared: start a new run
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        found = self.mlflow.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.mlflow.create_experiment(name)
        run_id = self.mlflow.create_run(experiment, run_name=self.run_name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in self.hparams.items()]  # MLflow's value limit
        for start in range(0, len(params), 100):  # and its batch limit
            self.mlflow.log_batch(run_id, params=params[start:start + 100])
        return run_id

    def resume(self, tag, step):
        """The run continues `tag` from `step`: what was logged for it at or after `step` is not shown twice."""
        if not self.enabled:
            return
        if not any(r.get("tag") == tag and r.get("step", -1) >= step for r in _records(self.path("metrics.jsonl"))):
            return  # nothing of this tag to take back (a stage that starts afresh)
        self.purge[tag] = step
        if self.writer is not None:  # the next scalar reopens it with purge_step
            self.writer.close()
            self.writer = None
        self.lines.close()
        kept, last = [], self.sent.get(tag, -1)
        for record in _records(self.path("metrics.jsonl")):
            if record.get("tag") == tag:
                last = max(last, record.get("step", -1))
                if record.get("step", -1) >= step:
                    continue
            kept.append(json.dumps(record) + "\n")
        self.sent[tag] = last
        rundir.write_text(self.path("metrics.jsonl"), "".join(kept))
        self.lines = open(self.path("metrics.jsonl"), "a")

    def log(self, tag, values: dict, step: int):
        """Scalars under tag/name at `step` to every tracker, also appended to metrics.jsonl."""
        if not self.enabled:
            return
        if "tensorboard" in self.report_to:
            writer = self.writer or self._tensorboard()
            for name, value in values.items():
                writer.add_scalar(f"{tag}/{name}", value, step)
        if step > self.sent.get(tag, -1):
            named = {f"{tag}/{name}": value for name, value in values.items()}
            if self.wandb is not None:
                if tag not in self.axes:  # each tag has its own step axis (stages count from 0); W&B's only grows
                    self.wandb.define_metric(f"{tag}/step")
                    self.wandb.define_metric(f"{tag}/*", step_metric=f"{tag}/step")
                    self.axes.add(tag)
                self.wandb.log({f"{tag}/step": step, **named})
            if self.mlflow is not None:
                from mlflow.entities import Metric
                now = int(time.time() * 1000)
                self.mlflow.log_batch(self.mlflow_run, metrics=[Metric(k, float(v), now, step)
                                                                   for k, v in named.items()])
        self.lines.write(json.dumps({"tag": tag, "step": step, "time": time.time(), **values}) + "\n")
        self.lines.flush()

    def print(self, *args):
        if self.enabled:
            print(*args, flush=True)

    def close(self):
        if not self.enabled:
            return
        if "tensorboard" in self.report_to:  # a run that logged no scalar still shows its config
            (self.writer or self._tensorboard()).close()
        self.lines.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run)


def _records(path):
    """The records of a metrics.jsonl file, skipping a line torn by the kill that ended an earlier attempt."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue
