"""The source activation cache (docs/method.md, section 4).

Per loss position, in example order: the aligned targets a^(k) = M u^(l(k)) for every target layer k ("aligned.k",
target width) and the source's final normed state n_s(h^(L_s)) ("source_final", source width) for the output KL.

Layout: shard i holds examples [i * E, (i + 1) * E) (E = shard_examples) in shard-0000i.safetensors, with a sidecar
shard-0000i.json (token count, sha256) written after the file is complete. A shard whose sidecar is present and
whose checksum matches is never recomputed, so a killed run resumes where it stopped, and the shard layout does not
depend on how many ranks wrote it. manifest.json says what the cache was made from (model weight fingerprints, the
alignment map's and the tokenised data's checksums, the seed, the pairs); a cache made from anything else is
refused instead of being reused. Every shard is verified against its checksum before training reads it, and each
rank reads only the rows of its own sequences, shard by shard.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from semalign_ds import distributed, models, objectives, pruning, rundir, summary, vocab_parallel
from semalign_ds.alignment import align, source_direction
from semalign_ds.config import ConfigError
from semalign_ds.data import cheapest_batches, deal
from semalign_ds.faults import fault_point
from semalign_ds.losses import fisher_topk_support


class CacheMismatch(ConfigError):
    pass


class CorruptShard(RuntimeError):
    pass


def batch_entries(adapter_s, ids, attn, loss_mask, pairs, m, normalize=True, runner=None, source_states=False,
                  topk=None, aligned_input=False):
    """{"aligned.k": [n, d_t] for k = 1..L_t, "source_final": [n, d_s]} for the loss positions of one batch; with
    source_states, also the unit source states "source.k" [n, d_s] themselves (for the layer-wise baseline); with
    aligned_input, also "aligned.0" = M u^(0), the aligned embeddings, so that every target layer k has the aligned
    source residual of its pair span, a^(k) - a^(k-1) (the residual-geometry objective).

    topk = (k, temperature, target final norm, target head, dtype): also, for every layer stage (k < L_t), the
    top-k support of p* = softmax(W_t n_t(a) / tau) that the top-k Fisher loss trains on: "topk_ids.k" int32
    [n, k], "topk_z.k" float32 [n, k] (z* = W_t n_t(a)) and "topk_tail.k" float32 [n] (the mass outside)."""
    layers = [0] + list(pairs) if aligned_input else list(pairs)
    wanted = set(layers) | {len(adapter_s.layers)}
    # states[l] = h^(l) at the loss positions, for the layers wanted only
    states = adapter_s.hidden_states(ids, attn, runner=runner,
                                     keep=lambda l, h: h[loss_mask] if l in wanted else None)
    norm = adapter_s.norm if normalize else None
    out = {}
    for k, l in enumerate(layers, start=0 if aligned_input else 1):
        u = source_direction(states[l], norm)
        out[f"aligned.{k}"] = align(m, u)
        if source_states and k > 0:
            out[f"source.{k}"] = u
        if topk is not None and 0 < k < len(pairs):
            size, tau, norm_t, head_t, dtype = topk
            y = norm_t(out[f"aligned.{k}"].to(dtype))  # as the exact loss forms its target
            out[f"topk_ids.{k}"], out[f"topk_z.{k}"], out[f"topk_tail.{k}"] = fisher_topk_support(y, head_t, size,
                                                                                                   tau)
    out["source_final"] = adapter_s.norm(states[-1]).float()
    return out


class ActivationCache:
    def __init__(self, folder, n_examples, shard_examples):
        self.folder, self.n_examples, self.shard_examples = folder, n_examples, shard_examples
        self.n_shards = -(-n_examples // shard_examples)

    def shard_range(self, i):
        return i * self.shard_examples, min((i + 1) * self.shard_examples, self.n_examples)

    def _paths(self, i):
        stem = os.path.join(self.folder, f"shard-{i:05d}")
        return stem + ".safetensors", stem + ".json"

    # --- the manifest ------------------------------------------------------------------------------------------
    def open(self, header: dict):
        """Start or reuse the cache in `folder` for `header` (what it is made from); refuse a different one."""
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, "manifest.json")
        header = dict(header, n_examples=self.n_examples, shard_examples=self.shard_examples)
        if os.path.isfile(path):
            try:
                old = rundir.read_json_checked(path, "the cache manifest")
            except rundir.DamagedFile as err:  # what the shards were made from is unknown: make them again
                print(f"{err}: starting the cache over", flush=True)
                for name in os.listdir(self.folder):
                    if name.startswith("shard-"):
                        os.remove(os.path.join(self.folder, name))
                rundir.write_json_checked(path, header)
                return self
            summary = ("shards", "tokens")  # written once the cache is complete
            diff = sorted(k for k in (set(old) | set(header)) - set(summary) if old.get(k) != header.get(k))
            if diff:
                raise CacheMismatch(f"the activation cache in {self.folder} was made for other inputs (differs "
                                    f"in: {', '.join(diff)}); delete that folder or use a new output_dir")
        else:
            rundir.write_json_checked(path, header)
        return self

    def write_manifest_summary(self):
        """The manifest, completed with each shard's entry, once every shard is written."""
        path = os.path.join(self.folder, "manifest.json")
        manifest = rundir.read_json_checked(path, "the cache manifest")
        manifest["shards"] = [self.entry(i) for i in range(self.n_shards)]
        manifest["tokens"] = sum(e["tokens"] for e in manifest["shards"])
        rundir.write_json_checked(path, manifest)
        return manifest

    # --- shards --------------------------------------------------------------------------------------------
    def entry(self, i):
        _, side = self._paths(i)
        if not os.path.isfile(side):
            return None
        try:
            with open(side) as f:
                entry = json.load(f)
        except (ValueError, UnicodeDecodeError):  # a damaged sidecar: the shard is written again
            return None
        return entry if isinstance(entry, dict) and "sha256" in entry else None

    def is_complete(self, i, verify=True):
        data, _ = self._paths(i)
        entry = self.entry(i)
        if entry is None or not os.path.isfile(data):
            return False
        if verify and rundir.sha256(data) != entry["sha256"]:
            raise CorruptShard(f"cache shard {data} fails its checksum (file damaged or changed)")
        return True

    def pending(self, verify=True, recompute_corrupt=False):
        """Shards still to write; with recompute_corrupt, damaged shards are removed (and the log says so) and
        listed too; without it, a damaged shard raises CorruptShard."""
        todo = []
        for i in range(self.n_shards):
            try:
                done = self.is_complete(i, verify)
            except CorruptShard:
                if not recompute_corrupt:
                    raise
                print(f"cache shard {self._paths(i)[0]} is damaged: recomputing it", flush=True)
                for p in self._paths(i):
                    if os.path.exists(p):
                        os.remove(p)
                done = False
            if not done:
                todo.append(i)
        return todo

    def write(self, i, tensors: dict):
        data, side = self._paths(i)
        tmp = data + ".tmp"
        with rundir.writing(data):
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            rundir.commit(tmp, data)
        tokens = int(tensors["source_final"].shape[0])
        rundir.write_json(side, {"file": os.path.basename(data), "examples": list(self.shard_range(i)),
                            "tokens": tokens, "sha256": rundir.sha256(data),
                            "shapes": {k: list(v.shape) for k, v in tensors.items()},
                            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()}})

    def damaged(self):
        """Messages for the shards that are missing or fail their checksums (removed, so they are recomputed)."""
        problems = []
        for i in range(self.n_shards):
            try:
                if not self.is_complete(i):
                    problems.append(f"cache shard {self._paths(i)[0]} is missing")
            except CorruptShard as err:
                problems.append(str(err))
                for p in self._paths(i):
                    if os.path.exists(p):
                        os.remove(p)
        return problems

    def head_path(self):
        return os.path.join(self.folder, "source_head.safetensors")

    def rows(self, key, sequences, counts):
        """Rows of `key` for the given sequences (increasing example indices), in that order; read shard by
        shard, each sequence's rows as one slice: a rank never loads rows it does not own."""
        starts = torch.zeros(len(counts) + 1, dtype=torch.long)
        starts[1:] = counts.cumsum(0)
        parts, wanted = [], sorted(sequences)
        for i in range(self.n_shards):
            first, last = self.shard_range(i)
            mine = [j for j in wanted if first <= j < last]
            if not mine:
                continue
            with safe_open(self._paths(i)[0], framework="pt") as f:
                sliced = f.get_slice(key)
                for j in mine:
                    a, b = int(starts[j] - starts[first]), int(starts[j + 1] - starts[first])
                    parts.append(sliced[a:b])
        if not parts:
            with safe_open(self._paths(0)[0], framework="pt") as f:
                return f.get_slice(key)[0:0]
        return torch.cat(parts)


def contents(cfg):
    """What a run's cache holds besides the aligned states, as its objectives ask (objectives.cache_contents): runs
    whose configs give the same contents (and agree on the source, data and alignment) have identical caches."""
    return objectives.cache_contents(cfg)


def write_source_head(s, head_s):
    """cache/source_head.safetensors (the output KL's W_s) from every rank's vocab_parallel.Rows of the source head,
    unless it is there and intact. Collective; the pipeline calls it once the rest of the source is released, when
    a rank holds least, because rank 0 holds the head whole while it writes it."""
    path = ActivationCache(s.rd.path("cache"), len(s.data), s.cfg.cache_shard_examples).head_path()
    if distributed.broadcast_object(s.main and not rundir.intact(path)):
        weight = vocab_parallel.whole(head_s)
        if s.main:
            rundir.save_tensors(path, {"weight": weight.float()})
    distributed.barrier()


def phase(s, src, runner, plan, m, tgt=None, head_t=None):
    """Run the source over the transfer set once and write the cache's shards (the source head: write_source_head);
    shards already written and intact are kept. Every rank writes its own shards (data.deal by their cost); where
    its forwards need no other rank (engines.forwards_apart) it runs them at its own pace and ranks agree on a stop
    at the end, else every rank issues the same number of forwards (ZeRO-3 gathers collectively) and they agree on a
    stop after each."""
    import contextlib

    from semalign_ds import engines
    cfg = s.cfg
    store = ActivationCache(s.rd.path("cache"), len(s.data), cfg.cache_shard_examples)
    kinds = contents(cfg)
    source_states = kinds["source_states"]
    shape = pruning.Shape.of(cfg)
    cut = f"prune:{dataclasses.asdict(shape)}" if shape.needs_calibration else f"prune:{cfg.target_keep_layers}"
    header = {"source": cfg.source, "target": cfg.target or cut,
              "source_weights": models.fingerprint(cfg.source, cfg.source_gguf_file, cfg.seed),
              "target_weights": (models.fingerprint(cfg.target, cfg.target_gguf_file, cfg.seed + 1)
                                 if cfg.target else "pruned from the source"),
              "seed": cfg.seed, "pairs": plan["pairs"], "vocab": s.vocab,
              "alignment_sha256": rundir.sha256(s.rd.path("alignment.safetensors")),
              "data_sha256": rundir.sha256(s.rd.path("data", "transfer.safetensors")),
              "tokenizer": type(s.tokenizer).__name__ + f":{len(s.tokenizer)}",
              "normalize_source": cfg.normalize_source, "dtype": cfg.dtype, "source_states": source_states}
    topk = None
    if kinds["topk"]:
        header.update(fisher_topk=cfg.fisher_topk, temperature=cfg.temperature)
        topk = (cfg.fisher_topk, cfg.temperature, tgt.norm, head_t.detach(), s.dtype)
    aligned_input = kinds["aligned_input"]
    if aligned_input:  # only then: the manifest of every other run stays as it was
        header["aligned_input"] = True
    if s.main:
        store.open(header)
    distributed.barrier()
    store.open(header)  # every rank checks the manifest
    todo = store.pending(recompute_corrupt=s.main) if s.main else None
    todo = distributed.broadcast_object(todo)
    # every pending shard cut into its cheapest batches (the same whatever the world), the shards dealt to the
    # ranks by what those cost: at 1.5B on 2 ranks (32 examples, shards of 8, batches of 8), consecutive batches
    # and every other shard gave rank 0 56% of the tokens and cost 1.25x an even split
    lengths, loss_counts = s.data.lengths, s.data.loss_counts  # both computed over the whole set: once
    cut = {i: cheapest_batches(range(*store.shard_range(i)), lengths, cfg.eval_batch_size) for i in todo}
    mine = [todo[j] for j in deal([cut[i][0] for i in todo], s.world)[s.rank]]
    batches = [(i, b) for i in mine for b in cut[i][1]]
    apart = engines.forwards_apart(runner)
    shortest = [int(lengths.argmin())] if len(lengths) else [0]
    jobs = distributed.lockstep(batches, collective=s.world > 1 and not apart, filler=(None, shortest))
    t0, tokens = time.time(), 0
    rows, filled, stopped = None, 0, False  # the shard being written: its rows per key, allocated once; how many
    with engines.ranks_apart() if apart and runner is not None else contextlib.nullcontext():
        for j, ((shard, idx), real) in enumerate(s.bar(jobs, desc="activation cache")):
            if apart and distributed.stop_requested():  # SIGUSR1: this rank stops here, the ranks agree below
                stopped = True
                break
            ids, attn, loss = (t.to(s.device) for t in s.data.batch(idx, s.pad_id))
            with torch.no_grad():
                out = batch_entries(src, ids, attn, loss, plan["pairs"], m, cfg.normalize_source, runner,
                                    source_states, topk, aligned_input)
            if not apart and distributed.stop_agreed():  # SIGUSR1: every rank stops after the same batch
                stopped = True
                break
            if not real:
                continue
            tokens += int(attn.sum())
            lo, hi = store.shard_range(shard)
            if rows is None:  # a new shard (its batches are consecutive): its row count is known, so fill in place
                counts = loss_counts[lo:hi]
                first = torch.cumsum(counts, 0) - counts  # each example's first row in the shard
                rows = {k: torch.empty((int(counts.sum()), *v.shape[1:]), dtype=v.dtype) for k, v in out.items()}
            # a batch's rows are its examples' loss positions, example by example in the batch's order
            dest = torch.cat([torch.arange(int(first[i - lo]), int(first[i - lo] + counts[i - lo])) for i in idx])
            if len(dest) != len(out["source_final"]):
                raise RuntimeError(f"activation cache: a batch of shard {shard} gave {len(out['source_final'])} "
                                   f"rows, its examples have {len(dest)} loss positions")
            for k, v in out.items():
                rows[k][dest] = v
            filled += len(dest)
            if j + 1 == len(batches) or batches[j + 1][0] != shard:  # the shard is complete
                if filled != len(rows["source_final"]):
                    raise RuntimeError(f"activation cache: shard {shard} got {filled} rows, its examples have "
                                       f"{len(rows['source_final'])} loss positions")
                store.write(shard, rows)
                rows, filled = None, 0
                summary.release_memory()
                fault_point("cache_shard", s.rank)
    if distributed.all_reduce_sum(torch.tensor([float(stopped)]))[0] > 0:  # once, every rank: any rank stopped
        raise distributed.Preempted("activation cache: stopped on request, the shards written so far are kept; "
                                    "rerun the same command to resume")
    seconds = time.time() - t0
    total = float(distributed.all_reduce_sum(torch.tensor([tokens], dtype=torch.float64))[0])
    s.monitor.log("cache", {"tokens_per_s_rank0": tokens / max(seconds, 1e-9),
                            "tokens_per_s_total": total / max(seconds, 1e-9), "seconds": seconds,
                            **summary.memory_scalars(s.device)}, 0)
    distributed.barrier()
    if s.main:
        store.write_manifest_summary()
    distributed.barrier()

