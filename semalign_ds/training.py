"""Frontier training, shallow to deep (docs/method.md, section 5), and the baselines, on one optimizer loop.

Stage k trains target layer k alone on the frontier (the output of the finished layers below it); the output-KD
baseline trains every layer at once. `fit` is the loop they share: seeded global batches (the same whatever the
world size; each rank computes the sequences it owns), checkpoints every checkpoint_every steps, metrics.

Checkpoints are atomic on any number of ranks: step N is written whole into its own folder by every rank, then
rank 0 checksums it and moves the pointer latest.json to it, and only then removes the checkpoint before the
previous one. A kill or a requeue during a save leaves the pointer on the last complete checkpoint; a resume
verifies the checksums and falls back to the previous checkpoint (or the start of the stage) if they fail.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import torch

from semalign_ds import budget, data, distributed, engines, lora, objectives, rundir, summary
from semalign_ds.data import batch_order
from semalign_ds.frontier import Frontier
from semalign_ds.faults import fault_point


@dataclass
class Batch:
    """One micro-batch of a training step, on the run's device."""
    idx: list  # the sequences (indices into the transfer set)
    ids: torch.Tensor
    attn: torch.Tensor
    loss_mask: torch.Tensor
    rows: dict  # the cached rows of its loss positions, by cache key
    normalizer: int  # loss positions of the whole global batch: summed losses are divided by it
    step: int  # the optimizer step, 0-based


@dataclass
class Job:
    """What fit() trains: `module`'s parameters for `steps` optimizer steps on the sequences `members` (this
    rank's), each micro-batch's (loss, parts) given by `step(Batch)`."""
    tag: str  # checkpoint folder and metrics tag
    desc: str  # progress bar
    module: torch.nn.Module
    steps: int
    seed_stage: int  # batch order is seeded by (seed, seed_stage)
    rows: dict  # this rank's cached rows, by cache key
    members: list
    step: Callable
    peak_lr: float | None = None


def phase(s, state, tgt, head_t, store, mark):
    """Train the target (frontier stages and a joint phase, or a whole-model baseline); returns per-stage metrics.
    `mark(phase, info)` records a finished stage."""
    cfg, rd = s.cfg, s.rd
    recipe = objectives.recipe(cfg)
    mine = members(s)  # the sequences this rank trains on and keeps the frontier of
    source_head = (rundir.load_tensors(store.head_path())["weight"].to(s.device, s.dtype)
                   if recipe.uses_source_head else None)

    def rows(keys):
        return {key: store.rows(key, mine, s.data.loss_counts) for key in keys}

    metrics = state.get("stage_metrics", {})
    if cfg.trains_whole_model:  # output KD or fine-tuning: every layer at once, the output terms only
        name = cfg.method
        path = rd.path("stages", "layers.safetensors")
        if f"stage_{name}" not in state["done"]:
            desc = {"output_kd": "output KD", "finetune": "fine-tuning"}[name]
            step = functools.partial(whole_model_step, tgt, recipe, head_t, source_head)
            with adapters(s, list(tgt.layers), 0):
                metrics[name] = fit(s, Job(name, desc, tgt.layers, cfg.stage_steps * s.n_target, 0,
                                           rows(recipe.keys(s.n_target, True)), mine, step))
            metrics[name]["budget"] = fit_cost(s, tgt, metrics[name], recipe, "whole", s.n_target)
            if s.main:
                rundir.save_tensors(path, tgt.layers.state_dict())
            state["stage_metrics"] = metrics
            mark(f"stage_{name}", metrics[name])
        tgt.layers.load_state_dict(rundir.load_tensors(path))
        return metrics
    frontier = None
    for k in range(1, s.n_target + 1) if cfg.frontier_stages else ():  # stage_steps 0: the joint phase only
        layer = tgt.layers[k - 1]
        weights = rd.path("stages", f"layer-{k}.safetensors")
        if f"stage_{k}" in state["done"]:
            layer.load_state_dict(rundir.load_tensors(weights))
            continue
        if frontier is None:
            frontier = frontier_after(s, tgt, k - 1, mine)
        final = k == s.n_target
        metrics[str(k)] = train_stage(s, tgt, recipe, head_t, source_head, k, frontier, rows(recipe.keys(k, final)))
        if s.main:
            rundir.save_tensors(weights, layer.state_dict())
        t0 = time.time()
        frontier = frontier.advance(lambda h, a: forward_layer(tgt, k - 1, h, a, s.dtype), s.data, s.pad_id,
                                    cfg.eval_batch_size, s.device, show=s.main)
        total = int(s.data.offsets[-1])  # the next frontier: layer k forward over every position
        metrics[str(k)]["budget"] = budget.add(
            fit_cost(s, tgt, metrics[str(k)], recipe, "stage", 1, final),
            budget.cost(budget.shape(tgt.config, s.vocab), total, 0, total / len(s.data), 1,
                        seconds=time.time() - t0))
        save_frontier(s, k, frontier)
        state["stage_metrics"] = metrics
        mark(f"stage_{k}", metrics[str(k)])
        for old in range(k - 1):  # the last two frontiers stay: a crash between writes loses nothing
            rundir.remove(frontier_path(s, old))
    if cfg.joint_steps > 0:
        path = rd.path("stages", "joint.safetensors")
        if "joint" not in state["done"]:
            step = functools.partial(joint_step, tgt, recipe, head_t, source_head, cfg.joint_layer_weight,
                                     cfg.joint_steps)
            with adapters(s, list(tgt.layers), s.n_target + 1):
                metrics["joint"] = fit(s, Job("joint", "joint", tgt.layers, cfg.joint_steps, s.n_target + 1,
                                              rows(recipe.joint_keys(s.n_target)), mine, step, cfg.joint_lr))
            metrics["joint"]["budget"] = fit_cost(s, tgt, metrics["joint"], recipe, "joint", s.n_target)
            if s.main:
                rundir.save_tensors(path, tgt.layers.state_dict())
            state["stage_metrics"] = metrics
            mark("joint", metrics["joint"])
        tgt.layers.load_state_dict(rundir.load_tensors(path))
    return metrics


def members(s):
    """This rank's sequences (data.owned), dealt out so that the ranks' loss positions are near equal. A step's
    layers run over a micro-batch padded to its longest sequence, near the same for every rank as each computes the
    same number of sequences; its loss runs over the loss positions alone, and a rank's step lasts as long as the
    busiest rank's. Dealt out strided, one rank of two had 16% more loss positions than the other on the scale
    benchmark's set (1,606 against 1,385), and rank 0 waited for it in the gradients' reduction."""
    return data.owned(s.data.loss_counts.tolist(), s.cfg.batch_size, s.rank, s.world)


def frontier_path(s, k):
    return s.rd.path("frontier", f"frontier-{k}.rank{s.rank}of{s.world}.safetensors")


def frontier_after(s, tgt, k, mine):
    """The frontier of this rank's sequences after k finished stages: from disk when intact, else recomputed from
    the embeddings through the k trained layers (after a change of world size, or a damaged file)."""
    path = frontier_path(s, k)
    try:
        if os.path.isfile(path):  # load_tensors checks it against its checksum
            saved = rundir.load_tensors(path)
            if torch.equal(saved.get("members", torch.empty(0)), torch.tensor(mine, dtype=torch.long)):
                return Frontier(saved["states"], s.data.offsets, mine)
            print(f"{path} holds other sequences than this rank's: recomputing it", flush=True)
    except rundir.DamagedFile as err:
        print(f"{err}: recomputing it", flush=True)
    frontier = Frontier.of_embeddings(tgt, s.data, mine, s.pad_id, s.cfg.eval_batch_size, s.device)
    for j in range(k):
        frontier = frontier.advance(lambda h, a, j=j: forward_layer(tgt, j, h, a, s.dtype), s.data, s.pad_id,
                                    s.cfg.eval_batch_size, s.device)
    save_frontier(s, k, frontier)
    return frontier


def save_frontier(s, k, frontier):
    """The frontier after k stages, with the sequences it holds (checked when a resume reads it)."""
    rundir.save_tensors(frontier_path(s, k), {"states": frontier.states,
                                              "members": torch.tensor(frontier.members, dtype=torch.long)})


def forward_layer(tgt, j, h, attn, dtype):
    """Target layer j (0-based) on a batch of the frontier, which is kept in float32 whatever the run's dtype."""
    h = h.to(dtype)
    return tgt.layer(j, h, tgt.context(h, attn))


def train_stage(s, tgt, recipe, head_t, source_head, k, frontier, rows):
    """Stage k: target layer k (and whatever its objective trains with it: the layer-wise projection) on the
    frontier."""
    final = k == s.n_target
    module = tgt.layers[k - 1]
    projection = None
    objective = recipe.objective(final)
    if objective is not None and (not final or recipe.final_layer_weight > 0):
        with torch.random.fork_rng():
            torch.manual_seed(s.cfg.seed + k)
            projection = objective.trainable(tgt.width, s.source_width)
    if projection is not None:
        projection.to(s.device, s.dtype)
        module = torch.nn.ModuleDict({"layer": module, "projection": projection})
    step = functools.partial(stage_step, tgt, recipe, head_t, source_head, k, final, frontier, projection,
                             s.dtype)
    with adapters(s, [tgt.layers[k - 1]], k):
        return fit(s, Job(f"stage_{k}", f"stage {k}/{s.n_target}", module, s.cfg.stage_steps, k, rows,
                          frontier.members, step))


# --- the step functions: (loss, parts) of one micro-batch ---------------------------------------------------------
def _inputs(b: Batch, x, head, norm, source_head, residual=None, projection=None):
    return objectives.Inputs(x=x, rows=b.rows, head=head, norm=norm, residual=residual,
                             counts=b.loss_mask.sum(1), labels=b.ids[:, 1:][b.loss_mask[:, :-1]],
                             source_head=source_head, projection=projection)


def stage_step(tgt, recipe, head, source_head, k, final, frontier, projection, dtype, b: Batch):
    """Frontier stage k (1-based): target layer k on the frontier of the batch, then the stage's objective."""
    h_in = frontier.batch(b.idx).to(b.ids.device, dtype)
    h_out = tgt.layer(k - 1, h_in, tgt.context(h_in, b.attn))
    objective = recipe.objective(final)
    residual = (h_out - h_in)[b.loss_mask] if objective is not None and objective.uses_residual else None
    inp = _inputs(b, tgt.norm(h_out[b.loss_mask]), head, tgt.norm, source_head, residual, projection)
    return recipe.stage_loss(inp, k, final, b.normalizer)


def whole_model_step(tgt, recipe, head, source_head, b: Batch):
    """The baselines that train every layer at once (output KD, fine-tuning): the output terms only."""
    h = tgt.hidden_states(b.ids, b.attn)[-1]
    inp = _inputs(b, tgt.norm(h[b.loss_mask]), head, tgt.norm, source_head)
    return recipe.stage_loss(inp, tgt.num_layers, True, b.normalizer)


def joint_step(tgt, recipe, head, source_head, layer_weight, steps, b: Batch):
    """The joint phase: every target layer, the last stage's objective plus w(t) times the exact layer objective
    of layers 1..L_t - 1, w falling linearly from layer_weight to 0 over the phase's steps."""
    states = tgt.hidden_states(b.ids, b.attn)
    n, objective = len(states) - 1, recipe.exact_layer

    def inputs(k):
        residual = (states[k] - states[k - 1])[b.loss_mask] if objective.uses_residual else None
        return _inputs(b, tgt.norm(states[k][b.loss_mask]), head, tgt.norm, source_head, residual)

    loss, parts = recipe.stage_loss(inputs(n), n, True, b.normalizer)
    weight = layer_weight * (1 - b.step / steps)
    if weight > 0 and n > 1:
        layers = sum(objective.loss(inputs(k), k) for k in range(1, n)) / float(b.normalizer)
        loss = loss + weight * layers
        parts["layers"] = float(layers.detach())
    parts["layer_weight"] = weight
    return loss, parts


@contextlib.contextmanager
def adapters(s, layers, seed_stage):
    """With lora_rank > 0: LoRA adapters on `layers` while the phase trains (before its checkpoint is loaded, so
    that a resume finds them), merged into the weights when it ends."""
    cfg = s.cfg
    if cfg.lora_rank == 0:
        yield
        return
    for j, layer in enumerate(layers):
        lora.attach(layer, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed * 1000003 + seed_stage + j)
    yield
    for layer in layers:
        lora.merge(layer)


def fit(s, job: Job):
    """The optimizer loop every phase shares: seeded global batches, each rank computing the sequences it owns,
    checkpoints every checkpoint_every steps (resumed from), metrics to TensorBoard and metrics.jsonl."""
    cfg, module, steps = s.cfg, job.module, job.steps
    lora.set_trainable(module)
    if s.ds_target is not None:
        gas = cfg.grad_accum_steps
        ds = engines.fill(s.ds_target, max(1, cfg.batch_size // (s.world * gas)), s.world, cfg.dtype,
                          cfg.grad_clip, cfg.lr, cfg.weight_decay, gas)
        stage = engines.DeepSpeedStage(module, cfg, ds)
    else:
        stage = engines.TorchStage(module, cfg)
    ckpt_dir = s.rd.path("stages", f"checkpoint-{job.tag}")
    meta = load_checkpoint(s, stage, ckpt_dir)
    start, history = (meta["step"], meta["history"]) if meta else (0, [])
    if meta and s.main:
        print(f"{job.desc}: resuming at step {start} of {steps}")
    s.monitor.resume(job.tag, start)  # steps logged after the checkpoint are logged again, not twice
    counts = s.data.loss_counts
    order = batch_order(len(s.data), cfg.batch_size, steps, cfg.seed, job.seed_stage)
    # the whole phase's token positions (global, every step, also those done before a resume): its compute
    lengths = s.data.lengths
    positions = sum(int(lengths[b].sum()) for b in order)
    loss_positions = sum(int(counts[b].sum()) for b in order)
    members = job.members
    owned = set(members)
    row_start = torch.zeros(len(s.data) + 1, dtype=torch.long)  # this rank's target rows per sequence
    local_counts = torch.zeros(len(s.data), dtype=torch.long)
    local_counts[members] = counts[members]
    row_start[1:] = local_counts.cumsum(0)
    bar = s.bar(range(start, steps), desc=job.desc, initial=start, total=steps)
    t0, tokens = time.time(), 0
    for step in bar:
        batch = order[step]
        total = int(counts[batch].sum())  # loss positions in the whole global batch
        lr = lr_at(cfg, step, steps, job.peak_lr)
        stage.set_lr(lr)
        loss, parts = 0.0, {}
        for micro in micro_batches([i for i in batch if i in owned], cfg.grad_accum_steps):
            # a rank that owns none of a micro-batch still runs the same graph (weighted 0): ZeRO-2 reduces
            # gradients in buckets as they become ready, which must happen in the same order on every rank
            weight = 1.0 if micro else 0.0
            idx = micro or members[:1]
            ids, attn, loss_mask = (t.to(s.device) for t in s.data.batch(idx, s.pad_id))
            rows = torch.cat([torch.arange(row_start[i], row_start[i + 1]) for i in idx])
            b = Batch(idx, ids, attn, loss_mask, {key: t[rows].to(s.device) for key, t in job.rows.items()}, total,
                      step)
            micro_loss, micro_parts = job.step(b)
            micro_loss = micro_loss * weight
            stage.backward(micro_loss * stage.scale)
            loss = loss + float(micro_loss.detach())
            for name, v in micro_parts.items():
                parts[name] = parts.get(name, 0.0) + v * weight
            tokens += int(loss_mask.sum()) if weight else 0
        grad_norm = stage.finish()
        names = sorted(parts)
        # the stop request travels with the step's report, so that every rank stops after the same step
        report = distributed.all_reduce_sum(torch.tensor([loss] + [parts[n] for n in names]
                                                         + [float(distributed.stop_requested())], dtype=torch.float64))
        stop, report = bool(report[-1] > 0), report[:-1]
        history.append(float(report[0]))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if step % cfg.log_every == 0 or step == steps - 1:
            s.monitor.log(job.tag, {"loss": history[-1], "grad_norm": grad_norm, "lr": lr,
                                    "tokens_per_s_rank0": tokens / (time.time() - t0),
                                    **{n: float(v) for n, v in zip(names, report[1:])},
                                    **summary.memory_scalars(s.device)}, step)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(s, stage, ckpt_dir, {"step": step + 1, "history": history})
        elif stop and step + 1 < steps:
            save_checkpoint(s, stage, ckpt_dir, {"step": step + 1, "history": history})
        if stop and step + 1 < steps:
            raise distributed.Preempted(f"{job.desc}: stopped on request after step {step + 1} of {steps}, "
                                        f"checkpoint saved in {ckpt_dir}; rerun the same command to resume")
        fault_point("stage_step", s.rank)
    stage.close()  # the optimizer's state: the module outlives the phase
    module.requires_grad_(False)
    distributed.barrier()
    if s.main and os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)
    elapsed = time.time() - t0
    return {"first_loss": history[0], "last_loss": history[-1],
            "mean_last_10": sum(history[-10:]) / len(history[-10:]), "steps": len(history),
            "seconds": elapsed, "loss_tokens_per_s_rank0": tokens / max(elapsed, 1e-9), "positions": positions,
            "loss_positions": loss_positions, "mean_len": positions / max(1, steps * cfg.batch_size)}


def fit_cost(s, tgt, metrics, recipe, kind, layers, final=True):
    """The budget (budget.cost) of a finished fit() that ran `layers` target layers forward and backward."""
    heads = recipe.step_heads(kind, final, s.vocab, tgt.width, s.source_width, layers, s.cfg.joint_layer_weight)
    return budget.cost(budget.shape(tgt.config, s.vocab), metrics["positions"], metrics["loss_positions"],
                       metrics["mean_len"], layers, layers, *heads, weight_grads=s.cfg.lora_rank == 0,
                       seconds=metrics["seconds"])


def micro_batches(indices, n):
    """This rank's sequences of a global batch in n consecutive micro-batches (some possibly empty): every rank
    runs n backward passes per optimizer step whatever it owns."""
    size = -(-len(indices) // n) if indices else 0
    return [indices[j * size:(j + 1) * size] for j in range(n)]


def lr_at(cfg, step, steps, peak=None):
    """The learning rate of optimizer step `step` (0-based) of a stage of `steps`: linear warm-up over
    warmup_steps, then constant, or linear or cosine decay to min_lr_ratio * peak at the stage's end (peak: lr, or
    the joint phase's joint_lr)."""
    peak = cfg.lr if peak is None else peak
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return peak
    t = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio * peak
    shape = 1 - t if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return floor + (peak - floor) * shape


# --- atomic checkpoints ----------------------------------------------------------------------------------------
def save_checkpoint(s, stage, folder, meta):
    """Write step meta["step"] whole on every rank, then move the pointer; keep the previous one until then."""
    tag = f"step-{meta['step']:08d}"
    os.makedirs(os.path.join(folder, tag), exist_ok=True)
    distributed.barrier()
    with rundir.writing(os.path.join(folder, tag)):
        stage.save(folder, tag)
    fault_point("checkpoint_saved", s.rank)  # every rank's files written, the pointer not yet moved
    distributed.barrier()
    pointer = os.path.join(folder, "latest.json")
    if s.main:
        old = rundir.read_json(pointer) if rundir.intact(pointer) else {}
        entry = {"tag": tag, "meta": meta, "files": rundir.folder_checksums(os.path.join(folder, tag))}
        rundir.write_json_checked(pointer, {"current": entry, "previous": old.get("current")})
        keep = {tag, (old.get("current") or {}).get("tag")}
        for name in os.listdir(folder):
            if name.startswith("step-") and name not in keep:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    distributed.barrier()


def load_checkpoint(s, stage, folder):
    """The meta of the newest complete, intact checkpoint, loaded into `stage`; None to start the stage over."""
    pointer = os.path.join(folder, "latest.json")
    if not os.path.isfile(pointer):
        return None
    try:
        entries = rundir.read_json_checked(pointer, "the checkpoint pointer")
    except rundir.DamagedFile as err:
        entries = {}
        if s.main:
            print(f"{err}; starting the stage over", flush=True)
    for which in ("current", "previous"):
        entry = entries.get(which)
        if not entry:
            continue
        where = os.path.join(folder, entry["tag"])
        if os.path.isdir(where) and rundir.folder_checksums(where) == entry["files"]:
            stage.load(folder, entry["tag"], s.device)
            return entry["meta"]
        if s.main:
            print(f"checkpoint {where} is incomplete or damaged; trying an older one", flush=True)
    if s.main:
        print(f"no intact checkpoint in {folder}: starting the stage over", flush=True)
    return None
