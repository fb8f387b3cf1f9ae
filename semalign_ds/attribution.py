"""Layer attribution on the source: layer gradient x activation (docs/method.md, section 1).

score(l) = mean over examples of | sum over loss positions and channels of h^(l) * dL/dh^(l) |, where L is the
example's mean cross-entropy on its loss positions. Only activation gradients are taken; parameters stay frozen.
"""
from __future__ import annotations

import torch


def batch_scores(adapter, ids, attn, loss_mask, head, runner=None, recompute=False):
    """Per-example scores [B, L] for one right-padded batch; head: the LM head [V, d] (padding rows trimmed) or
    this rank's vocab_parallel.Rows of it. recompute: each layer's activations are recomputed in the backward
    instead of kept (the same scores)."""
    from semalign_ds import vocab_parallel
    rows = head if isinstance(head, vocab_parallel.Rows) else vocab_parallel.rows_of(head)
    states = adapter.hidden_states(ids, attn, grad=True, runner=runner, recompute=recompute)[1:]
    h = states[-1]
    x = adapter.norm(h)[loss_mask]
    targets = ids[:, 1:][loss_mask[:, :-1]]
    acc = torch.promote_types(x.dtype, torch.float32)
    ce = vocab_parallel.nll(x, targets, rows)
    example = loss_mask.nonzero()[:, 0]
    counts = loss_mask.sum(1).clamp(min=1)
    # the sum over examples of their mean CE: each example's gradient is its own mean's gradient
    loss = (ce / counts[example]).sum()
    mask = loss_mask.unsqueeze(-1)
    scores = [None] * len(states)

    def score(i):  # layer i's score from its gradient as the backward reaches it; the gradient is not kept
        def hook(g):
            scores[i] = ((states[i].detach().to(acc) * g.to(acc)) * mask).sum(dim=(1, 2)).abs()
        return hook

    handles = [h.register_hook(score(i)) for i, h in enumerate(states)]
    # backward(), not autograd.grad: a recomputed layer (reentrant checkpointing) is backpropagated inside the backward
    try:
        loss.backward()
    finally:
        for handle in handles:  # the hooks refer to the states: a reference cycle that would outlive the batch
            handle.remove()
    return torch.stack(scores, dim=1)


def independent(runner, head):
    """Whether a rank's forwards and NLLs need no other rank, so that ranks need not keep step: a source whole on
    every rank, or a ZeRO-3 source on one host whose partitions and vocabulary rows every rank reads in place
    (shared_weights.py)."""
    from semalign_ds import engines
    return engines.forwards_apart(runner) and (runner is None or not head.collective)


def phase(s, src, runner, head_s):
    """Scores of every source layer over the first attribution_examples examples, data-parallel over ranks (every
    rank returns the same scores): batches of similar lengths, whole batches per rank; where ranks need not keep
    step (independent), each rank its own batches (data.rank_batches), else the same number in steps
    (data.length_batches)."""
    import contextlib
    import time

    from semalign_ds import distributed, engines
    from semalign_ds.data import length_batches, rank_batches
    cfg = s.cfg
    n = len(s.data) if cfg.attribution_examples is None else min(cfg.attribution_examples, len(s.data))
    lengths = s.data.lengths[:n].tolist()
    apart = independent(runner, head_s)
    if apart:
        # the busiest rank's padded tokens and batches as few as can be: the scale benchmark's 16 examples
        # (embedded:stdlib) in batches of at most 4: 1,319 padded tokens in 6 batches on 1 rank, 673 in 3 on
        # the busier of 2
        jobs = [(b, True) for b in rank_batches(lengths, cfg.attribution_batch_size, s.world)[s.rank]]
    else:
        # ranks wait for each other at every batch (ZeRO-3's gathers, the head's rows), so a step costs its
        # longest batch: the same 16 examples in batches of 4 padded to 1,452 tokens on 1 rank and 852 on the
        # slower of 2 (1,896 and 1,016 with strided shares)
        steps = length_batches(lengths, cfg.attribution_batch_size, s.world)[s.rank]
        shortest = [min(range(n), key=lengths.__getitem__)] if n else [0]  # where a rank has no batch at a step
        jobs = distributed.lockstep(steps, runner is not None and s.world > 1, filler=shortest)
    sums = torch.zeros(s.n_source + 1, dtype=torch.float64)  # scores per layer, and tokens
    t0 = time.time()
    with engines.ranks_apart() if apart and runner is not None else contextlib.nullcontext():
        for idx, real in s.bar(jobs, desc="attribution"):
            ids, attn, loss = (t.to(s.device) for t in s.data.batch(idx, s.pad_id))
            scores = batch_scores(src, ids, attn, loss, head_s, runner, cfg.attribution_recompute)
            if real:
                sums[:-1] += scores.sum(0).double().cpu()
                sums[-1] += int(attn.sum())
    distributed.all_reduce_sum(sums)
    seconds = time.time() - t0
    s.monitor.log("attribution", {"tokens_per_s": float(sums[-1]) / seconds, "seconds": seconds}, 0)
    return (sums[:-1] / n).tolist()
