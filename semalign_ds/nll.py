"""Negative log-likelihood of the loss positions of tokenised sequences: the one NLL that the pipeline's
evaluation phases and the evaluation launcher share."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from semalign_ds import vocab_parallel
from semalign_ds.data import index_batches


def batch_nll(adapter, ids, attn, loss, head=None, runner=None):
    """(summed NLL in nats, scored tokens) of one right-padded batch's loss positions; `runner` is the DeepSpeed
    engine of a ZeRO-3 model, `head` its LM head: a tensor, or this rank's vocab_parallel.Rows (collective)."""
    head = adapter.head.weight if head is None else head
    h = adapter.final_state(ids, attn, runner=runner)
    x = adapter.norm(h[loss])
    labels = ids[:, 1:][loss[:, :-1]]
    if isinstance(head, vocab_parallel.Rows):
        return float(vocab_parallel.nll(x, labels, head).sum()), int(labels.numel())
    logits = (x @ head.T).float()
    return float(F.cross_entropy(logits, labels, reduction="sum")), int(labels.numel())


@torch.no_grad()
def response_nll(adapter, data, pad_id, batch_size, device, desc="NLL", show=True):
    """(summed NLL in nats, scored tokens) of the data's loss positions; longest sequences first so that padding
    stays small."""
    order = sorted(range(len(data)), key=lambda i: -int(data.lengths[i]))
    total, count = 0.0, 0
    for idx in tqdm(index_batches(len(order), batch_size), desc=desc, disable=not show, leave=False):
        ids, attn, loss = (t.to(device) for t in data.batch([order[i] for i in idx], pad_id))
        batch_total, batch_count = batch_nll(adapter, ids, attn, loss)
        total += batch_total
        count += batch_count
    return total, count
