"""The source activation cache (METHOD.md, section 4).

Per loss position, in example order: the aligned targets a^(k) = M u^(l(k)) for every target layer k ("aligned.k",
target width) and the source's final normed state n_s(h^(L_s)) ("source_final", source width) for the output KL.

Layout: shard i holds examples [i * E, (i + 1) * E) (E = shard_examples) in shard-0000i.safetensors, with a sidecar
shard-0000i.json (token count, sha256) written after the file is complete. A shard whose sidecar is present and
whose checksum matches is never recomputed, so a killed run resumes where it stopped, and the shard layout does not
depend on how many ranks wrote it. manifest.json says what the cache was made from; a cache made from other models,
plan, tokenizer or data is refused instead of being reused.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from semalign_ds.alignment import align, source_direction
from semalign_ds.config import ConfigError


class CacheMismatch(ConfigError):
    pass


class CorruptShard(RuntimeError):
    pass


def batch_entries(adapter_s, ids, attn, loss_mask, pairs, m, normalize=True, runner=None, source_states=False):
    """{"aligned.k": [n, d_t] for k = 1..L_t, "source_final": [n, d_s]} for the loss positions of one batch; with
    source_states, also the unit source states "source.k" [n, d_s] themselves (for the layer-wise baseline)."""
    states = adapter_s.hidden_states(ids, attn, runner=runner)  # states[l] = h^(l)
    norm = adapter_s.norm if normalize else None
    out = {}
    for k, l in enumerate(pairs, start=1):
        u = source_direction(states[l][loss_mask], norm)
        out[f"aligned.{k}"] = align(m, u)
        if source_states:
            out[f"source.{k}"] = u
    out["source_final"] = adapter_s.norm(states[-1][loss_mask]).float()
    return out


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


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
            with open(path) as f:
                old = json.load(f)
            summary = ("shards", "tokens")  # written once the cache is complete
            diff = sorted(k for k in (set(old) | set(header)) - set(summary) if old.get(k) != header.get(k))
            if diff:
                raise CacheMismatch(f"the activation cache in {self.folder} was made for other inputs (differs "
                                    f"in: {', '.join(diff)}); delete that folder or use a new output_dir")
        else:
            _atomic_json(path, header)
        return self

    def write_manifest_summary(self):
        """The manifest, completed with each shard's entry, once every shard is written."""
        path = os.path.join(self.folder, "manifest.json")
        with open(path) as f:
            manifest = json.load(f)
        manifest["shards"] = [self.entry(i) for i in range(self.n_shards)]
        manifest["tokens"] = sum(e["tokens"] for e in manifest["shards"])
        _atomic_json(path, manifest)
        return manifest

    # --- shards --------------------------------------------------------------------------------------------
    def entry(self, i):
        _, side = self._paths(i)
        if not os.path.isfile(side):
            return None
        with open(side) as f:
            return json.load(f)

    def is_complete(self, i, verify=True):
        data, _ = self._paths(i)
        entry = self.entry(i)
        if entry is None or not os.path.isfile(data):
            return False
        if verify and sha256(data) != entry["sha256"]:
            raise CorruptShard(f"cache shard {data} fails its checksum (file damaged or changed); rerun with "
                               f"--set recompute_corrupt=true to recompute it, or delete it")
        return True

    def pending(self, verify=True, recompute_corrupt=False):
        """Shards still to write; with recompute_corrupt, damaged shards are removed and listed too."""
        todo = []
        for i in range(self.n_shards):
            try:
                done = self.is_complete(i, verify)
            except CorruptShard:
                if not recompute_corrupt:
                    raise
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
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, data)
        tokens = int(tensors["source_final"].shape[0])
        _atomic_json(side, {"file": os.path.basename(data), "examples": list(self.shard_range(i)),
                            "tokens": tokens, "sha256": sha256(data),
                            "shapes": {k: list(v.shape) for k, v in tensors.items()},
                            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()}})

    def load(self, key):
        """Rows of `key` for all examples, in example order."""
        parts = []
        for i in range(self.n_shards):
            with safe_open(self._paths(i)[0], framework="pt") as f:
                parts.append(f.get_tensor(key))
        return torch.cat(parts)


def _atomic_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)
