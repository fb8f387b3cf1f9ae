"""Peers: one distillation job through this project and through what a user would reach for instead, one after
the other in one invocation, each trainer in its own process.

    python benchmarks/peers.py                    # the depth pair's output-KD job: 190 steps of 8, all trainers
    python benchmarks/peers.py --config launchers/configs/tiny.yaml --steps 3 --output /tmp/peers.csv

The job is the config's (default launchers/configs/depth-kd.yaml, the embedded default's job when these rows were
first measured): its source, its target (the initial target the
pipeline trains, exported once to a Hugging Face folder that every other trainer loads, so all start identical),
its batch size, learning rate, schedule, weight decay, gradient clip, temperature, dtype and seed, for --steps
optimizer steps (default: the config's output-KD steps, stage_steps x target layers). The rows are the config's
transfer set, the first max_examples usable rows as the pipeline takes them, less those longer than max_seq_len
tokens: no trainer truncates. Every trainer sees the same token ids, the same loss positions (the response
tokens, as the pipeline's data.tokenize marks them) and the same batches in the same order (data.batch_order), and
trains the same parameters (the decoder layers: the pipeline's output KD keeps embeddings, final norm and LM head
fixed, so the others freeze them too).

Trainers (--trainers, run in this order):
  semalign-ds   this project's output KD (`method: output_kd`): the source's final states cached once (alignment
                and cache phases), then the KL at the output from the cache, chunked over the vocabulary
  trl           TRL's GKDTrainer (trl.experimental.gkd) with lmbda=0 (off-policy: the data's own completions),
                beta=0 (its generalized JSD is then KL(teacher || student), as output KD) and seq_kd=False; its own
                loop, optimizer, scheduler and clipping from GKDConfig; the teacher forward every step. The rows go
                in through GKDTrainer's data_collator argument as the job's token ids (no chat template)
  torch         a plain PyTorch loop: teacher forward every step, full-vocabulary F.kl_div on the loss positions
  semalign-acl  the SemAlign recipe (--acl-config, launchers/configs/acl.yaml) on the same rows, with its own steps

Measured per trainer: training seconds (from just before the first optimizer step to the end of the last; the
pipeline's own phase seconds for this project), the source phases' seconds (this project: alignment + cache,
reported separately and in the total), the whole process's wall time, tokens/s, the process's peak resident memory
(VmHWM), the first and last training loss, and the exported student's HumanEval solution NLL through this
project's evaluator (launchers/evaluate.py --benchmarks nll, with the config's chat template and eval_max_seq_len,
as the pipeline evaluates). The table goes to stdout; rows (device, versions, date, load) are appended to
--output (default benchmarks/peers.csv).

TRL is an optional extra: pip install -e ".[peers]".
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "launchers"))
import benchmark  # noqa: E402  (launchers/benchmark.py: device name, versions and commit)

RESULTS = os.path.join(ROOT, "benchmarks", "peers.csv")
DEFAULT_CONFIG = os.path.join(ROOT, "launchers", "configs", "depth-kd.yaml")
ACL_CONFIG = os.path.join(ROOT, "launchers", "configs", "acl.yaml")
TRAINERS = ("semalign-ds", "trl", "torch", "semalign-acl")
LABELS = {"semalign-ds": "semalign-ds output KD", "trl": "TRL GKDTrainer (lmbda=0)",
          "torch": "plain PyTorch KL loop", "semalign-acl": "semalign-ds SemAlign (acl.yaml, same rows)"}
# how each trainer's loss and loop relate to this project's output KD (the table's notes and the CSV's)
NOTES = {
    "semalign-ds": "tau^2 KL(source || target) summed over the batch's response positions / their count; cached "
                   "source states, chunked loss; AdamW, clip, lr schedule from the config",
    "trl": "GKDTrainer lmbda=0 beta=0 seq_kd=False: KL(teacher || student) summed over labels != -100 / their "
           "count (num_items_in_batch), temperature 1 whatever the config's (its loss ignores it); GKDConfig "
           "optim {optim}, lr_scheduler_type {schedule}, max_grad_norm, bf16=False, gradient_checkpointing "
           "{checkpointing}; the job's token ids through data_collator, train_sampling_strategy=sequential",
    "torch": "F.kl_div(log_softmax(student), log_softmax(teacher), log_target) summed over the response positions "
             "/ their count, times tau^2; [B, T, V] logits of both models every step; torch.optim.AdamW, "
             "clip_grad_norm_, the config's lr schedule",
    "semalign-acl": "the SemAlign recipe of the ACL config on the same rows: attribution, alignment and cache, "
                    "then its frontier stages (its own steps)",
}
COLUMNS = ["date", "device", "cores", "threads", "load_1m", "load_1m_end", "config", "settings", "seed", "trainer",
           "label", "steps", "batch_size", "lr", "rows", "tokens", "loss_tokens", "source_s", "train_s", "total_s",
           "process_wall_s", "tokens_per_s_train", "tokens_per_s_total", "peak_rss_mib", "trainable_params",
           "first_loss", "last_loss", "nll", "nll_tokens", "nll_start", "step_breakdown_s", "notes", "torch",
           "transformers",
           "deepspeed", "trl", "python", "commit"]
INSTALL_HINT = 'pip install -e ".[peers]"'


class PeersError(SystemExit):
    pass


# --- the job: rows, batches, starting point ------------------------------------------------------------------------
def job_rows(cfg, tokenizer, rows=None):
    """(rows, TokenizedSet, counts) of the job: of the first max_examples rows the pipeline would use (it skips the
    rows with no response token within max_seq_len, and cuts the others there), those whose whole sequence fits
    max_seq_len; so no trainer truncates a row, and every one sees the same token ids and loss positions."""
    from semalign_ds import data as data_mod
    from semalign_ds.config import ConfigError
    if rows is None:
        rows = data_mod.read_rows(cfg.data, cfg.prompt_field, cfg.response_field, cfg.data_split, cfg.seed,
                                  cfg.data_format, cfg.messages_field, cfg.completion_field, cfg.max_row_chars)
    kept, used, longer = [], 0, 0

    def one(row, max_seq_len):
        try:
            return data_mod.tokenize([row], tokenizer, max_seq_len, cfg.loss_on, cfg.chat_template,
                                     max_row_chars=cfg.max_row_chars)[0]
        except ConfigError:
            return None  # dropped (no response token, too short): the pipeline drops it too

    for row in rows:
        if cfg.max_examples is not None and used == cfg.max_examples:
            break
        if one(row, cfg.max_seq_len) is None:
            continue
        used += 1
        whole = one(row, 1 << 30)
        if int(whole.lengths[0]) <= cfg.max_seq_len:
            kept.append(row)
        else:
            longer += 1
    if not kept:
        raise PeersError(f"peers: none of the {used} rows of {cfg.data} fits max_seq_len={cfg.max_seq_len} whole")
    tokens, _ = data_mod.tokenize(kept, tokenizer, cfg.max_seq_len, cfg.loss_on, cfg.chat_template,
                                  max_row_chars=cfg.max_row_chars)
    assert len(tokens) == len(kept) and int(tokens.lengths.max()) <= cfg.max_seq_len
    return kept, tokens, {"used": used, "kept": len(kept), "longer": longer}


def batch_stream(n, batch_size, steps, seed):
    """The sequence indices of every optimizer step, as the pipeline's output KD draws them (stage 0)."""
    from semalign_ds.data import batch_order
    return batch_order(n, batch_size, steps, seed, 0)


def batch_counts(tokens, order):
    """(token positions, loss positions) of all the batches: what every trainer processes."""
    lengths, counts = tokens.lengths, tokens.loss_counts
    return sum(int(lengths[b].sum()) for b in order), sum(int(counts[b].sum()) for b in order)


def labels_of(ids, loss):
    """Causal-LM labels of a right-padded batch: token t+1 where position t carries loss, -100 elsewhere (so that
    a trainer that shifts labels, as GKDTrainer does, scores exactly the pipeline's loss positions)."""
    import torch
    labels = torch.full_like(ids, -100)
    labels[:, 1:][loss[:, :-1]] = ids[:, 1:][loss[:, :-1]]
    return labels


class JobCollator:
    """A data_collator of the job's own batches: each example names a sequence of the tokenised set; the batch is
    data.TokenizedSet.batch's (right-padded ids, attention mask) with labels_of its loss mask."""

    def __init__(self, tokens, pad_id):
        self.tokens, self.pad_id = tokens, pad_id

    def __call__(self, examples):
        ids, attn, loss = self.tokens.batch([int(e["index"]) for e in examples], self.pad_id)
        return {"input_ids": ids, "attention_mask": attn, "labels": labels_of(ids, loss)}


def train_layers_only(model):
    """Freeze everything but the decoder layers (what the pipeline's output KD trains); the trainable tensors."""
    from semalign_ds import models
    model.requires_grad_(False)
    layers = models.Adapter(model).layers
    layers.requires_grad_(True)
    return [p for p in layers.parameters()]


def steps_of(cfg, n_target):
    return cfg.stage_steps * n_target


def target_layers(cfg):
    from semalign_ds import models
    if cfg.target_keep_layers is not None:
        return len(cfg.target_keep_layers)
    if cfg.target_num_layers is not None:
        return cfg.target_num_layers
    return models.config_of(cfg.target, cfg.target_gguf_file).num_hidden_layers


def job_config(cfg, rows_path, output_dir, seed, method=None, stage_steps=None):
    """The config a pipeline run of the job uses: the job's rows (all of them, as given), no evaluation inside the
    run (the exports are evaluated alike afterwards), no tracker."""
    values = cfg.to_dict()
    values.update(data=os.path.abspath(rows_path), data_format="prompt_response", prompt_field="prompt",
                  response_field="response", max_examples=None, validation_fraction=0.0, eval_data=None,
                  seed=seed, output_dir=output_dir, report_to=["none"])
    if method is not None:
        values["method"] = method
    if stage_steps is not None:
        values["stage_steps"] = stage_steps
    return values


def write_yaml(path, values):
    import yaml
    with open(path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return path


def prepare(cfg, seed, folder):
    """Write the job of one seed into `folder`: rows.jsonl (the rows, for the pipeline), tokens.safetensors (their
    token ids and loss mask, for the other trainers), job.yaml, and student-init/ (the initial target)."""
    from safetensors.torch import save_file

    from semalign_ds import config as config_mod, export, models
    from semalign_ds.pipeline import initial_target
    os.makedirs(folder, exist_ok=True)
    cfg = cfg.model_copy(update={"seed": seed})
    tokenizer = models.load_tokenizer(cfg.source, cfg.source_gguf_file)
    if cfg.tokenizer:
        tokenizer = models.load_tokenizer(cfg.tokenizer)
    rows, tokens, counts = job_rows(cfg, tokenizer)
    with open(os.path.join(folder, "rows.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps({"prompt": row["prompt"], "response": row["response"]}) + "\n")
    save_file(tokens.tensors(), os.path.join(folder, "tokens.safetensors"))
    values = job_config(cfg, os.path.join(folder, "rows.jsonl"), os.path.join(folder, "semalign-ds", "run"), seed)
    config_mod.from_dict(values)  # valid
    write_yaml(os.path.join(folder, "job.yaml"), values)
    init = os.path.join(folder, "student-init")
    if not os.path.isfile(os.path.join(init, "config.json")):
        target = initial_target(cfg)
        tok_t = models.load_tokenizer(cfg.target, cfg.target_gguf_file) if cfg.target else tokenizer
        export.save_hf(target, tok_t, init)
        del target
    print(f"[seed {seed}] {counts['kept']} rows of the {counts['used']} the pipeline would use fit "
          f"max_seq_len={cfg.max_seq_len} whole ({counts['longer']} longer, left out for every trainer); "
          f"{int(tokens.offsets[-1])} tokens, {int(tokens.loss.sum())} loss positions", flush=True)
    return {"rows": counts["kept"], **counts}


# --- the workers: one trainer in its own process ---------------------------------------------------------------------
class StepTimer:
    """Seconds from the start of the first optimizer step to the end of the last, and each step's loss."""

    def __init__(self):
        self.t0 = self.t1 = None
        self.losses = []

    def begin(self):
        if self.t0 is None:
            self.t0 = time.time()

    def end(self):
        self.t1 = time.time()

    @property
    def seconds(self):
        return (self.t1 - self.t0) if self.t0 is not None and self.t1 is not None else None


def work_torch(spec):
    """The afternoon loop: teacher forward every step, F.kl_div over the whole vocabulary."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from semalign_ds import config as config_mod, data as data_mod, models
    from semalign_ds.training import lr_at
    cfg = config_mod.load(spec["config"])
    tokens = data_mod.TokenizedSet.load(spec["tokens"])
    tokenizer = AutoTokenizer.from_pretrained(spec["student_init"])
    pad = data_mod.pad_id(tokenizer)
    teacher = models.load_model(cfg.source, cfg.source_gguf_file, cfg.dtype, cfg.seed)
    student = AutoModelForCausalLM.from_pretrained(spec["student_init"], dtype=models.DTYPES[cfg.dtype])
    params = train_layers_only(student)
    student.train()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps, tau = spec["steps"], cfg.temperature
    order = batch_stream(len(tokens), cfg.batch_size, steps, cfg.seed)
    timer = StepTimer()
    parts = dict.fromkeys(BREAKDOWN, 0.0)  # where a step's time goes (the loop is synchronous on CPU)
    for step, batch in enumerate(order):
        timer.begin()
        t = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step, steps)
        ids, attn, loss_mask = tokens.batch(batch, pad)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, attention_mask=attn).logits
        t = _lap(parts, "teacher_forward", t)
        student_logits = student(input_ids=ids, attention_mask=attn).logits
        t = _lap(parts, "student_forward", t)
        n = int(loss_mask.sum())
        loss = F.kl_div(F.log_softmax(student_logits[loss_mask].float() / tau, dim=-1),
                        F.log_softmax(teacher_logits[loss_mask].float() / tau, dim=-1),
                        reduction="sum", log_target=True) * (tau * tau) / n
        t = _lap(parts, "loss", t)
        loss.backward()
        t = _lap(parts, "backward", t)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.losses.append(float(loss.detach()))
        _lap(parts, "optimizer", t)
        timer.end()
    student.save_pretrained(spec["export"])
    tokenizer.save_pretrained(spec["export"])
    return {"train_s": timer.seconds, "losses": timer.losses, "trainable_params": sum(p.numel() for p in params),
            "breakdown": parts}


# the plain loop's step, in parts: what a trainer that runs the teacher every step and materialises [B, T, V]
# logits spends its time on (TRL's GKDTrainer computes the same things, plus its own overhead)
BREAKDOWN = ("teacher_forward", "student_forward", "loss", "backward", "optimizer")


def _lap(parts, name, t):
    now = time.perf_counter()
    parts[name] += now - t
    return now


def trl_schedule(cfg):
    """GKDConfig's lr_scheduler_type (and kwargs) for the config's schedule."""
    if cfg.lr_schedule == "constant":
        return ("constant_with_warmup" if cfg.warmup_steps else "constant"), {}
    if cfg.lr_schedule == "cosine" and cfg.min_lr_ratio > 0:
        return "cosine_with_min_lr", {"min_lr_rate": cfg.min_lr_ratio}
    return cfg.lr_schedule, {}


def work_trl(spec):
    """TRL's GKDTrainer, off-policy (lmbda=0) with forward KL (beta=0), through its public API and settings."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from semalign_ds import config as config_mod, data as data_mod, models
    cfg = config_mod.load(spec["config"])
    tokens = data_mod.TokenizedSet.load(spec["tokens"])
    tokenizer = AutoTokenizer.from_pretrained(spec["student_init"])
    teacher = models.load_model(cfg.source, cfg.source_gguf_file, cfg.dtype, cfg.seed)
    student = AutoModelForCausalLM.from_pretrained(spec["student_init"], dtype=models.DTYPES[cfg.dtype])
    params = train_layers_only(student)
    steps = spec["steps"]
    order = batch_stream(len(tokens), cfg.batch_size, steps, cfg.seed)
    # the batches in order, read sequentially: train_sampling_strategy="sequential"
    train = datasets.Dataset.from_dict({"index": [i for batch in order for i in batch]})
    timer = StepTimer()

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.begin()

        def on_step_end(self, args, state, control, **kwargs):
            timer.end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                timer.losses.append(float(logs["loss"]))

    schedule, schedule_kwargs = trl_schedule(cfg)
    args = GKDConfig(
        output_dir=os.path.join(spec["out"], "trainer"), per_device_train_batch_size=cfg.batch_size //
        cfg.grad_accum_steps, gradient_accumulation_steps=cfg.grad_accum_steps, max_steps=steps,
        learning_rate=cfg.lr, lr_scheduler_type=schedule, lr_scheduler_kwargs=schedule_kwargs,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip,
        bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=spec["gradient_checkpointing"], lmbda=0.0, beta=0.0, seq_kd=False,
        train_sampling_strategy="sequential", seed=cfg.seed, save_strategy="no", report_to="none",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, **({"optim": spec["optim"]}
                                                                          if spec.get("optim") else {}))
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                         data_collator=JobCollator(tokens, data_mod.pad_id(tokenizer)), train_dataset=train,
                         processing_class=tokenizer, callbacks=[Timing()])
    trainer.train()
    trainer.save_model(spec["export"])
    return {"train_s": timer.seconds, "losses": timer.losses, "trainable_params": sum(p.numel() for p in params),
            "optim": getattr(args.optim, "value", str(args.optim)), "schedule": schedule}


def work_semalign(spec):
    """A pipeline run of the job (semalign_ds.cli, in this process); times from its run directory."""
    from semalign_ds import data as data_mod
    from semalign_ds.cli import main
    run_dir = os.path.join(spec["out"], "run")
    rc = main(["--config", spec["config"], "--output-dir", run_dir])
    if rc != 0:
        raise SystemExit(f"the pipeline run failed (exit {rc})")
    with open(os.path.join(run_dir, "state.json")) as f:
        state = json.load(f)
    done = state["done"]

    def seconds(info):
        info = info if isinstance(info, dict) else {}
        return (info.get("budget") or {}).get("seconds", info.get("seconds")) or 0.0

    source = sum(seconds(done.get(name)) for name in ("prune", "plan", "cache"))
    trained = [k for k in done if k.startswith("stage_") or k == "joint"]
    # output KD: its one phase's first and last loss; a SemAlign recipe's stages have losses of other objectives
    losses = ([done[trained[0]].get("first_loss"), done[trained[0]].get("last_loss")]
              if spec["trainer"] == "semalign-ds" else [])
    mine = data_mod.TokenizedSet.load(os.path.join(run_dir, "data", "transfer.safetensors"))
    given = data_mod.TokenizedSet.load(spec["tokens"])
    same = all(bool((getattr(mine, k) == getattr(given, k)).all()) and getattr(mine, k).shape == getattr(given, k).shape
               for k in ("ids", "loss", "offsets"))
    if not same:
        raise SystemExit("the pipeline tokenised the job's rows into other token ids or loss positions than the "
                         "other trainers get")
    shutil.copytree(os.path.join(run_dir, "target"), spec["export"])
    return {"train_s": sum(seconds(done[k]) for k in trained), "source_s": source, "losses": losses,
            "stage_seconds": {k: seconds(done[k]) for k in trained},
            "trainable_params": layer_params(spec["export"]), "same_tokens": same}


def layer_params(folder):
    """Parameters of the decoder layers in a model folder's safetensors files (what output KD trains)."""
    import glob

    from safetensors import safe_open

    from semalign_ds.models import _LAYER_KEY
    total = 0
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(path, framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if _LAYER_KEY.search(k))
    return total


WORKERS = {"semalign-ds": work_semalign, "semalign-acl": work_semalign, "trl": work_trl, "torch": work_torch}


def worker(spec_path):
    import torch

    from semalign_ds import summary
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    t0 = time.time()
    result = WORKERS[spec["trainer"]](spec)
    result.update(rss_peak_mib=summary.peak_rss_bytes() / 2**20, worker_s=time.time() - t0)
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    return 0


# --- the driver ------------------------------------------------------------------------------------------------------
def require_trl(trainers):
    """Stop before anything loads when TRL is asked for and not installed."""
    if "trl" in trainers and importlib.util.find_spec("trl") is None:
        raise PeersError(f"peers: the trl trainer needs TRL, which is not installed: {INSTALL_HINT} (the optional "
                         f"extra), or leave it out with --trainers semalign-ds,torch")


def trainer_env(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    for key in ("SEMALIGN_DS_FAULT", "ACCELERATE_MIXED_PRECISION"):
        env.pop(key, None)
    return env


def run_trainer(name, spec, folder, threads):
    os.makedirs(spec["out"], exist_ok=True)
    spec_path = os.path.join(spec["out"], "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    log_path = os.path.join(spec["out"], "log.txt")
    load = os.getloadavg()[0]
    print(f"[{name}] training ({spec['steps']} steps; load average {load:.2f}; log {log_path})", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_path],
                              env=trainer_env(threads), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise PeersError(f"peers: the {name} run failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    with open(spec["result"]) as f:
        result = json.load(f)
    result.update(process_wall_s=wall, load_1m=load, load_1m_end=os.getloadavg()[0])
    return result


def evaluate(cfg, exports, folder, threads):
    """{name: HumanEval solution NLL result} of each exported model, through launchers/evaluate.py with the job's
    NLL settings (the config's chat template and eval_max_seq_len), in one process of its own."""
    out = os.path.join(folder, "eval")
    cmd = [sys.executable, os.path.join(ROOT, "launchers", "evaluate.py"), "--benchmarks", "nll",
           "--nll-chat-template", cfg.chat_template, "--nll-max-seq-len", str(cfg.eval_max_seq_len),
           "--batch-size", str(cfg.eval_batch_size), "--dtype", cfg.dtype, "--output-dir", out]
    if cfg.eval_data:
        cmd += ["--data-nll", cfg.eval_data]
    if cfg.eval_max_examples:
        cmd += ["--limit", str(cfg.eval_max_examples)]
    for name, path in exports.items():
        cmd += ["--model", f"{name}={path}"]
    print(f"[eval] HumanEval solution NLL of {', '.join(exports)}", flush=True)
    log_path = os.path.join(folder, "eval.log")
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=trainer_env(threads), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            raise PeersError(f"peers: the evaluation failed (exit {proc.returncode}); log {log_path}:\n"
                             f"{f.read()[-4000:]}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return {name: m["results"]["nll"] for name, m in report["models"].items()}


def run_seed(cfg, args, seed, workdir, threads):
    from semalign_ds import config as config_mod, data as data_mod
    folder = os.path.join(workdir, f"seed{seed}")
    job = prepare(cfg, seed, folder)
    tokens = data_mod.TokenizedSet.load(os.path.join(folder, "tokens.safetensors"))
    results = {}
    for name in args.trainers:
        out = os.path.join(folder, name)
        shutil.rmtree(out, ignore_errors=True)
        spec = {"trainer": name, "seed": seed, "threads": threads, "tokens": os.path.join(folder, "tokens.safetensors"),
                "student_init": os.path.join(folder, "student-init"), "out": out,
                "export": os.path.join(out, "export"), "result": os.path.join(out, "result.json"),
                "config": os.path.join(folder, "job.yaml"), "steps": args.steps,
                "gradient_checkpointing": args.trl_gradient_checkpointing == "on", "optim": args.trl_optim}
        if name == "semalign-ds":
            values = job_config(cfg, os.path.join(folder, "rows.jsonl"), os.path.join(out, "run"), seed,
                                method="output_kd", stage_steps=args.steps // args.n_target)
            spec["config"] = write_yaml(os.path.join(folder, "semalign-ds.yaml"), values)
        elif name == "semalign-acl":
            acl = config_mod.load(args.acl_config, args.acl_overrides)
            same = {k: getattr(cfg, k) for k in ("source", "source_gguf_file", "target", "target_gguf_file",
                                                  "target_keep_layers", "tokenizer", "max_seq_len", "chat_template",
                                                  "loss_on", "max_row_chars", "batch_size", "dtype")}
            values = job_config(acl.model_copy(update=same), os.path.join(folder, "rows.jsonl"),
                                os.path.join(out, "run"), seed)
            spec["config"] = write_yaml(os.path.join(folder, "semalign-acl.yaml"), values)
            spec["steps"] = acl.stage_steps * args.n_target + acl.joint_steps
        r = run_trainer(name, spec, folder, threads)
        order = batch_stream(len(tokens), cfg.batch_size, spec["steps"], seed)
        r["tokens"], r["loss_tokens"] = batch_counts(tokens, order)
        r["steps"], r["export"], r["rows"] = spec["steps"], spec["export"], job["rows"]
        results[name] = r
        if not args.keep:
            shutil.rmtree(os.path.join(out, "run", "cache"), ignore_errors=True)
    exports = {"start": os.path.join(folder, "student-init"), **{n: r["export"] for n, r in results.items()}}
    if args.eval_source:
        from semalign_ds import models
        exports["source"] = models.resolve(cfg.source, cfg.source_gguf_file)[0]
    nll = evaluate(cfg, exports, folder, threads)
    for name, r in results.items():
        r["nll"], r["nll_tokens"], r["nll_start"] = nll[name]["nll"], nll[name]["tokens"], nll["start"]["nll"]
        r["source_nll"] = nll.get("source", {}).get("nll")
    return results


def _f(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def derived(r):
    """Totals and rates of one trainer's result."""
    source = r.get("source_s") or 0.0
    total = (r["train_s"] or 0.0) + source
    losses = r.get("losses") or [None]
    return {"source_s": source if r.get("source_s") is not None else None, "total_s": total,
            "tokens_per_s_train": r["tokens"] / r["train_s"] if r.get("train_s") else None,
            "tokens_per_s_total": r["tokens"] / total if total else None,
            "first_loss": losses[0], "last_loss": losses[-1]}


def summarize(per_seed, trainers):
    """{trainer: means over seeds, with the NLL's standard deviation}."""
    out = {}
    for name in trainers:
        rs = [seed_results[name] for seed_results in per_seed.values() if name in seed_results]
        if not rs:
            continue
        rows = [{**r, **derived(r)} for r in rs]

        def mean(key):
            values = [x[key] for x in rows if x.get(key) is not None]
            return statistics.fmean(values) if values else None

        nlls = [x["nll"] for x in rows if x.get("nll") is not None]
        out[name] = {k: mean(k) for k in ("source_s", "train_s", "total_s", "process_wall_s", "tokens_per_s_train",
                                          "tokens_per_s_total", "rss_peak_mib", "first_loss", "last_loss", "nll",
                                          "nll_start", "tokens", "loss_tokens", "steps", "rows")}
        out[name]["nll_sd"] = statistics.stdev(nlls) if len(nlls) > 1 else None
        out[name]["seeds"] = len(rows)
    return out


def table(summary, reference="semalign-ds"):
    """The Markdown table: per trainer, times, rate, memory, their ratios to this project's output KD, the losses
    and the NLL (mean +- standard deviation over seeds)."""
    ref = summary.get(reference)
    head = ("| trainer | steps | source s | train s | total s | x time | tok/s (total) | peak RSS MiB | x memory "
            "| first loss | last loss | HumanEval NLL |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in summary.items():
        nll = _f(s["nll"], ".3f") + (f" ± {s['nll_sd']:.3f}" if s.get("nll_sd") is not None else "")
        x_time = s["total_s"] / ref["total_s"] if ref and ref.get("total_s") else None
        x_mem = s["rss_peak_mib"] / ref["rss_peak_mib"] if ref and ref.get("rss_peak_mib") else None
        lines.append(f"| {LABELS[name]} | {_f(s['steps'], '.0f')} | {_f(s['source_s'], '.1f')} | "
                     f"{_f(s['train_s'], '.1f')} | {_f(s['total_s'], '.1f')} | {_f(x_time, '.2f')} | "
                     f"{_f(s['tokens_per_s_total'], '.0f')} | {_f(s['rss_peak_mib'], '.0f')} | {_f(x_mem, '.2f')} | "
                     f"{_f(s['first_loss'], '.4f')} | {_f(s['last_loss'], '.4f')} | {nll} |")
    any_seed = next(iter(summary.values()), None)
    if any_seed and any_seed.get("nll_start") is not None:
        lines.append(f"\nStudent before training: HumanEval NLL {any_seed['nll_start']:.3f}. "
                     f"{_f(any_seed['rows'], '.0f')} rows, {_f(any_seed['tokens'], '.0f')} tokens per run "
                     f"({_f(any_seed['loss_tokens'], '.0f')} loss positions); x: against {LABELS.get(reference)}.")
    return "\n".join(lines)


def notes(name, args, result):
    text = NOTES[name]
    if name == "trl":
        text = text.format(optim=result.get("optim", "?"), schedule=result.get("schedule", "?"),
                           checkpointing=args.trl_gradient_checkpointing)
    return text


def breakdown_text(result):
    parts = result.get("breakdown")
    return " ".join(f"{k}={v:.2f}" for k, v in parts.items()) if parts else ""


def trl_version():
    try:
        import importlib.metadata
        return importlib.metadata.version("trl")
    except Exception:  # not installed: the CSV says so
        return ""


def append_rows(path, per_seed, args, cores, threads):
    """Append one row per (seed, trainer) to the CSV (written with its header when new; a file of other columns
    is rewritten with the columns of now)."""
    info = benchmark.versions()
    common = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": benchmark.device_name(), "cores": cores, "threads": threads,
              "config": os.path.relpath(args.config, ROOT) if args.config.startswith(ROOT) else args.config,
              "settings": " ".join([f"steps={args.steps}"] + args.set), "trl": trl_version(), **info}
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
        if old and list(old[0]) != COLUMNS:
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=COLUMNS, restval="", extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for seed, results in per_seed.items():
            for name, r in results.items():
                d = derived(r)
                w.writerow({**common, "seed": seed, "trainer": name, "label": LABELS[name], "steps": r["steps"],
                            "batch_size": args.batch_size, "lr": args.lr, "rows": r["rows"], "tokens": r["tokens"],
                            "loss_tokens": r["loss_tokens"], "source_s": _f(d["source_s"], ".2f"),
                            "train_s": _f(r["train_s"], ".2f"), "total_s": _f(d["total_s"], ".2f"),
                            "process_wall_s": _f(r["process_wall_s"], ".2f"),
                            "tokens_per_s_train": _f(d["tokens_per_s_train"], ".1f"),
                            "tokens_per_s_total": _f(d["tokens_per_s_total"], ".1f"),
                            "peak_rss_mib": _f(r["rss_peak_mib"], ".0f"),
                            "trainable_params": r.get("trainable_params") or "",
                            "first_loss": _f(d["first_loss"], ".6f"), "last_loss": _f(d["last_loss"], ".6f"),
                            "nll": _f(r.get("nll"), ".5f"), "nll_tokens": r.get("nll_tokens", ""),
                            "nll_start": _f(r.get("nll_start"), ".5f"), "load_1m": f"{r['load_1m']:.2f}",
                            "load_1m_end": f"{r['load_1m_end']:.2f}", "notes": notes(name, args, r),
                            "step_breakdown_s": breakdown_text(r)})
                n += 1
    return n


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="the job's config (default: launchers/configs/depth-kd.yaml, output KD on the depth pair)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a key of the job's config (repeatable), e.g. --set max_examples=64")
    p.add_argument("--trainers", default="semalign-ds,trl,torch",
                   help=f"comma-separated, in the order they run, from {','.join(TRAINERS)} (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps of every trainer (default: the config's output-KD steps, stage_steps x "
                        "target layers); a multiple of the target's layers (the pipeline's output KD runs "
                        "stage_steps x layers)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds (rows, batch order); each runs every trainer (default: the config's seed)")
    p.add_argument("--threads", type=int, default=None, help="threads of every trainer (default: all cores)")
    p.add_argument("--output", default=RESULTS, help="CSV the rows are appended to (default: %(default)s)")
    p.add_argument("--no-output", action="store_true", help="print the table only")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the pipeline's activation caches in the workdir")
    p.add_argument("--eval-source", action="store_true", help="also evaluate the source (teacher)")
    p.add_argument("--acl-config", default=ACL_CONFIG, help="the semalign-acl trainer's config (default: %(default)s)")
    p.add_argument("--acl-set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a key of --acl-config (repeatable), e.g. --acl-set stage_steps=4")
    p.add_argument("--trl-gradient-checkpointing", choices=["off", "on"], default="off",
                   help="GKDConfig gradient_checkpointing (TRL's default is on; off matches the other trainers, "
                        "which keep activations)")
    p.add_argument("--trl-optim", default=None,
                   help="GKDConfig optim (default: TRL's own, adamw_torch_fused with this torch)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    args = parser().parse_args(argv)
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = [t for t in args.trainers if t not in TRAINERS]
    if unknown or not args.trainers:
        raise PeersError(f"peers: unknown trainer(s) {unknown}; choose from {', '.join(TRAINERS)}")
    require_trl(args.trainers)  # before any model loads
    from semalign_ds import config as config_mod
    args.config = os.path.abspath(args.config)
    try:
        cfg = config_mod.load(args.config, config_mod.parse_sets(args.set))
        args.acl_overrides = config_mod.parse_sets(args.acl_set)  # checked before any trainer runs
        args.n_target = target_layers(cfg)
    except config_mod.ConfigError as err:
        raise PeersError(f"peers: {err}") from None
    if cfg.lora_rank or cfg.ce_weight or cfg.fisher_weight:
        raise PeersError("peers: the job is plain output KD: lora_rank, ce_weight and fisher_weight must be 0")
    args.steps = args.steps if args.steps is not None else steps_of(cfg, args.n_target)
    if args.steps < 1 or ("semalign-ds" in args.trainers and args.steps % args.n_target):
        k = max(1, round(args.steps / args.n_target))
        raise PeersError(f"peers: --steps {args.steps}: the pipeline's output KD runs stage_steps x "
                         f"{args.n_target} target layers; use a multiple of {args.n_target}, e.g. "
                         f"{k * args.n_target}")
    args.batch_size, args.lr = cfg.batch_size, cfg.lr
    seeds = args.seeds if args.seeds is not None else [cfg.seed]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or cores
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="semalign-peers-")
    os.makedirs(workdir, exist_ok=True)
    print(f"peers: {', '.join(LABELS[t] for t in args.trainers)}; {args.steps} steps of {cfg.batch_size}, "
          f"lr {cfg.lr}, {cfg.dtype}, {threads} thread(s); seeds {seeds}; workdir {workdir}", flush=True)
    per_seed = {}
    try:
        for seed in seeds:
            per_seed[seed] = run_seed(cfg, args, seed, workdir, threads)
            if len(seeds) > 1:
                print(f"[seed {seed}]\n" + table(summarize({seed: per_seed[seed]}, args.trainers)), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(per_seed, args.trainers)
    print("\n" + table(summary))
    for name in args.trainers:
        print(f"  {LABELS[name]}: {notes(name, args, per_seed[seeds[-1]][name])}")
    for seed, results in per_seed.items():
        if results.get("torch", {}).get("breakdown"):
            r = results["torch"]
            total = sum(r["breakdown"].values()) or 1.0
            print(f"  seed {seed}, plain loop's {r['train_s']:.1f} s of training: " + ", ".join(
                f"{k.replace('_', ' ')} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in r["breakdown"].items()))
    if not args.no_output:
        n = append_rows(args.output, per_seed, args, cores, threads)
        print(f"appended {n} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
