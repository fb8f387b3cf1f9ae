"""The transfer set: rows in one of three layouts, tokenised once with the shared tokenizer.

Layouts (TRL's names): `prompt_response` rows {prompt, response}; `prompt_completion` rows {prompt, completion}
where the prompt may be a string or a list of chat messages; `messages` rows, a chat as a list of {role, content}.
read_rows brings them to two forms: {"prompt": str, "response": str}, or {"messages": [...], "loss_from": k}
(loss on the assistant turns at index >= k, so a prompt's own assistant turns are context only).

A sequence is the whole row tokenised as ONE string; the tokens that carry loss are found by character offsets,
so a row costs no extra token at the prompt/response boundary, and the pipeline and the NLL evaluation (both call
`tokenize`) score the same tokens. Loss positions are the positions whose next token is scored: response / assistant
tokens by default (`loss_on: response`), every token with `loss_on: all`.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file

from semalign_ds.config import ConfigError


LAYOUTS = ("prompt_response", "prompt_completion", "messages")
MAX_ROW_CHARS = 200_000


class Rows(list):
    """Rows in the canonical forms, with the layout they were read in and how many fields were cut."""

    def __init__(self, rows, layout, cut=0):
        super().__init__(rows)
        self.layout, self.cut = layout, cut

    def describe(self):
        cut = f"; {self.cut} rows cut to max_row_chars" if self.cut else ""
        return f"{len(self)} rows, layout {self.layout}{cut}"


def read_rows(spec, prompt_field="prompt", response_field="response", split="train", seed=0, data_format="auto",
              messages_field="messages", completion_field="completion", max_row_chars=MAX_ROW_CHARS):
    """Rows (see the module docstring) from a jsonl/json file, a `datasets` folder, a hub id or "embedded:NAME",
    each text field cut to max_row_chars characters. `data_format: auto` picks the layout from the first row's
    fields; the returned Rows say which (`rows.describe()`)."""
    if spec.startswith("embedded:"):
        from semalign_ds import embedded
        return bound_rows(Rows(embedded.rows(spec.split(":", 1)[1], seed), "prompt_response"), max_row_chars)
    if data_format != "auto" and data_format not in LAYOUTS:
        raise ConfigError(f"data_format: {data_format!r} is not a layout; use auto or one of {', '.join(LAYOUTS)}")
    raw = read_records(spec, split)
    if not raw:
        raise ConfigError(f"data set {spec!r} is empty; give a file with at least one row")
    fields = {"prompt_response": (prompt_field, response_field), "prompt_completion": (prompt_field, completion_field),
              "messages": (messages_field,)}
    columns = set(raw[0])
    layout = data_format if data_format != "auto" else next(
        (name for name, need in fields.items() if set(need) <= columns), None)
    if layout is None or not set(fields[layout]) <= columns:
        missing = [f for f in fields[layout or "prompt_response"] if f not in columns]
        need = " | ".join(f"{name}: {list(need)}" for name, need in fields.items())
        raise ConfigError(f"data set {spec!r} has no field(s) {missing}; its fields are {sorted(columns)}. The "
                          f"layouts need {need}: set prompt_field/response_field, completion_field or "
                          f"messages_field to its field names, or data_format to its layout")
    if data_format == "auto" and os.environ.get("RANK", "0") == "0":  # said once, by the first rank
        print(f"data set {spec}: layout {layout} (from the fields of its first row)", flush=True)
    rows = []
    for i, r in enumerate(raw):
        def get(field, kinds):
            if field not in r:
                raise ConfigError(f"data set {spec!r}, row {i}: no field {field!r} (its fields: {sorted(r)}); "
                                  f"every row of the {layout} layout needs {list(fields[layout])}")
            value = r[field]
            if value is not None and not isinstance(value, kinds):
                raise ConfigError(f"data set {spec!r}, row {i}, field {field!r}: a {type(value).__name__}, where the "
                                  f"{layout} layout needs {' or '.join(k.__name__ for k in kinds)}; fix the row or "
                                  f"the field names")
            return value if kinds != (list,) else _messages(value, spec, i, field)
        if layout == "prompt_response":
            rows.append({"prompt": get(prompt_field, (str,)), "response": get(response_field, (str,))})
        elif layout == "messages":
            rows.append({"messages": get(messages_field, (list,)), "loss_from": 0})
        else:
            prompt, completion = get(prompt_field, (str, list)), get(completion_field, (str, list))
            if isinstance(prompt, str) and isinstance(completion, str) or prompt is None or completion is None:
                rows.append({"prompt": prompt, "response": completion})
            else:  # conversational, as TRL: the completion is the assistant's reply to the prompt's chat
                prompt = _messages(prompt, spec, i, prompt_field) if isinstance(prompt, list) else \
                    [{"role": "user", "content": prompt}]
                completion = _messages(completion, spec, i, completion_field) if isinstance(completion, list) else \
                    [{"role": "assistant", "content": completion}]
                rows.append({"messages": prompt + completion, "loss_from": len(prompt)})
    return bound_rows(Rows(rows, layout), max_row_chars)


def _messages(value, spec, i, field):
    """A chat as a list of {role, content} strings, or a ConfigError naming the row."""
    for m in value or []:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ConfigError(f"data set {spec!r}, row {i}, field {field!r}: a chat message must be "
                              f"{{'role': str, 'content': str}}, got {str(m)[:80]!r}")
    return value


def bound_rows(rows, max_row_chars=MAX_ROW_CHARS):
    """Every text field cut to max_row_chars characters, so one huge row is never tokenised whole (a 33 MB row
    cost 7.2 GB). The rows keep their type; Rows count the rows cut."""
    if max_row_chars is None:
        return rows
    if not isinstance(max_row_chars, int) or max_row_chars < 1:
        raise ConfigError(f"max_row_chars: {max_row_chars!r}; give a positive number of characters")
    cut = 0
    for row in rows:
        texts = (row["messages"] or []) if "messages" in row else [row]
        keys = ("content",) if "messages" in row else ("prompt", "response")
        long = [(t, k) for t in texts for k in keys if isinstance(t.get(k), str) and len(t[k]) > max_row_chars]
        for t, k in long:
            t[k] = t[k][:max_row_chars]
        cut += bool(long)
    if isinstance(rows, Rows):
        rows.cut += cut
    return rows


_FILE_KINDS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet",
               ".csv": "csv"}


def read_records(spec, split="train", config_name=None, name="data"):
    """Every record of a data set as a list of dicts: a .jsonl/.json(.gz) file (read here, for errors that name the
    line), a .parquet/.csv file, a folder saved with save_to_disk, a local dataset folder or a hub id (read with
    `datasets`). The one reader of the transfer set and of the benchmarks."""
    if os.path.isfile(spec) and spec.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return _read_json(spec, name)
    import datasets
    try:
        if os.path.isfile(spec):
            kind = next((k for ext, k in _FILE_KINDS.items() if spec.endswith(ext)), None)
            if kind is None:
                raise ConfigError(f"{name}: cannot read {spec!r}: give a {'/'.join(_FILE_KINDS)} file or a folder")
            if os.path.getsize(spec) == 0:
                raise ConfigError(f"{name}: {spec!r} is an empty file; give a file with at least one row")
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
    except Exception as err:  # datasets raises many types, often wrapping the cause; name the deepest one
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        hint = ("Without network access, give a local file" if not os.path.exists(spec) else
                "Check that it is a valid, UTF-8 file of the kind its name says")
        raise ConfigError(f"{name}: could not read {spec!r} (split {split!r}): {type(cause).__name__}: "
                          f"{str(cause)[:300].rstrip('.')}. {hint}") from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{name}: {spec!r} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
    return list(ds)


def _read_json(path, name):
    """Records of a JSON-lines file or of a JSON file holding a list of records (or {"data": [...]})."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            text = f.read().decode("utf-8")  # whole, so an error's position is the file's
    except UnicodeDecodeError as err:
        raise ConfigError(f"{name}: {path!r} is not UTF-8 text (byte {err.start} of the file): save it as UTF-8 "
                          f"JSON lines, one record per line") from None
    except (OSError, EOFError) as err:
        raise ConfigError(f"{name}: could not read {path!r}: {err}") from None
    if "\x00" in text:
        raise ConfigError(f"{name}: {path!r} holds NUL bytes, so it is binary, not JSON text; give a .jsonl file of "
                          f"records (or name a parquet file .parquet)")
    if not text.strip():
        raise ConfigError(f"{name}: {path!r} is an empty file; give a file with at least one record")
    try:
        records = json.loads(text)  # a JSON file: a list of records, one record, or {"data": [...]}
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):
            raise ConfigError(f"{name}: {path!r} is not valid JSON (line {whole.lineno}: {whole.msg})") from None
        records = []  # JSON lines
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{name}: {path!r}, line {number}: not JSON ({err.msg}); each line of a "
                                      f"JSON-lines file must be one record {{...}}") from None
    if isinstance(records, dict):
        records = records["data"] if isinstance(records.get("data"), list) else [records]
    if not isinstance(records, list):
        raise ConfigError(f"{name}: {path!r} holds a JSON {type(records).__name__}, not a list of records; give "
                          f"one object {{field: value}} per row")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ConfigError(f"{name}: {path!r} is not a list of records: item {bad} is a "
                          f"{type(records[bad]).__name__}, not an object {{field: value}}; give one object per row")
    return records


# ranks own whole residue classes modulo BALANCE_GROUPS (or the largest power of two dividing the batch size, if
# smaller; owned()), and a global batch holds as many of each class, so that at 1, 2, 4 or 8 ranks each rank computes
# the same number of a batch's sequences
BALANCE_GROUPS = 8


def balance_groups(n, batch_size):
    """G: the batches of batch_order hold batch_size / G sequences of each residue modulo G."""
    g = 1
    while g < BALANCE_GROUPS and batch_size % (2 * g) == 0 and 2 * g <= n:
        g *= 2
    return g


def batch_order(n, batch_size, steps, seed, stage):
    """Sequence indices of every step of a training stage, the same whatever the world size, resumable at any step.
    Stratified so that ranks get equal shares: the sequences i = c (mod G) (G = balance_groups) come in seeded
    epochs of random permutations of their own, and every batch takes batch_size / G of them from each c (a
    sequence of a smaller residue class comes round a little more often when G does not divide n)."""
    g = balance_groups(n, batch_size)
    per = batch_size // g
    streams = [[] for _ in range(g)]
    for c in range(g):
        gen = torch.Generator().manual_seed((seed * 1000003 + stage) * BALANCE_GROUPS + c)  # more steps: a longer
        members = torch.arange(c, n, g)                                                     # stream, same prefix
        while len(streams[c]) < steps * per:
            streams[c] += members[torch.randperm(len(members), generator=gen)].tolist()
    return [[streams[j % g][s * per + j // g] for j in range(batch_size)] for s in range(steps)]


def owned(work, batch_size, rank, world):
    """The sequences (increasing) that rank `rank` of `world` trains on and keeps the frontier of, given each
    sequence's `work` (a number to even out over the ranks). batch_order's residue classes modulo G are dealt out whole,
    G / world to each rank, so every batch still gives each rank batch_size / world sequences; of the ways to deal
    them, the one whose busiest rank has the least summed work (the first such, so every rank finds the same).
    Strided (i = rank mod world) where world does not divide G."""
    n = len(work)
    g = balance_groups(n, batch_size)
    if g % world:
        return list(range(rank, n, world))
    load = [float(sum(work[c::g])) for c in range(g)]
    best = min(_deals(list(range(g)), g // world), key=lambda deal: max(sum(load[c] for c in part) for part in deal))
    return [i for i in range(n) if i % g in best[rank]]


def _deals(classes, size):
    """Every way to split `classes` into groups of `size`, each group listed with its smallest class first, the
    groups in the order of their first class."""
    if not classes:
        yield []
        return
    first, rest = classes[0], classes[1:]
    for others in itertools.combinations(rest, size - 1):
        left = [c for c in rest if c not in others]
        for deal in _deals(left, size):
            yield [(first,) + others] + deal


def length_batches(lengths, batch_size, world):
    """[rank] -> that rank's batches, step by step (indices into `lengths`; None where a rank has none at a step),
    for ranks that wait for each other after every batch: a step costs its largest batch's size x its longest
    example in padded tokens. The examples longest first, world * batch_size per step (each step's batches of about
    the same length, each padding little); the one short step, if any, where it pads least, its longest examples
    in the smaller batches. The same on every rank."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    longest = [int(lengths[i]) for i in order]
    per = world * batch_size
    full, rest = divmod(len(order), per)

    def split(step):  # ranks 0..extra-1 take q + 1 examples, the others q: those the longest
        q, extra = divmod(len(step), world)
        cut = (world - extra) * q
        small, big = step[:cut], step[cut:]
        return [big[r::extra] if r < extra else small[r - extra::world - extra] or None for r in range(world)]

    short_at = 0
    if rest:  # the padded tokens with the short step k-th, for every k: the full steps before it start at i * per,
        # those after it at rest + i * per (one pass over each series, not a plan per place)
        q, extra = divmod(rest, world)
        cut = (world - extra) * q

        def short(a):
            return max(q * longest[a] if q else 0, (q + 1) * longest[a + cut] if extra else 0)

        before = [0]
        for i in range(full):
            before.append(before[-1] + batch_size * longest[i * per])
        after = [0]
        for i in reversed(range(full)):
            after.append(after[-1] + batch_size * longest[rest + i * per])
        cost = [before[k] + short(k * per) + after[full - k] for k in range(full + 1)]
        short_at = cost.index(min(cost))
    sizes = [per] * full
    if rest:
        sizes.insert(short_at, rest)
    starts = itertools.accumulate([0] + sizes[:-1])
    steps = [split(order[a:a + size]) for a, size in zip(starts, sizes)]
    return [[step[r] for step in steps] for r in range(world)]


BATCH_TOKENS = 32  # what a batch costs besides its tokens, in tokens' worth (each batch reads every weight once)


def cheapest_batches(indices, lengths, batch_size, overhead=BATCH_TOKENS, cap=None):
    """`indices` cut into batches of at most batch_size (and, but for single examples, at most `cap` padded
    tokens), longest first, with the least padded tokens (size x longest) plus `overhead` per batch: (that cost,
    the batches). Exact: consecutive runs of the longest-first order are optimal for this cost, and the best cut
    is found by dynamic programming from the short end."""
    order = sorted(indices, key=lambda i: (-int(lengths[i]), i))
    n = len(order)
    best, cut = [0] * (n + 1), [n] * (n + 1)
    for i in range(n - 1, -1, -1):  # ties: the larger batch
        longest = int(lengths[order[i]])
        best[i], end = min((best[i + k] + k * longest + overhead, -(i + k))
                           for k in range(1, min(batch_size, n - i) + 1) if k == 1 or cap is None or k * longest <= cap)
        cut[i] = -end
    batches, i = [], 0
    while i < n:
        batches.append(order[i:cut[i]])
        i = cut[i]
    return best[0], batches


def rank_batches(lengths, batch_size, world, overhead=BATCH_TOKENS):
    """[rank] -> that rank's batches (indices into `lengths`) for ranks that do not wait for each other: a rank
    costs its batches' padded tokens (size x longest) plus `overhead` per batch (cheapest_batches), and the
    busiest rank sets the time. No batch pads to more tokens than the largest of the batches one rank would make,
    so that a rank's activations are never more than one rank's. Those batches (cut smaller where there are fewer
    than ranks) go largest first to the least loaded rank; then single examples move, or two swap, between the
    busiest rank and another while that lowers the larger of their two costs. The same on every rank."""
    n = len(lengths)
    _, one = cheapest_batches(range(n), lengths, batch_size, overhead)
    if world == 1:
        return [one]
    cap = max((len(b) * int(lengths[b[0]]) for b in one), default=0)

    def cost(sub):
        return cheapest_batches(sub, lengths, batch_size, overhead, cap)[0]

    # the first deal: batches small enough that every rank can get one (else one rank's), largest first
    pieces = cheapest_batches(range(n), lengths, min(batch_size, max(1, -(-n // world))), overhead)[1]
    sets, load = [[] for _ in range(world)], [0] * world
    for b in sorted(pieces, key=lambda b: (-len(b) * int(lengths[b[0]]), b[0])):
        r = load.index(min(load))
        sets[r] += b
        load[r] += len(b) * int(lengths[b[0]]) + overhead
    sets = [sorted(m) for m in sets]
    load = [cost(m) for m in sets]
    # cost evaluations (each O(n x batch_size)): every move and swap for tens of examples, bounded for thousands
    budget = min(5_000, max(64, 20_000_000 // max(1, n * batch_size)))
    while budget > 0:
        busy = load.index(max(load))
        best = None
        for r in range(world):
            if r == busy:
                continue
            trades = itertools.chain((((i,), ()) for i in sets[busy]),
                                     (((i,), (j,)) for i in sets[busy] for j in sets[r]))
            for give, take in trades:
                if budget <= 0:
                    break
                budget -= 2
                here = [k for k in sets[busy] if k not in give] + list(take)
                there = [k for k in sets[r] if k not in take] + list(give)
                a, b = cost(here), cost(there)
                if max(a, b) < load[busy] and (best is None or max(a, b) < best[0]):
                    best = (max(a, b), r, sorted(here), sorted(there), a, b)
        if best is None:
            break
        _, r, sets[busy], sets[r], load[busy], load[r] = best
    return [cheapest_batches(s, lengths, batch_size, overhead, cap)[1] for s in sets]


def deal(costs, world):
    """[rank] -> the positions of `costs` that rank takes, for ranks that do not wait for each other (the busiest
    sets the time): largest first to the least loaded rank, then one item moves, or two swap, between the busiest
    rank and another while that lowers the larger of their two loads. The same on every rank (ties by position)."""
    sets, load = [[] for _ in range(world)], [0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = load.index(min(load))
        sets[r].append(i)
        load[r] += costs[i]
    budget = 2_000_000  # trades weighed: all of them for hundreds of items, a bounded search for more
    while budget > 0:
        busy = load.index(max(load))
        best = None
        for r in range(world):
            for i in sets[busy] if r != busy else ():
                for j in [None] + sets[r]:
                    budget -= 1
                    d = costs[i] - (0 if j is None else costs[j])
                    top = max(load[busy] - d, load[r] + d)
                    if d > 0 and top < load[busy] and (best is None or top < best[0]):
                        best = (top, r, i, j, d)
        if best is None:
            break
        _, r, i, j, d = best
        sets[busy].remove(i)
        sets[r].append(i)
        if j is not None:
            sets[r].remove(j)
            sets[busy].append(j)
        load[busy] -= d
        load[r] += d
    return [sorted(m) for m in sets]


def index_batches(n, batch_size):
    """Positions 0..n-1 in consecutive batches of at most batch_size."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def check_data_path(spec, role="data"):
    if spec.startswith("embedded:"):
        return
    if spec.startswith((".", "/", "~")) and not os.path.exists(spec):
        raise ConfigError(f"{role} not found: {spec!r}")


# version 2: prompt and response tokenised together, the loss found by character offsets
TOKENIZATION_VERSION = 2


class StaleTokenization(ValueError):
    pass


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
        return {"ids": self.ids, "loss": self.loss.to(torch.uint8), "offsets": self.offsets,
                "version": torch.tensor([TOKENIZATION_VERSION])}

    @classmethod
    def from_tensors(cls, t):
        if "version" not in t or int(t["version"][0]) != TOKENIZATION_VERSION:
            raise StaleTokenization("the tokenised set was made by an earlier version of the tokenisation")
        return cls(t["ids"], t["loss"].bool(), t["offsets"])

    @classmethod
    def load(cls, path):
        return cls.from_tensors(load_file(path))


def tokenize(rows, tokenizer, max_seq_len, loss_on="response", chat_template="auto", max_examples=None,
             origin="data", max_row_chars=MAX_ROW_CHARS):
    """A TokenizedSet of the usable rows; refuses a set with none, saying how many were dropped and why.

    Each row is tokenised as one string. A token carries loss when its characters overlap the response (or an
    assistant turn's content and the end-of-sequence token right after it); a token that straddles the boundary
    counts as response. Rows are cut to max_row_chars per field first (see bound_rows)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{origin}: the tokenizer {type(tokenizer).__name__} is not a fast tokenizer; tokenize "
                          f"needs its character offsets (return_offsets_mapping): give a model folder with a "
                          f"tokenizer.json")
    has_template = tokenizer.chat_template is not None
    use_template = chat_template == "on" or (chat_template == "auto" and has_template)
    if chat_template == "on" and not has_template:
        raise ConfigError("chat_template: on, but the tokenizer has no chat template; use auto or off")
    if any("messages" in row for row in rows) and not use_template:
        why = "chat_template is off" if has_template else "the tokenizer has no chat template"
        raise ConfigError(f"{origin}: chat rows (a messages list, or a conversational prompt) go through the "
                          f"tokenizer's chat template, but {why}: "
                          + ("set chat_template to auto or on" if has_template else
                             "use a tokenizer with a chat_template in its tokenizer_config.json, or prompt/response "
                             "rows"))
    dropped = Counter()
    seqs, masks = [], []

    def prepared():  # (text, loss spans) of each row in turn, counting the rows dropped before tokenisation
        for row in rows:
            row = bound_rows([dict(row, messages=[dict(m) for m in row["messages"]]) if row.get("messages") else
                              dict(row)], max_row_chars)[0]
            text, spans, why = _text_and_loss_spans(row, tokenizer, use_template, origin)
            if why:
                dropped[why] += 1
            else:
                yield text, spans

    pending = prepared()
    while max_examples is None or len(seqs) < max_examples:
        # batches for the tokenizer's speed, no larger than the rows still wanted, so no row is read past the last
        chunk = list(itertools.islice(pending, 256 if max_examples is None else min(256, max_examples - len(seqs))))
        if not chunk:
            break
        encoded = tokenizer([text for text, _ in chunk], add_special_tokens=not use_template,
                            return_offsets_mapping=True)
        for (_, spans), ids, offsets in zip(chunk, encoded["input_ids"], encoded["offset_mapping"]):
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            starts, ends = offsets[:, 0], offsets[:, 1]
            scored = np.zeros(len(ids), dtype=bool)  # the token carries loss: its characters overlap a span
            for a, b in spans:
                scored |= (starts < b) & (ends > a) & (ends > starts)
            ids = ids[:max_seq_len]
            if len(ids) < 2:
                dropped["fewer than 2 tokens"] += 1
                continue
            # position t predicts token t+1: it counts when token t+1 carries loss (or always, loss_on=all)
            mask = np.zeros(len(ids), dtype=bool)
            mask[:-1] = True if loss_on == "all" else scored[1:len(ids)]
            if not mask.any():
                dropped[f"prompt fills max_seq_len={max_seq_len}" if scored[1:].any() else
                        "no response tokens"] += 1
                continue
            seqs.append(np.asarray(ids, dtype=np.int64))
            masks.append(mask)
    if not seqs:
        why = "; ".join(f"{n} {reason}" for reason, n in dropped.items()) or "the data set is empty"
        raise ConfigError(f"{origin}: no usable rows ({sum(dropped.values())} dropped: {why})")
    offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    return TokenizedSet(torch.from_numpy(np.concatenate(seqs)), torch.from_numpy(np.concatenate(masks)),
                        offsets), dropped


def _text_and_loss_spans(row, tokenizer, use_template, origin):
    """(text, [(start, end) character spans that carry loss], None), or (None, None, why the row is dropped)."""
    eos = tokenizer.eos_token or ""
    if "messages" in row:
        messages, loss_from = row["messages"] or [], row.get("loss_from", 0)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages[loss_from:]):
            return None, None, "no assistant turn to score"
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            scored = m["role"] == "assistant" and i >= loss_from
            if scored:  # search after the turn's header, which could hold a short reply's text ("assistant")
                header = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                cursor = max(cursor, len(header) if text.startswith(header) else 0)
            content = m["content"]
            at = text.find(content, cursor)
            if at < 0:  # many templates trim each turn
                content = content.strip()
                at = text.find(content, cursor)
            if at < 0:
                if scored:
                    raise ConfigError(f"{origin}: the chat template rewrites an assistant turn (its text is not in "
                                      f"the templated chat: {m['content'][:60]!r}), so its tokens cannot be found; "
                                      f"use a template that keeps assistant turns as they are")
                continue  # a system or user turn the template rewrote: context either way
            cursor = at + len(content)
            if scored:  # the turn's end (the EOS that follows it, if any) is learned too: it is when to stop
                spans.append((at, cursor + len(eos) if eos and text.startswith(eos, cursor) else cursor))
        return text, spans, None
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
        return None, None, "empty or non-text prompt/response"
    if use_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
        response = response + eos
    return prompt + response, [(len(prompt), len(prompt) + len(response))], None


def pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
