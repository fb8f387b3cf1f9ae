"""One flat config object for a run: loaded from YAML or JSON, overridden from the command line, validated on
load, printed at start and saved with the run."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, fields
from typing import Optional

import yaml


@dataclass
class Config:
    # --- models --------------------------------------------------------------------------------------------
    source: str = "embedded:smollm2-135m-instruct"  # local folder, hub id, "embedded:NAME", or a config.json (random init)
    source_gguf_file: Optional[str] = None  # a GGUF file inside `source`, loaded through transformers
    target: Optional[str] = None  # as `source`; or leave empty and set target_keep_layers
    target_gguf_file: Optional[str] = None
    target_keep_layers: Optional[list] = None  # make the target by keeping these source layers (0-based)
    tokenizer: Optional[str] = None  # defaults to the source's
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16: parameters and activations; losses accumulate in float32
    device: str = "auto"  # auto | cpu | cuda
    # --- data ----------------------------------------------------------------------------------------------
    data: str = "embedded:stdlib"  # jsonl/json file, datasets folder, hub id, or "embedded:stdlib"
    prompt_field: str = "prompt"
    response_field: str = "response"
    data_split: str = "train"
    max_examples: Optional[int] = None
    max_seq_len: int = 512
    loss_on: str = "response"  # response | all
    chat_template: str = "auto"  # auto | on | off: wrap prompts in the tokenizer's chat template
    # --- attribution and pairing ---------------------------------------------------------------------------
    pairing: str = "attribution"  # attribution | uniform
    pairing_lambda: float = 0.5  # depth penalty of the attribution DP, on scores scaled to max 1
    attribution_examples: Optional[int] = None  # examples used for attribution (default: all)
    # --- alignment -----------------------------------------------------------------------------------------
    cache_shard_examples: int = 64  # examples per cache shard: the unit of resume
    recompute_corrupt: bool = False  # recompute cache shards whose checksum fails instead of stopping
    normalize_source: bool = True  # logit-lens normalise the source state before mapping
    basis_dtype: str = "float64"  # float64 | float32: dtype of pinv for the semantic bases
    # --- frontier training ---------------------------------------------------------------------------------
    method: str = "semalign"  # semalign | layerwise (cosine to the source state through a learned projection,
    #                           baseline) | output_kd (KL at the output only, all layers at once, baseline)
    stage_steps: int = 100  # optimizer steps per frontier stage
    batch_size: int = 8  # sequences per optimizer step (global)
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    fisher_weight: float = 0.0  # layer objective weight in the output stage
    ce_weight: float = 0.0  # label cross-entropy weight in the output stage
    loss_backend: str = "auto"  # auto | naive | chunked | triton
    checkpoint_every: int = 50  # steps between in-stage checkpoints (0: only at stage ends)
    # --- evaluation ----------------------------------------------------------------------------------------
    eval_data: Optional[str] = "embedded:humaneval"  # prompt/response set whose response NLL is reported
    eval_max_examples: Optional[int] = None
    eval_max_seq_len: int = 1024  # evaluation sequences are cut here (HumanEval's longest is 581 tokens)
    eval_batch_size: int = 8
    # --- distribution --------------------------------------------------------------------------------------
    ds_source_config: Optional[str] = None  # DeepSpeed JSON for the source (ZeRO-3 inference)
    ds_target_config: Optional[str] = None  # DeepSpeed JSON for the target (ZeRO-2 stages)
    collective_timeout_minutes: float = 30.0  # a rank that waits longer on the others stops with an error
    # --- output --------------------------------------------------------------------------------------------
    output_dir: str = "runs/default"
    log_every: int = 10

    # keys that change nothing computed: a resumed run may differ in these
    RUN_ONLY_KEYS = ("output_dir", "log_every", "device", "eval_batch_size", "checkpoint_every", "loss_backend",
                     "recompute_corrupt", "collective_timeout_minutes")

    def to_dict(self):
        return dataclasses.asdict(self)

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def __str__(self):
        width = max(len(f.name) for f in fields(self))
        return "\n".join(f"  {f.name:<{width}} = {getattr(self, f.name)!r}" for f in fields(self))

    def differs(self, other: "Config"):
        """Keys whose values differ, ignoring RUN_ONLY_KEYS."""
        return [f.name for f in fields(self) if f.name not in self.RUN_ONLY_KEYS
                and getattr(self, f.name) != getattr(other, f.name)]

    # ---------------------------------------------------------------------------------------------------------
    def validate(self):
        _choice("dtype", self.dtype, ("float32", "bfloat16"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("loss_on", self.loss_on, ("response", "all"))
        _choice("chat_template", self.chat_template, ("auto", "on", "off"))
        _choice("pairing", self.pairing, ("attribution", "uniform"))
        _choice("method", self.method, ("semalign", "layerwise", "output_kd"))
        _choice("basis_dtype", self.basis_dtype, ("float64", "float32"))
        _choice("loss_backend", self.loss_backend, ("auto", "naive", "chunked", "triton"))
        if (self.target is None) == (self.target_keep_layers is None):
            raise ConfigError("set exactly one of `target` (a model) and `target_keep_layers` (source layers to "
                              "keep, e.g. [0, 3, 6, 29])")
        if self.target_keep_layers is not None:
            kl = self.target_keep_layers
            if not kl or any(not isinstance(i, int) or i < 0 for i in kl) or sorted(set(kl)) != list(kl):
                raise ConfigError(f"target_keep_layers must be strictly increasing non-negative layer indices, "
                                  f"got {kl}")
        for name in ("max_seq_len", "stage_steps", "batch_size", "eval_batch_size", "log_every",
                     "cache_shard_examples", "eval_max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_examples", "attribution_examples", "eval_max_examples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {v}")
        for name in ("lr", "temperature", "collective_timeout_minutes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "fisher_weight", "ce_weight", "pairing_lambda",
                     "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("ds_source_config", "ds_target_config"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{name}: no such file {path!r}")
        return self


class ConfigError(ValueError):
    pass


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; use one of {', '.join(allowed)}")


def _field_types():
    return {f.name: f.type for f in fields(Config)}


def from_dict(values: dict, origin="config") -> Config:
    known = _field_types()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in {origin}: {', '.join(unknown)}. Valid keys: {', '.join(known)}")
    return Config(**values).validate()


def load(path: str | None = None, overrides: dict | None = None, base: dict | None = None) -> Config:
    """Config from a YAML/JSON file (or `base`, or the defaults), with `overrides` applied on top, validated."""
    values = dict(base or {})
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            values = (json.load(f) if path.endswith(".json") else yaml.safe_load(f)) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        base = os.path.dirname(os.path.abspath(path))
        for key in ("source", "target", "tokenizer", "data", "eval_data", "ds_source_config", "ds_target_config"):
            if key in values:
                values[key] = _relative_to(values[key], base)
    values.update(overrides or {})
    return from_dict(values, origin=path or "overrides")


def _relative_to(value, base):
    """Paths in a config file that start with ./ or ../ are relative to the file, not to the working directory."""
    if isinstance(value, str) and value.startswith(("./", "../")):
        return os.path.normpath(os.path.join(base, value))
    return value


def parse_value(key: str, text: str):
    """A command-line string as a value for `key`: YAML syntax (numbers, true/false, null, [lists])."""
    if key not in _field_types():
        raise ConfigError(f"unknown key {key!r}. Valid keys: {', '.join(_field_types())}")
    return yaml.safe_load(text)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--config", help="YAML or JSON config file (keys of semalign_ds.config.Config)")
    parser.add_argument("--output-dir", help="run directory; an existing run there is resumed")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, YAML syntax (repeatable), e.g. --set stage_steps=20")


def from_args(args, base: dict | None = None) -> Config:
    """The config of a command line: --config FILE (else `base`), then --output-dir and --set overrides."""
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        overrides[key.strip()] = parse_value(key.strip(), text)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    return load(args.config, overrides, base if args.config is None else None)


