"""Export of a trained target in Hugging Face format, with the run's plan, config and metrics beside it.

transformers 5 writes files that older readers misread: rope settings only under `rope_parameters` (transformers
4.x then loads silently with rope_theta 10000; llama.cpp's converter and vLLM read `rope_theta`/`rope_scaling`),
and `tokenizer_class: TokenizersBackend`, a class 4.x does not have. The export therefore also writes the legacy
keys, which transformers 5 ignores where it has the new ones.
"""
from __future__ import annotations

import json
import os
import shutil

from semalign_ds.rundir import sha256, write_json, write_text

CHECKSUMS = "semalign_checksums.json"
# transformers 4.x's name for a tokenizer that is only a tokenizer.json
LEGACY_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend", "PythonBackend", None}


def save_hf(model, tokenizer, folder, extras: dict | None = None):
    """Write `model` and `tokenizer` into `folder` (replacing it only once the new copy is complete), with each
    extras[name] (a JSON-able value) as the file `name`."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _rewrite_json(os.path.join(tmp, "config.json"), legacy_config)
    _rewrite_json(os.path.join(tmp, "tokenizer_config.json"), legacy_tokenizer_config)
    for name, value in (extras or {}).items():
        write_json(os.path.join(tmp, name), value)
    sums = {name: sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
    write_json(os.path.join(tmp, CHECKSUMS), sums)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def intact(folder):
    """True when an exported folder holds every file it was written with, unchanged."""
    try:
        with open(os.path.join(folder, CHECKSUMS)) as f:
            sums = json.load(f)
        return all(sha256(os.path.join(folder, name)) == digest for name, digest in sums.items())
    except (OSError, ValueError):
        return False

def _rewrite_json(path, change):
    if not os.path.isfile(path):
        return
    with open(path) as f:
        data = json.load(f)
    write_text(path, json.dumps(change(data), indent=2, sort_keys=True) + "\n")


def legacy_config(config: dict) -> dict:
    """config.json with the keys transformers 4.x, llama.cpp's converter and vLLM read, beside transformers 5's."""
    out = dict(config)
    rope = config.get("rope_parameters")
    if rope:
        if "full_attention" in rope:  # per layer type (Gemma 3): global layers, and local ones at another base
            local = rope.get("sliding_attention", {})
            if "rope_theta" in local:
                out.setdefault("rope_local_base_freq", local["rope_theta"])
            rope = rope["full_attention"]
        if "rope_theta" in rope:
            out.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if scaling.get("rope_type", "default") == "default":
            out.setdefault("rope_scaling", None)
        else:  # 4.x and llama.cpp read the method under "type" too
            out.setdefault("rope_scaling", {"type": scaling["rope_type"], **scaling})
    if "dtype" in config:
        out.setdefault("torch_dtype", config["dtype"])
    return out


def legacy_tokenizer_config(config: dict) -> dict:
    """tokenizer_config.json naming a class transformers 4.x has, and its list of extra special tokens under the
    key 4.x reads (4.x takes `extra_special_tokens` as a dict of named tokens)."""
    out = dict(config)
    if out.get("tokenizer_class") in _V5_ONLY_TOKENIZER_CLASSES:
        out["tokenizer_class"] = LEGACY_TOKENIZER_CLASS
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        if extra:
            out.setdefault("additional_special_tokens", extra)
    return out
