"""The frontier of frontier training, shallow to deep (docs/method.md, section 5).

Stage k trains target layer k alone. Its input is the frontier: the output of the already-trained layers below it
for every position of every sequence, computed once per stage by running the just-finished layer over the previous
frontier (stage 1 starts from the embeddings). A stage therefore costs one layer's forward and backward.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from semalign_ds.data import index_batches


class Frontier:
    """Residual-stream states of the sequences `members` (all of them on one rank), stored flat [positions, d] in
    the order of `members`."""

    def __init__(self, states, offsets, members):
        self.offsets, self.members = offsets, list(members)
        lengths = offsets[1:] - offsets[:-1]
        self.start = {}
        at = 0
        for i in self.members:
            self.start[i] = at
            at += int(lengths[i])
        self.states = states
        if states.shape[0] != at:
            raise ValueError(f"frontier of {states.shape[0]} positions for sequences holding {at}")

    @classmethod
    @torch.no_grad()
    def of_embeddings(cls, adapter, data, members, pad_id, batch_size, device, dtype=torch.float32):
        """The stage-1 frontier: the target's embeddings of the member sequences."""
        total = int((data.lengths[list(members)]).sum()) if len(members) else 0
        frontier = cls(torch.empty(total, adapter.width, dtype=dtype), data.offsets, members)
        for idx in index_batches(len(frontier.members), batch_size):
            idx = [frontier.members[j] for j in idx]
            ids, _, _ = data.batch(idx, pad_id)
            frontier.put(idx, adapter.embed(ids.to(device)))
        return frontier

    def _span(self, i):
        a = self.start[i]
        return a, a + int(self.offsets[i + 1] - self.offsets[i])

    def batch(self, indices):
        """Right-padded states [B, T, d] of the given (member) sequences."""
        spans = [self._span(i) for i in indices]
        length = max(b - a for a, b in spans)
        out = self.states.new_zeros((len(spans), length, self.states.shape[1]))
        for row, (a, b) in enumerate(spans):
            out[row, :b - a] = self.states[a:b]
        return out

    def put(self, indices, padded):
        """Store a right-padded batch [B, T, d] back as the rows of sequences `indices`."""
        padded = padded.to(device="cpu", dtype=self.states.dtype)
        for row, i in enumerate(indices):
            a, b = self._span(i)
            self.states[a:b] = padded[row, :b - a]

    @torch.no_grad()
    def advance(self, fn, data, pad_id, batch_size, device, show=False):
        """The next frontier: fn(h [B, T, d], attention [B, T]) -> [B, T, d] over every member sequence."""
        new = Frontier(torch.empty_like(self.states), self.offsets, self.members)
        for idx in tqdm(index_batches(len(self.members), batch_size), desc="frontier", disable=not show,
                        leave=False):
            idx = [self.members[j] for j in idx]
            _, attn, _ = data.batch(idx, pad_id)
            new.put(idx, fn(self.batch(idx).to(device), attn.to(device)))
        return new
