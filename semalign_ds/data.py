"""The transfer set: (prompt, response) rows, tokenised once with the shared tokenizer.

A sequence is prompt ids + response ids. Loss positions are the positions whose next token is scored: response
tokens by default (`loss_on: response`), every token with `loss_on: all`.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from semalign_ds.config import ConfigError


def read_rows(spec, prompt_field="prompt", response_field="response", split="train", seed=0):
    """Rows as dicts with "prompt" and "response" from a jsonl/json file, a `datasets` folder, a hub id or
    "embedded:NAME"."""
    if spec.startswith("embedded:"):
        from semalign_ds import embedded
        return embedded.rows(spec.split(":", 1)[1], seed)
    raw = read_records(spec, split)
    if not raw:
        raise ConfigError(f"data set {spec!r} is empty")
    columns = set(raw[0]) if isinstance(raw[0], dict) else set()
    missing = [f for f in (prompt_field, response_field) if f not in columns]
    if missing:
        raise ConfigError(f"data set {spec!r} has no field(s) {missing}; its fields are {sorted(columns)}. "
                          f"Set prompt_field/response_field to the right names")
    return [{"prompt": r[prompt_field], "response": r[response_field]} for r in raw]


_FILE_KINDS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet",
               ".csv": "csv"}


def read_records(spec, split="train", config_name=None, name="data"):
    """Every record of a data set as a list of dicts, read with `datasets`: a .jsonl/.json(.gz)/.parquet/.csv file,
    a folder saved with save_to_disk, a local dataset folder or a hub id. The one reader of the transfer set and
    of the benchmarks."""
    import datasets
    try:
        if os.path.isfile(spec):
            kind = next((k for ext, k in _FILE_KINDS.items() if spec.endswith(ext)), None)
            if kind is None:
                raise ConfigError(f"{name}: cannot read {spec!r}: give a {'/'.join(_FILE_KINDS)} file or a folder")
            ds = datasets.load_dataset(kind, data_files=spec, split="train")
        elif os.path.isdir(spec) and any(os.path.isfile(os.path.join(spec, f))
                                         for f in ("dataset_info.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(spec)
        elif os.path.isdir(spec) or "/" in spec:
            try:
                ds = datasets.load_dataset(spec, config_name, split=split)
            except ValueError:
                if config_name is None:
                    raise
                ds = datasets.load_dataset(spec, split=split)
        else:
            raise ConfigError(f"{name}: data not found: {spec!r} (a .jsonl/.json file, a datasets folder, a hub id, "
                              f"or 'embedded:stdlib')")
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many types; the message is what helps
        raise ConfigError(f"{name}: could not read {spec!r} (split {split!r}): {err}. Without network access, "
                          f"give a local file") from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{name}: {spec!r} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
    return list(ds)


def batch_order(n, batch_size, steps, seed, stage):
    """Sequence indices of every step of a training stage, the same whatever the world size: seeded epochs of
    random permutations, resumable at any step."""
    gen = torch.Generator().manual_seed(seed * 1000003 + stage)
    stream = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(n, generator=gen).tolist()
    return [stream[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def index_batches(n, batch_size):
    """Positions 0..n-1 in consecutive batches of at most batch_size."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def check_data_path(spec, role="data"):
    if spec.startswith("embedded:"):
        return
    if spec.startswith((".", "/", "~")) and not os.path.exists(spec):
        raise ConfigError(f"{role} not found: {spec!r}")


@dataclass
class TokenizedSet:
    """Sequences stored flat: ids [total], loss [total] bool (position t scores token t+1), offsets [n+1]."""
    ids: torch.Tensor
    loss: torch.Tensor
    offsets: torch.Tensor

    def __len__(self):
        return self.offsets.numel() - 1

    @property
    def lengths(self):
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def loss_counts(self):
        """Loss positions per sequence."""
        return torch.segment_reduce(self.loss.float(), "sum", offsets=self.offsets).long()

    def batch(self, indices, pad_id):
        """Right-padded ids [B, T], attention mask [B, T] and loss mask [B, T] for the given sequences."""
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in indices]
        length = max(b - a for a, b in spans)
        ids = torch.full((len(spans), length), pad_id, dtype=torch.long)
        attn = torch.zeros((len(spans), length), dtype=torch.long)
        loss = torch.zeros((len(spans), length), dtype=torch.bool)
        for row, (a, b) in enumerate(spans):
            ids[row, :b - a] = self.ids[a:b]
            attn[row, :b - a] = 1
            loss[row, :b - a] = self.loss[a:b]
        return ids, attn, loss

    def subset(self, indices):
        """The sequences `indices`, in that order, as a set of their own."""
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in indices]
        lengths = torch.tensor([b - a for a, b in spans], dtype=self.offsets.dtype)
        offsets = torch.zeros(len(spans) + 1, dtype=self.offsets.dtype)
        offsets[1:] = lengths.cumsum(0)
        return TokenizedSet(torch.cat([self.ids[a:b] for a, b in spans]),
                            torch.cat([self.loss[a:b] for a, b in spans]), offsets)

    def split(self, fraction, seed):
        """(kept, held out): a seeded `fraction` of the sequences (at least one) held out, both in index order."""
        n_out = max(1, round(fraction * len(self)))
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1000003 + 7919)).tolist()
        return self.subset(sorted(perm[n_out:])), self.subset(sorted(perm[:n_out]))

    def tensors(self):
        return {"ids": self.ids, "loss": self.loss.to(torch.uint8), "offsets": self.offsets}

    @classmethod
    def from_tensors(cls, t):
        return cls(t["ids"], t["loss"].bool(), t["offsets"])

    @classmethod
    def load(cls, path):
        return cls.from_tensors(load_file(path))


def tokenize(rows, tokenizer, max_seq_len, loss_on="response", chat_template="auto", max_examples=None,
             origin="data"):
    """A TokenizedSet of the usable rows; refuses a set with none, saying how many were dropped and why."""
    use_template = chat_template == "on" or (chat_template == "auto" and tokenizer.chat_template is not None)
    if chat_template == "on" and tokenizer.chat_template is None:
        raise ConfigError("chat_template: on, but the tokenizer has no chat template; use auto or off")
    dropped = Counter()
    seqs, masks = [], []
    for row in rows:
        if max_examples is not None and len(seqs) >= max_examples:
            break
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            dropped["empty or non-text prompt/response"] += 1
            continue
        if use_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
            response = response + (tokenizer.eos_token or "")
        p_ids = tokenizer(prompt, add_special_tokens=not use_template)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[:max_seq_len]
        if len(p_ids) >= len(ids) and loss_on == "response":
            dropped[f"prompt fills max_seq_len={max_seq_len}"] += 1
            continue
        if len(ids) < 2:
            dropped["fewer than 2 tokens"] += 1
            continue
        # position t predicts token t+1: it counts when token t+1 is a response token (or always, loss_on=all)
        first = 0 if loss_on == "all" else max(len(p_ids) - 1, 0)
        mask = [first <= t < len(ids) - 1 for t in range(len(ids))]
        seqs.append(ids)
        masks.append(mask)
    if not seqs:
        why = "; ".join(f"{n} {reason}" for reason, n in dropped.items()) or "the data set is empty"
        raise ConfigError(f"{origin}: no usable rows ({sum(dropped.values())} dropped: {why})")
    offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    return TokenizedSet(torch.tensor([t for s in seqs for t in s], dtype=torch.long),
                        torch.tensor([m for ms in masks for m in ms], dtype=torch.bool), offsets), dropped


def pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
