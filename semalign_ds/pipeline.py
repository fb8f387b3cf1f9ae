"""The SemAlign pipeline end to end, phase by phase, resumable, on one process or many.

Every phase writes its results into the run directory and then marks itself done in state.json; a rerun into the
same directory skips finished phases (and finished cache shards, stages and in-stage checkpoints), so a crash or a
kill loses only the work in flight. On several ranks the run directory must be on storage every rank sees; rank 0
writes the shared files, every rank writes its own cache shards and frontier. What the run directory holds:

    config.json          the validated config of the run
    state.json           finished phases (and per-stage metrics)
    data/                the tokenised transfer and evaluation sets
    plan.json            attribution scores, pairing strategy and pairs
    alignment.safetensors  the alignment map M (d_t x d_s)
    cache/               source activation cache: shards with checksums, manifest, the source LM head
    stages/              trained layer weights per stage, in-stage checkpoints
    frontier/            the frontier after the last finished stages, one file per rank
    target/              the exported target (Hugging Face format) with plan, config and metrics
    metrics.json, metrics.jsonl, tb/   per-stage metrics, a JSON-lines log and TensorBoard scalars
    report.json, report.md           NLL of source, target before and after, and the share of the gap closed

Distribution: the source runs under a DeepSpeed ZeRO-3 inference engine when there are several ranks or
ds_source_config is set; examples are split across ranks, and every rank issues the same number of forwards
(padding with repeated batches) because ZeRO-3 gathers parameters collectively. Each frontier stage trains under a
ZeRO-2 engine; sequence i belongs to rank i % world, which keeps its frontier and cache rows; a global batch is the
same whatever the world size, each rank computing the part it owns.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from semalign_ds import alignment, attribution, config as config_mod, data as data_mod, distributed, engines, \
    export, models, pairing, summary
from semalign_ds.cache import ActivationCache, batch_entries
from semalign_ds.config import Config, ConfigError
from semalign_ds.nll import batch_nll
from semalign_ds.data import index_batches
from semalign_ds.frontier import Frontier, objective, stage_loss
from semalign_ds.monitor import Monitor


class Run:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = cfg.output_dir
        if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.dtype = models.DTYPES[cfg.dtype]
        self.rank, self.world = distributed.rank(), distributed.world()
        self.main = self.rank == 0
        self.state = {"done": {}}
        self.monitor = Monitor(self.out, enabled=False)
        self.src_runner = None

    # --- bookkeeping ---------------------------------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def done(self, phase):
        return phase in self.state["done"]

    def mark(self, phase, info=None):
        """Record a finished phase (rank 0 writes; every rank keeps the same state)."""
        self.state["done"][phase] = info if info is not None else True
        if self.main:
            _atomic_json(self.path("state.json"), self.state)
        distributed.barrier()

    def bar(self, iterable, **kw):
        return tqdm(iterable, disable=not self.main, dynamic_ncols=True, **kw)

    def check_resume(self):
        """An existing run directory is resumed only when it holds a run of the same config."""
        saved = self.path("config.json")
        if not os.path.isfile(saved):
            return
        with open(saved) as f:
            old = config_mod.from_dict({**json.load(f), "output_dir": self.cfg.output_dir}, origin=saved)
        diff = self.cfg.differs(old)
        if diff:
            raise ConfigError(f"{self.out} holds a run with a different config ({', '.join(diff)} differ); "
                              f"use another --output-dir, or delete it to start over")
        with open(self.path("state.json")) as f:
            self.state = json.load(f)
        if self.main:
            print(f"resuming the run in {self.out}; done so far: {', '.join(self.state['done']) or 'nothing'}")

    def open_run_dir(self):
        if self.main:
            for folder in ("data", "stages", "frontier"):
                os.makedirs(self.path(folder), exist_ok=True)
            self.cfg.save(self.path("config.json"))
            _atomic_json(self.path("state.json"), self.state)
            for name, tokenized in (("transfer", self.data), ("eval", self.eval_data)):
                path = self.path("data", f"{name}.safetensors")
                if tokenized is not None and not os.path.isfile(path):
                    tokenized.save(path + ".tmp")
                    os.replace(path + ".tmp", path)
        distributed.barrier()
        self.monitor = Monitor(self.out, enabled=self.main)

    # --- phase 0: everything that can be checked before a model runs ---------------------------------------
    def prepare(self):
        cfg = self.cfg
        models.check_exists(cfg.source, "source", cfg.source_gguf_file)
        if cfg.target is not None:
            models.check_exists(cfg.target, "target", cfg.target_gguf_file)
        data_mod.check_data_path(cfg.data, "data")
        if cfg.eval_data:
            data_mod.check_data_path(cfg.eval_data, "eval_data")
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the world size {self.world}: each "
                              f"rank trains on batch_size / world sequences per step; use a multiple of "
                              f"{self.world} (e.g. --set batch_size={self.world * max(1, cfg.batch_size // self.world)})")
        self.use_zero_source = self.world > 1 or cfg.ds_source_config is not None
        self.use_zero_target = self.world > 1 or cfg.ds_target_config is not None
        self.ds_source = self.ds_target = None
        if self.use_zero_source:
            self.ds_source = engines.load_ds_config(cfg.ds_source_config or engines.default_config_path(
                "source_zero3"), "source")
        if self.use_zero_target:
            self.ds_target = engines.load_ds_config(cfg.ds_target_config or engines.default_config_path(
                "target_zero2"), "target")
        source_config = _config_of(cfg.source, cfg.source_gguf_file)
        n_source = source_config.num_hidden_layers
        n_target = (len(cfg.target_keep_layers) if cfg.target_keep_layers is not None
                    else _config_of(cfg.target, cfg.target_gguf_file).num_hidden_layers)
        if n_target > n_source:
            raise ConfigError(f"the target has more layers ({n_target}) than the source ({n_source}); SemAlign "
                              f"transfers from a larger source to a smaller target: swap them or prune the target")
        if cfg.target_keep_layers is not None and cfg.target_keep_layers[-1] >= n_source:
            raise ConfigError(f"target_keep_layers {cfg.target_keep_layers} names layer "
                              f"{cfg.target_keep_layers[-1]}, but the source has layers 0..{n_source - 1}")
        tok_spec = cfg.tokenizer or cfg.source
        self.tokenizer = models.load_tokenizer(tok_spec, None if cfg.tokenizer else cfg.source_gguf_file)
        if cfg.target is not None:
            tok_t = models.load_tokenizer(cfg.target, cfg.target_gguf_file)
            self.vocab = models.check_same_vocabulary(self.tokenizer, tok_t, tok_spec, cfg.target,
                                                      source_config.vocab_size,
                                                      _config_of(cfg.target, cfg.target_gguf_file).vocab_size)
        else:
            self.vocab = models.vocab_size(self.tokenizer)
        self.pad_id = data_mod.pad_id(self.tokenizer)
        self.n_source, self.n_target = n_source, n_target
        self.data = self._tokenized("transfer", cfg.data, cfg.max_examples, cfg.max_seq_len)
        if len(self.data) < self.world:
            raise ConfigError(f"{len(self.data)} usable transfer examples for {self.world} ranks: every rank needs "
                              f"at least one; use more data or fewer ranks")
        self.eval_data = (self._tokenized("eval", cfg.eval_data, cfg.eval_max_examples, cfg.eval_max_seq_len)
                          if cfg.eval_data else None)

    def _tokenized(self, name, spec, max_examples, max_seq_len):
        path = self.path("data", f"{name}.safetensors")
        if os.path.isfile(path):
            return data_mod.TokenizedSet.load(path)
        cfg = self.cfg
        rows = data_mod.read_rows(spec, cfg.prompt_field, cfg.response_field, cfg.data_split, cfg.seed)
        tokenized, dropped = data_mod.tokenize(rows, self.tokenizer, max_seq_len, cfg.loss_on, cfg.chat_template,
                                               max_examples, origin=spec)
        if self.main:
            print(f"{name} set {spec}: {len(tokenized)} sequences, {int(tokenized.offsets[-1])} tokens, "
                  f"{int(tokenized.loss.sum())} loss positions" +
                  (f" ({sum(dropped.values())} rows dropped: {dict(dropped)})" if dropped else ""))
        return tokenized

    # --- models --------------------------------------------------------------------------------------------
    def load_target(self):
        self.target = initial_target(self.cfg).to(self.device)
        self.tgt = models.Adapter(self.target)
        self.head_t = self.tgt.head.weight[:self.vocab]

    def load_source(self):
        cfg = self.cfg
        if self.use_zero_source:
            ds = engines.fill(self.ds_source, cfg.eval_batch_size, self.world, cfg.dtype)
            n_params = _parameter_count(cfg.source, cfg.source_gguf_file)
            engines.check_source_fits(ds, n_params, self.dtype.itemsize)
            self.source, self.src_runner = engines.sharded_source(cfg.source, cfg.source_gguf_file, cfg.dtype,
                                                                  cfg.seed, ds)
            held = engines.parameter_bytes_on_this_rank(self.source)
            self.monitor.log("memory", {"source_param_bytes_rank0": held,
                                        "source_param_fraction_rank0": held / (n_params * self.dtype.itemsize)}, 0)
            if self.main:
                print(f"source under ZeRO-3 on {self.world} ranks: {held / 2**20:.1f} MiB of parameters on rank 0 "
                      f"({100 * held / (n_params * self.dtype.itemsize):.0f}% of the model)")
        else:
            self.source = models.load_model(cfg.source, cfg.source_gguf_file, cfg.dtype, cfg.seed).to(self.device)
        self.src = models.Adapter(self.source)
        self.head_s = engines.whole(self.src.head.weight)[:self.vocab]

    def lockstep(self, indices, batch_size):
        """This rank's batches of `indices`, padded so that every rank runs as many ZeRO-3 forwards."""
        batches = [[indices[j] for j in b] for b in index_batches(len(indices), batch_size)]
        return distributed.lockstep(batches, collective=self.use_zero_source and self.world > 1)

    # --- phases --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, adapter, name, runner=None, head=None):
        """NLL of the evaluation responses, data-parallel over ranks."""
        mine = distributed.shard(len(self.eval_data))
        mine.sort(key=lambda i: -int(self.eval_data.lengths[i]))  # longest first: little padding per batch
        sums = torch.zeros(2, dtype=torch.float64)
        for idx, real in self.bar(self.lockstep(mine, self.cfg.eval_batch_size), desc=f"eval {name}", leave=False):
            ids, attn, loss = (t.to(self.device) for t in self.eval_data.batch(idx, self.pad_id))
            total, count = batch_nll(adapter, ids, attn, loss, head, runner)
            if real:
                sums += torch.tensor([total, count], dtype=torch.float64)
        total, count = distributed.all_reduce_sum(sums).tolist()
        return {"nll": total / count, "tokens": int(count)}

    def attribute(self):
        cfg = self.cfg
        n = len(self.data) if cfg.attribution_examples is None else min(cfg.attribution_examples, len(self.data))
        sums = torch.zeros(self.n_source + 1, dtype=torch.float64)  # scores per layer, and tokens
        t0 = time.time()
        for idx, real in self.bar(self.lockstep(distributed.shard(n), cfg.eval_batch_size), desc="attribution"):
            ids, attn, loss = (t.to(self.device) for t in self.data.batch(idx, self.pad_id))
            scores = attribution.batch_scores(self.src, ids, attn, loss, self.head_s, self.src_runner)
            if real:
                sums[:-1] += scores.sum(0).double().cpu()
                sums[-1] += int(attn.sum())
        distributed.all_reduce_sum(sums)
        seconds = time.time() - t0
        self.monitor.log("attribution", {"tokens_per_s": float(sums[-1]) / seconds, "seconds": seconds}, 0)
        return (sums[:-1] / n).tolist()

    def make_plan(self):
        cfg = self.cfg
        scores = self.attribute() if cfg.pairing == "attribution" else None
        if cfg.pairing == "attribution":
            pairs = pairing.attribution_pairs(scores, self.n_target, cfg.pairing_lambda)
        else:
            pairs = pairing.uniform_pairs(self.n_source, self.n_target)
        plan = {"strategy": cfg.pairing, "lambda": cfg.pairing_lambda, "source_layers": self.n_source,
                "target_layers": self.n_target, "scores": scores, "pairs": pairs}
        if self.main:
            _atomic_json(self.path("plan.json"), plan)
        return plan

    def alignment_map(self):
        path = self.path("alignment.safetensors")
        if not os.path.isfile(path) and self.main:
            dtype = torch.float64 if self.cfg.basis_dtype == "float64" else torch.float32
            m = alignment.alignment_map(self.head_t.detach(), self.head_s, dtype)
            save_file({"M": m.cpu().contiguous()}, path + ".tmp")
            os.replace(path + ".tmp", path)
        distributed.barrier()
        return load_file(path)["M"].to(self.device)

    def cache(self, plan, m):
        cfg = self.cfg
        store = ActivationCache(self.path("cache"), len(self.data), cfg.cache_shard_examples)
        source_states = cfg.method == "layerwise"  # the layer-wise baseline trains on the unaligned states
        header = {"source": cfg.source, "target": cfg.target or f"prune:{cfg.target_keep_layers}",
                  "pairs": plan["pairs"], "vocab": self.vocab, "data_tokens": int(self.data.offsets[-1]),
                  "tokenizer": type(self.tokenizer).__name__ + f":{len(self.tokenizer)}",
                  "normalize_source": cfg.normalize_source, "dtype": cfg.dtype,
                  "source_states": source_states}
        if self.main:
            store.open(header)
            head_path = self.path("cache", "source_head.safetensors")
            if not os.path.isfile(head_path):
                save_file({"weight": self.head_s.float().cpu().contiguous()}, head_path)
        distributed.barrier()
        store.open(header)  # every rank checks the manifest
        todo = store.pending(recompute_corrupt=cfg.recompute_corrupt and self.main)
        distributed.barrier()
        todo = distributed.broadcast_object(todo)
        mine = todo[self.rank::self.world]
        # every rank runs the same number of forwards: the largest share of shards, in batches
        jobs = [(i, b) for i in mine for b in index_batches(len(range(*store.shard_range(i))), cfg.eval_batch_size)]
        n_jobs = max(distributed.all_gather_object(len(jobs)))
        t0, tokens, parts = time.time(), 0, {}
        for j in self.bar(range(n_jobs), desc="activation cache"):
            real = j < len(jobs)
            shard, local = jobs[j] if real else jobs[0] if jobs else (0, [0])
            start = store.shard_range(shard)[0]
            idx = [start + x for x in local]
            ids, attn, loss = (t.to(self.device) for t in self.data.batch(idx, self.pad_id))
            with torch.no_grad():
                out = batch_entries(self.src, ids, attn, loss, plan["pairs"], m, cfg.normalize_source,
                                    self.src_runner, source_states)
            if not real:
                continue
            tokens += int(attn.sum())
            parts.setdefault(shard, []).append({k: v.cpu() for k, v in out.items()})
            if j + 1 == len(jobs) or jobs[j + 1][0] != shard:  # the shard is complete
                store.write(shard, {k: torch.cat([p[k] for p in parts[shard]]) for k in parts[shard][0]})
                del parts[shard]
                fault_point("cache_shard", self.rank)
        seconds = time.time() - t0
        total = float(distributed.all_reduce_sum(torch.tensor([tokens], dtype=torch.float64))[0])
        self.monitor.log("cache", {"tokens_per_s_rank0": tokens / max(seconds, 1e-9),
                                   "tokens_per_s_total": total / max(seconds, 1e-9), "seconds": seconds,
                                   **summary.memory_scalars(self.device)}, 0)
        distributed.barrier()
        if self.main:
            store.write_manifest_summary()
        distributed.barrier()

    # --- frontier training ---------------------------------------------------------------------------------
    def owned(self):
        """Sequences this rank trains on and keeps the frontier of."""
        return distributed.shard(len(self.data))

    def train(self):
        """Frontier training, stage by stage (or the output-KD baseline); returns per-stage metrics."""
        cfg = self.cfg
        store = ActivationCache(self.path("cache"), len(self.data), cfg.cache_shard_examples)
        mine = self.owned()
        rows = _rows_of(mine, self.data.loss_counts)  # cache rows of this rank's sequences, in order

        def targets(k, final):
            if cfg.method == "output_kd":
                out = {}
            elif cfg.method == "layerwise":
                out = {"source": store.load(f"source.{k}")[rows]}
            else:
                out = {"aligned": store.load(f"aligned.{k}")[rows]}
            if final:
                out["source_final"] = store.load("source_final")[rows]
                out["source_head"] = load_file(self.path("cache", "source_head.safetensors"))["weight"].to(
                    self.device, self.dtype)
            return out

        metrics = self.state.get("stage_metrics", {})
        if cfg.method == "output_kd":
            if not self.done("stage_output_kd"):
                metrics["output_kd"] = self._train_output_kd(targets(self.n_target, True), mine)
                self._save_trained(self.tgt.layers, self.path("stages", "layers.safetensors"))
                self.state["stage_metrics"] = metrics
                self.mark("stage_output_kd", metrics["output_kd"])
            self.tgt.layers.load_state_dict(load_file(self.path("stages", "layers.safetensors")))
            return metrics
        frontier = None
        for k in range(1, self.n_target + 1):
            layer = self.tgt.layers[k - 1]
            weights_path = self.path("stages", f"layer-{k}.safetensors")
            if self.done(f"stage_{k}"):
                layer.load_state_dict(load_file(weights_path))
                continue
            if frontier is None:
                frontier = self._frontier(k - 1, mine)
            metrics[str(k)] = self._train_stage(k, frontier, targets(k, k == self.n_target))
            self._save_trained(layer, weights_path)
            frontier = frontier.advance(lambda h, a: self.tgt.layer(k - 1, h, self.tgt.context(h, a)), self.data,
                                        self.pad_id, cfg.eval_batch_size, self.device, show=self.main)
            save_file({"states": frontier.states}, self._frontier_path(k))
            self.state["stage_metrics"] = metrics
            self.mark(f"stage_{k}", metrics[str(k)])
            for old in range(k - 1):  # the last two frontiers stay: a crash between writes loses nothing
                if os.path.exists(self._frontier_path(old)):
                    os.remove(self._frontier_path(old))
        return metrics

    def _save_trained(self, module, path):
        if self.main:
            save_file({n: p.detach().cpu().contiguous() for n, p in module.state_dict().items()}, path + ".tmp")
            os.replace(path + ".tmp", path)

    def _frontier_path(self, k):
        return self.path("frontier", f"frontier-{k}.rank{self.rank}of{self.world}.safetensors")

    def _frontier(self, k, mine):
        """The frontier of this rank's sequences after k finished stages: from disk, or recomputed from the
        embeddings through the k trained layers (after a change of world size, say)."""
        path = self._frontier_path(k)
        if os.path.isfile(path):
            return Frontier(load_file(path)["states"], self.data.offsets, mine)
        frontier = Frontier.of_embeddings(self.tgt, self.data, mine, self.pad_id, self.cfg.eval_batch_size,
                                          self.device)
        for j in range(k):
            frontier = frontier.advance(lambda h, a, j=j: self.tgt.layer(j, h, self.tgt.context(h, a)), self.data,
                                        self.pad_id, self.cfg.eval_batch_size, self.device)
        save_file({"states": frontier.states}, path)
        return frontier

    def _train_stage(self, k, frontier, targets):
        """Stage k: target layer k (and, for the layer-wise baseline, its projection) on the frontier."""
        cfg = self.cfg
        layer = self.tgt.layers[k - 1]
        module = layer
        projection = None
        if cfg.method == "layerwise" and (k < self.n_target or cfg.fisher_weight > 0):
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed + k)
                projection = torch.nn.Linear(self.tgt.width, targets["source"].shape[1], bias=False)
            projection.to(self.device, self.dtype)
            module = torch.nn.ModuleDict({"layer": layer, "projection": projection})

        def batch_loss(idx, ids, attn, loss_mask, batch_targets, normalizer):
            h_in = frontier.batch(idx).to(self.device, self.dtype)
            return stage_loss(self.tgt, k, self.n_target, h_in, attn, loss_mask, batch_targets, self.head_t, cfg,
                              ids, normalizer, projection)

        return self._fit(f"stage_{k}", f"stage {k}/{self.n_target}", module, cfg.stage_steps, k, targets,
                         frontier.members, batch_loss)

    def _train_output_kd(self, targets, mine):
        """The output-KD baseline: every target layer trainable at once, KL at the output only, with the same
        number of optimizer steps as all frontier stages together."""
        cfg = self.cfg

        def batch_loss(idx, ids, attn, loss_mask, batch_targets, normalizer):
            h = self.tgt.hidden_states(ids, attn)[-1]
            x = self.tgt.norm(h[loss_mask])
            return objective(x, batch_targets, True, self.tgt.norm, self.head_t, cfg,
                             ids[:, 1:][loss_mask[:, :-1]], normalizer)

        return self._fit("output_kd", "output KD", self.tgt.layers, cfg.stage_steps * self.n_target, 0, targets,
                         mine, batch_loss)

    def _fit(self, tag, desc, module, steps, seed_stage, targets, members, batch_loss):
        """The optimizer loop shared by every stage: seeded global batches, each rank computing the sequences it
        owns, checkpoints every checkpoint_every steps (resumed from), metrics to TensorBoard and metrics.jsonl."""
        cfg = self.cfg
        module.requires_grad_(True)
        if self.use_zero_target:
            ds = engines.fill(self.ds_target, cfg.batch_size // self.world, self.world, cfg.dtype, cfg.grad_clip)
            stage = engines.DeepSpeedStage(module, cfg, ds)
        else:
            stage = engines.TorchStage(module, cfg)
        ckpt_dir = self.path("stages", f"checkpoint-{tag}")
        meta = stage.load(ckpt_dir, self.device) if os.path.isdir(ckpt_dir) else None
        start, history = (meta["step"], meta["history"]) if meta else (0, [])
        if meta and self.main:
            print(f"{desc}: resuming at step {start} of {steps}")
        counts = self.data.loss_counts
        order = batch_order(len(self.data), cfg.batch_size, steps, cfg.seed, seed_stage)
        owned = set(members)
        row_start = torch.zeros(len(self.data) + 1, dtype=torch.long)  # this rank's cache rows per sequence
        local_counts = torch.zeros(len(self.data), dtype=torch.long)
        local_counts[members] = counts[members]
        row_start[1:] = local_counts.cumsum(0)
        bar = self.bar(range(start, steps), desc=desc, initial=start, total=steps)
        t0, tokens = time.time(), 0
        for step in bar:
            batch = order[step]
            idx = [i for i in batch if i in owned]
            total = int(counts[batch].sum())  # loss positions in the whole global batch
            # a rank that owns none of this batch still runs the same graph (weighted 0): ZeRO-2 reduces
            # gradients in buckets as they become ready, which must happen in the same order on every rank
            weight = 1.0 if idx else 0.0
            idx = idx or members[:1]
            ids, attn, loss_mask = (t.to(self.device) for t in self.data.batch(idx, self.pad_id))
            rows = torch.cat([torch.arange(row_start[i], row_start[i + 1]) for i in idx])
            batch_targets = {name: t if name == "source_head" else t[rows].to(self.device)
                             for name, t in targets.items()}
            loss, parts = batch_loss(idx, ids, attn, loss_mask, batch_targets, total)
            loss, parts = loss * weight, {name: v * weight for name, v in parts.items()}
            tokens += int(loss_mask.sum()) if weight else 0
            # DeepSpeed averages gradients over ranks; the global mean needs their sum
            grad_norm = stage.step(loss * self.world if self.use_zero_target else loss)
            names = sorted(parts)
            report = distributed.all_reduce_sum(torch.tensor([float(loss.detach())] + [parts[n] for n in names],
                                                             dtype=torch.float64))
            history.append(float(report[0]))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if step % cfg.log_every == 0 or step == steps - 1:
                self.monitor.log(tag, {"loss": history[-1], "grad_norm": grad_norm, "lr": cfg.lr,
                                       "tokens_per_s_rank0": tokens / (time.time() - t0),
                                       **{n: float(v) for n, v in zip(names, report[1:])},
                                       **summary.memory_scalars(self.device)}, step)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                stage.save(ckpt_dir, {"step": step + 1, "history": history})
            fault_point("stage_step", self.rank)
        module.requires_grad_(False)
        distributed.barrier()
        if self.main and os.path.isdir(ckpt_dir):
            shutil.rmtree(ckpt_dir)
        elapsed = time.time() - t0
        return {"first_loss": history[0], "last_loss": history[-1],
                "mean_last_10": sum(history[-10:]) / len(history[-10:]), "steps": len(history),
                "seconds": elapsed, "loss_tokens_per_s_rank0": tokens / max(elapsed, 1e-9)}

    # --- export and report ---------------------------------------------------------------------------------
    def export(self, plan, metrics):
        if self.main:
            export.save_hf(self.target, self.tokenizer, self.path("target"),
                           {"semalign_plan.json": plan, "semalign_metrics.json": metrics,
                            "semalign_config.json": self.cfg.to_dict()})
        distributed.barrier()


def initial_target(cfg):
    """The target as training starts: loaded (a random-init one seeded with seed + 1, so that it differs from a
    random-init source), or pruned from a fresh, unsharded copy of the source."""
    if cfg.target_keep_layers is None:
        return models.load_model(cfg.target, cfg.target_gguf_file, cfg.dtype, cfg.seed + 1)
    source = models.load_model(cfg.source, cfg.source_gguf_file, cfg.dtype, cfg.seed)
    return models.prune_layers(source, cfg.target_keep_layers)


_FAULT_COUNTS = {}


def fault_point(name, rank):
    """Resume tests kill a run here: SEMALIGN_DS_FAULT="NAME:N[:RANK]" sends SIGKILL to this process the N-th time
    it passes point NAME (on rank RANK, default every rank)."""
    spec = os.environ.get("SEMALIGN_DS_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != name or (len(parts) > 2 and int(parts[2]) != rank):
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(parts[1]):
        os.kill(os.getpid(), signal.SIGKILL)


def run(cfg: Config, local_rank=None):
    """The whole pipeline; returns the report (or None without evaluation data)."""
    distributed.init(local_rank, timeout_minutes=cfg.collective_timeout_minutes)
    try:
        return _run(cfg)
    finally:
        distributed.shutdown()


def _run(cfg):
    torch.manual_seed(cfg.seed)
    # far-tail softmax probabilities times small differences are denormal floats, several times slower on CPUs
    torch.set_flush_denormal(True)
    r = Run(cfg)
    r.check_resume()
    r.prepare()  # before anything is written or any model runs: bad input fails here
    r.open_run_dir()
    if r.main:
        print("config:\n" + str(cfg), flush=True)
    t_start = time.time()
    r.load_target()
    needs_source = not all(r.done(p) for p in ("eval_before", "plan", "cache"))
    if needs_source:
        r.load_source()
    report = dict(r.state["done"].get("eval_before") or {})
    if r.eval_data is not None and not r.done("eval_before"):
        report = {"source": r.evaluate(r.src, "source", r.src_runner, r.head_s),
                  "target_before": r.evaluate(r.tgt, "target before", head=r.head_t)}
        r.mark("eval_before", report)
        r.monitor.print(f"NLL source {report['source']['nll']:.3f}, target before "
                        f"{report['target_before']['nll']:.3f} nats/token")
    if not r.done("plan"):
        r.make_plan()
        distributed.barrier()
        r.mark("plan")
    with open(r.path("plan.json")) as f:
        plan = json.load(f)
    r.monitor.print(f"pairing ({plan['strategy']}): target layer k <- source layer {plan['pairs']}")
    if not r.done("cache"):
        r.cache(plan, r.alignment_map())
        r.mark("cache")
    if needs_source:
        del r.source, r.src, r.src_runner
    metrics = r.train()
    if r.main:
        _atomic_json(r.path("metrics.json"), {"stages": metrics, "plan": plan})
    if not r.done("export"):
        r.export(plan, metrics)
        r.mark("export")
    if r.eval_data is not None:
        if not r.done("eval_after"):
            r.mark("eval_after", r.evaluate(r.tgt, "target after", head=r.head_t))
        report["target_after"] = r.state["done"]["eval_after"]
        report = finish_report(report)
        if r.main:
            _atomic_json(r.path("report.json"), report)
            with open(r.path("report.md"), "w") as f:
                f.write(report_markdown(report, cfg))
        r.monitor.print(report_markdown(report, cfg))
    if r.main:
        print(summary.summarize(r.out), flush=True)
    r.monitor.print(f"done in {time.time() - t_start:.0f} s; exported target: {r.path('target')}")
    r.monitor.close()
    return report or None


def finish_report(report):
    s, b, a = (report[k]["nll"] for k in ("source", "target_before", "target_after"))
    report["gap_closed"] = (b - a) / (b - s) if b != s else float("nan")
    return report


def report_markdown(report, cfg):
    rows = [("source", report["source"]), ("target before", report["target_before"]),
            ("target after", report["target_after"])]
    lines = [f"NLL of {cfg.eval_data} responses ({report['source']['tokens']} tokens), nats/token", "",
             "| model | NLL |", "|---|---|"]
    lines += [f"| {name} | {r['nll']:.3f} |" for name, r in rows]
    lines += ["", f"share of the source-target gap closed: {100 * report['gap_closed']:.1f}%", ""]
    return "\n".join(lines)


def batch_order(n, batch_size, steps, seed, stage):
    """Sequence indices of every step of a stage, the same whatever the world size: seeded epochs of random
    permutations, resumable at any step."""
    gen = torch.Generator().manual_seed(seed * 1000003 + stage)
    stream = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(n, generator=gen).tolist()
    return [stream[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def _rows_of(sequences, counts):
    """Cache rows (loss positions in example order) of the given sequences."""
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    if not sequences:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(starts[i], starts[i + 1]) for i in sequences])


def _config_of(spec, gguf_file):
    from transformers import AutoConfig
    path, gguf_file = models.resolve(spec, gguf_file)
    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not read the model config of {spec!r}: {err}") from err


def _parameter_count(spec, gguf_file):
    """Parameters of a model from its config alone (built on the meta device: nothing allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(_config_of(spec, gguf_file))
    return sum(p.numel() for p in model.parameters())


def _atomic_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)
