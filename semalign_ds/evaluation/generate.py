"""Model calls of the benchmarks: batched greedy or sampled generation cut at stop sequences, and batched
log-likelihoods of continuations."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from semalign_ds.config import ConfigError
from semalign_ds.data import index_batches
from semalign_ds.evaluation.tasks import truncate_at


@dataclass(frozen=True)
class Sampling:
    """n samples per prompt at temperature/top_p; the sample stream of prompt i is seeded with seed + i, so the
    samples do not depend on batching or on how the prompts are split over ranks."""
    n: int
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.n < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling needs samples >= 1, temperature > 0 and 0 < top_p <= 1; got n={self.n}, "
                              f"temperature={self.temperature}, top_p={self.top_p}")


def prepare_tokenizer(tokenizer):
    """Padding for batched evaluation: the EOS token pads when the tokenizer names no pad token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_prompts(tokenizer, prompts, add_special_tokens=True):
    """The prompts' token ids, as both generation backends feed them to the model."""
    return [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]


def model_device(model, device=None):
    return torch.device(device) if device is not None else next(model.parameters()).device


def left_pad(seqs, pad_id, device):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, length - len(s):] = torch.tensor(s)
            attn[row, length - len(s):] = 1
    return ids.to(device), attn.to(device)


class _StopOnStrings:
    """A generate() stopping criterion: a row is done once its new text holds a stop sequence."""

    def __init__(self, tokenizer, start, stops):
        self.tokenizer, self.start, self.stops = tokenizer, start, tuple(stops)

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, batch_size=8, stop=(), device=None, show=False,
             desc="generate", add_special_tokens=True, sampling=None, seeds=None):
    """Completions of `prompts`, each cut at the earliest stop sequence: greedy (a string per prompt; left-padded
    batches, longest prompts first) or, with `sampling`, a list of sampling.n strings per prompt (one prompt's
    samples per batch, seeded with sampling.seed + seeds[i], seeds defaulting to the prompt positions).
    `model` may be a vllm_backend.VLLMModel: vLLM generates, with the same prompt ids, decoding and stops."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    prepare_tokenizer(tokenizer)
    if getattr(model, "is_vllm", False):  # a vllm_backend.VLLMModel (not imported here: it imports this module)
        return model.generate(tokenizer, prompts, max_new_tokens, stop, add_special_tokens, sampling, seeds)
    device = model_device(model, device)
    encoded = encode_prompts(tokenizer, prompts, add_special_tokens)
    criterion = type("StopOnStrings", (_StopOnStrings, StoppingCriteria), {})

    def run(rows, copies, **kwargs):
        ids, attn = left_pad([encoded[i] for i in rows for _ in range(copies)], tokenizer.pad_token_id, device)
        criteria = StoppingCriteriaList([criterion(tokenizer, ids.shape[1], stop)]) if stop else None
        generated = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                   pad_token_id=tokenizer.pad_token_id, stopping_criteria=criteria, num_beams=1,
                                   **kwargs)
        return [truncate_at(continuation_text(tokenizer, encoded[rows[k // copies]], generated[k, ids.shape[1]:]
                                              .tolist()), stop) for k in range(len(generated))]

    out = [None] * len(prompts)
    if sampling is None:
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        for batch in tqdm(index_batches(len(order), batch_size), desc=desc, disable=not show, leave=False):
            rows = [order[i] for i in batch]
            for i, text in zip(rows, run(rows, 1, do_sample=False)):
                out[i] = text
        return out
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    for i in tqdm(range(len(prompts)), desc=desc, disable=not show, leave=False):
        torch.manual_seed(sampling.seed + seeds[i])
        if device.type == "cuda":
            torch.cuda.manual_seed(sampling.seed + seeds[i])
        out[i] = run([i], sampling.n, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                     top_k=0)
    return out


def continuation_text(tokenizer, prompt_ids, new_ids):
    """The text the new tokens add to the prompt: decoded together with the prompt, because some tokenizers
    (SentencePiece) drop a leading space when a continuation is decoded alone, which breaks indentation."""
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if full.startswith(prompt_text):
        return full[len(prompt_text):]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) as lm-evaluation-harness's HFLM splits them: the tokenizer's default special
    tokens (its BOS, if any), trailing spaces of the context moved to the continuation, the continuation's tokens
    those that the whole string adds after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, requests, pad_id, batch_size=8, device=None, show=False, desc="loglikelihood",
                   fast_single_token=True):
    """[[log p(continuation | context) for each continuation] for each (context_ids, [continuation_ids, ...])].

    When every continuation of a request is one token, one forward over the context scores them all; otherwise
    each (context + continuation) is a row. Rows are left-padded so that the scored positions are the last ones
    and only their logits are computed (logits_to_keep)."""
    device = model_device(model, device)
    rows = []  # (request, continuation index or None for all, input ids, tokens to score)
    for r, (ctx, conts) in enumerate(requests):
        if not ctx or any(not c for c in conts):
            raise ConfigError(f"{desc}: request {r} has an empty context or continuation")
        if fast_single_token and all(len(c) == 1 for c in conts):
            rows.append((r, None, list(ctx), None))
        else:
            for j, c in enumerate(conts):
                rows.append((r, j, list(ctx) + list(c[:-1]), list(c)))
    out = [[0.0] * len(conts) for _, conts in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][2]))
    for batch in tqdm(index_batches(len(order), batch_size), desc=desc, disable=not show, leave=False):
        chosen = [rows[order[i]] for i in batch]
        ids, attn = left_pad([row[2] for row in chosen], pad_id, device)
        keep = max(1 if row[3] is None else len(row[3]) for row in chosen)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.double(), dim=-1)  # [B, keep, V]
        for b, (r, j, _, targets) in enumerate(chosen):
            if targets is None:
                for k, c in enumerate(requests[r][1]):
                    out[r][k] = float(logp[b, -1, c[0]])
            else:
                n = len(targets)
                picked = logp[b, keep - n:, :].gather(-1, torch.tensor(targets, device=device)[:, None])
                out[r][j] = float(picked.sum())
    return out
