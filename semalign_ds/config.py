"""One flat config object for a run: loaded from YAML or JSON, overridden from the command line, validated on
load (types and ranges, through pydantic), printed at start and saved with the run."""
from __future__ import annotations

import argparse
import json
import os
import typing
from typing import Annotated, ClassVar, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    pass


def _not_bool(value):
    # pydantic's lax mode reads true as 1; a boolean given for a number is a mistake, not a count
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _list_of_one(value):
    return [value] if isinstance(value, str) else value  # `--set report_to=wandb` means [wandb]


def _on_off(value):
    return ("on" if value else "off") if isinstance(value, bool) else value  # YAML 1.1 reads off as false


def _layer_objective(value):
    from semalign_ds.objectives import LAYER_OBJECTIVES  # the registry (imports torch: only when a config is made)
    if value not in LAYER_OBJECTIVES:
        raise ValueError(f"no layer objective {value!r}: one of {', '.join(LAYER_OBJECTIVES)}")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


def _f(default, description, **constraints):
    return Field(default, description=description, **constraints)


class Config(BaseModel):
    # extra="forbid": unknown keys are refused; allow_inf_nan=False: lr: .inf passes `gt=0` otherwise
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # --- models --------------------------------------------------------------------------------------------
    source: str = _f("embedded:smollm2-135m-instruct",
                    "local folder, hub id, \"embedded:NAME\", \"synthetic:NAME\" (random init of a real "
                    "shape), or a config.json (random init)")
    source_gguf_file: Optional[str] = _f(None, "a GGUF file inside `source`, loaded through transformers")
    target: Optional[str] = _f(None, "as `source`; or leave empty and set target_keep_layers")
    target_gguf_file: Optional[str] = _f(None, "a GGUF file inside `target`")
    target_keep_layers: Optional[list[Int]] = _f(
        None, "make the target by keeping these source layers (0-based, increasing)")
    target_depth: Literal["keep_layers", "block_importance"] = _f(
        "keep_layers", "how a target cut from the source chooses its layers: target_keep_layers, or the "
                       "target_num_layers of highest block importance (the last layer always kept)")
    target_num_layers: Optional[Int] = _f(None, "layers of a target cut from the source (null: as "
                                                "target_keep_layers, or all)", ge=1)
    target_hidden_size: Optional[Int] = _f(
        None, "width of a target cut from the source: the most important embedding channels (null: all)", ge=1)
    target_num_heads: Optional[Int] = _f(
        None, "query heads of a target cut from the source: whole KV groups are kept, so a multiple of the "
              "source's heads per KV head (null: from target_num_kv_heads, or all)", ge=1)
    target_num_kv_heads: Optional[Int] = _f(
        None, "KV heads (groups) of a target cut from the source, the most important per layer (null: from "
              "target_num_heads, or all)", ge=1)
    target_intermediate_size: Optional[Int] = _f(
        None, "MLP neurons of a target cut from the source, the most important per layer (null: all)", ge=1)
    prune_calibration_examples: Int = _f(
        32, "transfer examples whose forward passes rank the units of a pruned target", ge=1)
    tokenizer: Optional[str] = _f(None, "tokenizer folder or hub id; defaults to the source's")
    seed: Int = _f(0, "seed of random init, data order and sampling")
    data_seed: Optional[Int] = _f(
        None, "seed of the data drawn: the transfer subset (max_examples) and the validation split (null: seed). "
              "Runs of several seeds with one data_seed train on the same examples", ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "parameters and activations; losses accumulate in float32. float16 needs CUDA: refused at "
                   "load with device: cpu, and at run start when no GPU is visible")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "where the models run (auto: cuda when available)")
    lora_rank: Int = _f(0, "rank of LoRA adapters on each trained layer (0: train full weights)", ge=0)
    lora_alpha: Float = _f(32.0, "LoRA scaling numerator (scale = lora_alpha / lora_rank)", gt=0)
    lora_targets: list[str] = _f(["up_proj", "down_proj", "v_proj", "o_proj"],
                                "module names inside a layer that get LoRA adapters")
    # --- data ----------------------------------------------------------------------------------------------
    data: str = _f("embedded:stdlib", "jsonl/json file, datasets folder, hub id, or \"embedded:stdlib\"")
    data_format: Literal["auto", "prompt_response", "prompt_completion", "messages"] = _f(
        "auto", "row layout (auto: detected from the fields present)")
    prompt_field: str = _f("prompt", "field of the prompt")
    response_field: str = _f("response", "field of the response (prompt_response rows)")
    completion_field: str = _f("completion", "field of the completion (prompt_completion rows)")
    messages_field: str = _f("messages", "field of the chat turns (messages rows; loss on assistant turns)")
    data_split: str = _f("train", "split of a datasets folder or hub data set")
    max_examples: Optional[Int] = _f(None, "use at most this many transfer examples (null: all)", ge=1)
    max_seq_len: Int = _f(512, "sequences are cut to this many tokens", ge=1)
    max_row_chars: Int = _f(200000, "rows are cut to this many characters per field before tokenisation", ge=1)
    validation_fraction: Float = _f(0.0, "share of the transfer set held out for validation", ge=0, lt=0.5)
    loss_on: Literal["response", "all"] = _f("response", "tokens that carry the loss")
    chat_template: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = _f(
        "auto", "wrap prompts in the tokenizer's chat template")
    # --- attribution and pairing ---------------------------------------------------------------------------
    pairing: Literal["attribution", "uniform"] = _f("attribution", "how target layers are paired with source layers")
    pairing_lambda: Float = _f(0.5, "depth penalty of the attribution DP, on scores scaled to max 1", ge=0)
    attribution_examples: Optional[Int] = _f(None, "examples used for attribution (null: all)", ge=1)
    attribution_batch_size: Int = _f(2, "the most sequences per forward and backward in attribution, per rank "
                                        "(batches are cut by length to pad little; the backward holds every "
                                        "layer's activations of them)", ge=1)
    attribution_recompute: bool = _f(False, "attribution's backward recomputes each source layer instead of keeping "
                                            "its activations: one layer's activations for one more forward")
    # --- alignment -----------------------------------------------------------------------------------------
    alignment_map: Literal["semantic", "least_squares"] = _f(
        "semantic", "semantic: M = S_t S_s^T (the paper); least_squares: M = pinv(W_t) W_s")
    cache_shard_examples: Int = _f(64, "examples per cache shard: the unit of resume", ge=1)
    normalize_source: bool = _f(True, "logit-lens normalise the source state before mapping")
    basis_dtype: Literal["float64", "float32"] = _f("float64", "dtype of pinv for the semantic bases")
    # --- frontier training ---------------------------------------------------------------------------------
    method: Literal["semalign", "layerwise", "output_kd", "finetune"] = _f(
        "semalign", "semalign; layerwise (baseline: cosine to the source state through a learned projection); "
                    "output_kd (baseline: KL at the output only, all layers at once); finetune (baseline: the "
                    "labels' cross-entropy only, all layers at once)")
    layer_objective: Annotated[str, AfterValidator(_layer_objective)] = _f(
        "fisher", "loss of stages k < L_t, a name in semalign_ds/objectives.py: fisher (the Fisher surrogate), "
                  "cosine (v1), geometry (v2: token-token residual geometry), ...")
    fisher_topk: Int = _f(0, "keep the top-k of p* per position in the cache (0: the exact full vocabulary)", ge=0)
    topk_tail: Literal["renormalize", "bucket"] = _f("renormalize",
                                                     "top-k Fisher: how the tail mass outside the top k is treated")
    stage_steps: Int = _f(100, "optimizer steps per frontier stage (0: no stages, the joint phase trains the target "
                                 "as it starts)", ge=0)
    batch_size: Int = _f(8, "sequences per optimizer step (global, over all ranks and accumulation steps)", ge=1)
    grad_accum_steps: Int = _f(1, "micro-batches accumulated per optimizer step", ge=1)
    lr: Float = _f(1e-4, "peak learning rate (AdamW)", gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = _f("constant", "learning rate within each phase")
    warmup_steps: Int = _f(0, "linear warm-up steps at the start of each phase", ge=0)
    min_lr_ratio: Float = _f(0.0, "final learning rate of linear/cosine decay, as a share of lr", ge=0, le=1)
    weight_decay: Float = _f(0.0, "AdamW weight decay", ge=0)
    grad_clip: Float = _f(1.0, "gradient norm clip (0: off)", ge=0)
    temperature: Float = _f(1.0, "softmax temperature tau of the losses", gt=0)
    fisher_weight: Float = _f(0.0, "layer objective weight in the output stage", ge=0)
    ce_weight: Float = _f(0.0, "label cross-entropy weight in the output stage", ge=0)
    joint_steps: Int = _f(0, "steps of a joint phase after the stages, all layers trainable (0: none)", ge=0)
    joint_layer_weight: Float = _f(1.0, "initial weight of the summed layer objectives in the joint phase", ge=0)
    joint_lr: Optional[Float] = _f(None, "learning rate of the joint phase (null: lr)", gt=0)
    loss_backend: Literal["auto", "naive", "chunked", "triton"] = _f("auto", "implementation of the losses")
    checkpoint_every: Int = _f(50, "steps between in-stage checkpoints (0: only at stage ends)", ge=0)
    # --- evaluation ----------------------------------------------------------------------------------------
    eval_data: Optional[str] = _f("embedded:humaneval", "prompt/response set whose response NLL is reported "
                                                       "(null: no evaluation)")
    eval_max_examples: Optional[Int] = _f(None, "evaluate at most this many examples (null: all)", ge=1)
    eval_max_seq_len: Int = _f(1024, "evaluation sequences are cut here (HumanEval's longest is 581 tokens)", ge=1)
    eval_batch_size: Int = _f(8, "sequences per forward in evaluation and caching, per rank", ge=1)
    # --- distribution --------------------------------------------------------------------------------------
    ds_source_config: Optional[str] = _f(None, "DeepSpeed JSON for the source (ZeRO-3 inference)")
    ds_target_config: Optional[str] = _f(None, "DeepSpeed JSON for the target (ZeRO-2 stages)")
    source_sharding: Literal["zero3", "replicated", "auto"] = _f(
        "zero3", "with several ranks, the source partitioned under ZeRO-3, or whole on every rank (replicated: "
                 "data parallel, nothing gathered); auto: the one the dry run finds smaller per rank")
    source_shared_memory: bool = _f(True, "on CPU, ranks on one host keep the ZeRO-3 source's partitions (and its "
                                          "vocabulary rows) in files in /dev/shm and read each other's in place "
                                          "instead of gathering copies, so attribution's ranks run apart (false: "
                                          "gathered as on several hosts)")
    collective_timeout_minutes: Float = _f(30.0, "a rank that waits longer on the others stops with an error", gt=0)
    # --- output --------------------------------------------------------------------------------------------
    output_dir: str = _f("runs/default", "run directory; an existing run there is resumed")
    log_every: Int = _f(10, "steps between logged metrics", ge=1)
    report_to: Annotated[list[Literal["tensorboard", "wandb", "mlflow", "none"]],
                         BeforeValidator(_list_of_one)] = _f(["tensorboard"], "metric trackers (none: JSON lines only)")

    # the sections above, by their first key (for --help)
    SECTIONS: ClassVar[dict] = {"source": "models", "data": "data", "pairing": "attribution and pairing",
                                "alignment_map": "alignment", "method": "frontier training",
                                "eval_data": "evaluation", "ds_source_config": "distribution", "output_dir": "output"}

    # keys that cut the target from the source (instead of naming a `target` model)
    CUT_KEYS: ClassVar[tuple] = ("target_keep_layers", "target_num_layers", "target_hidden_size",
                                 "target_num_heads", "target_num_kv_heads", "target_intermediate_size")
    # keys that change nothing computed: a resumed run may differ in these
    RUN_ONLY_KEYS: ClassVar[tuple] = (
        "output_dir", "log_every", "device", "eval_batch_size", "attribution_batch_size", "checkpoint_every",
        "loss_backend", "collective_timeout_minutes", "report_to", "source_sharding",
        "source_shared_memory")
    # keys that change only how the target trains, not what the source side computes (evaluation before training,
    # attribution, alignment; the cache too, where cache.contents agrees)
    TRAINING_KEYS: ClassVar[tuple] = (
        "method", "layer_objective", "fisher_topk", "topk_tail", "stage_steps", "batch_size", "grad_accum_steps", "lr",
        "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "temperature", "fisher_weight",
        "ce_weight", "joint_steps", "joint_layer_weight", "joint_lr", "lora_rank", "lora_alpha", "lora_targets")

    @property
    def rows_seed(self) -> int:
        """The seed of the data drawn (data_seed, or seed when it is null)."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def trains_whole_model(self) -> bool:
        """Whether the run trains every target layer at once on the output terms alone (output KD, fine-tuning)."""
        return self.method in ("output_kd", "finetune")

    @property
    def frontier_stages(self) -> bool:
        """Whether the run trains frontier stages, one layer at a time (and so computes and writes frontiers)."""
        return not self.trains_whole_model and self.stage_steps > 0

    def check(self):
        """Checks across keys. Not run by Config() itself, whose defaults name no target: from_dict runs them."""
        cut = [name for name in self.CUT_KEYS if getattr(self, name) is not None]
        if self.target_depth != "keep_layers":
            cut.append("target_depth")
        if (self.target is None) == (not cut):
            raise ValueError("set exactly one of `target` (a model) and a target cut from the source (keys "
                             "target_keep_layers, e.g. [0, 3, 6, 29], or target_depth: block_importance with "
                             "target_num_layers, and optionally target_hidden_size, target_num_heads, "
                             f"target_num_kv_heads, target_intermediate_size); got target {self.target!r} and "
                             f"{', '.join(cut) or 'no cut keys'}")
        kl = self.target_keep_layers
        if kl is not None and (not kl or min(kl) < 0 or sorted(set(kl)) != list(kl)):
            raise ValueError(f"target_keep_layers must be strictly increasing non-negative layer indices, got {kl}")
        if self.target_depth == "block_importance" and (kl is not None or self.target_num_layers is None):
            raise ValueError("target_depth block_importance chooses the layers itself: set target_num_layers "
                             "(how many) and leave target_keep_layers null")
        if self.target_num_layers is not None and kl is None and self.target_depth == "keep_layers":
            raise ValueError(f"target_num_layers {self.target_num_layers} needs a choice of layers: set "
                             f"target_keep_layers (which ones) or target_depth: block_importance")
        if kl is not None and self.target_num_layers not in (None, len(kl)):
            raise ValueError(f"target_num_layers {self.target_num_layers} disagrees with target_keep_layers "
                             f"({len(kl)} layers): set one of them")
        heads, kv = self.target_num_heads, self.target_num_kv_heads
        if heads is not None and kv is not None and heads % kv:
            raise ValueError(f"target_num_kv_heads {kv} does not divide target_num_heads {heads}: each KV head "
                             f"serves a whole number of query heads; allowed target_num_kv_heads: "
                             f"{', '.join(str(k) for k in range(1, heads + 1) if heads % k == 0)}")
        if self.dtype == "float16" and self.device == "cpu":
            raise ValueError("dtype float16 needs a GPU, but device is cpu: use bfloat16 or float32 on CPU")
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"report_to {self.report_to}: `none` cannot be combined with a tracker")
        if self.lora_rank > 0 and not self.lora_targets:
            raise ValueError("lora_rank > 0 needs at least one module name in lora_targets")
        if self.joint_steps > 0 and self.method != "semalign":
            raise ValueError(f"joint_steps {self.joint_steps} needs method semalign (the joint phase adds the aligned "
                             f"layer objectives), but method is {self.method}: set joint_steps=0")
        if self.trains_whole_model and self.fisher_weight > 0:
            raise ValueError(f"fisher_weight {self.fisher_weight} adds the layer objective to the output stage, but "
                             f"method {self.method} trains the output terms only: set fisher_weight=0")
        if self.stage_steps == 0 and (self.method != "semalign" or self.joint_steps == 0):
            raise ValueError(f"stage_steps 0 trains nothing with method {self.method} and joint_steps "
                             f"{self.joint_steps}: set stage_steps >= 1, or method semalign with joint_steps >= 1")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum_steps "
                             f"{self.grad_accum_steps}: an optimizer step is grad_accum_steps equal micro-batches")
        if self.source_sharding == "replicated" and self.ds_source_config is not None:
            raise ValueError(f"ds_source_config {self.ds_source_config!r} configures the source's ZeRO-3 engine, but "
                             f"source_sharding is replicated (no engine): drop one of them")
        for name in ("ds_source_config", "ds_target_config"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file {path!r}")
        return self

    def to_dict(self):
        return self.model_dump()

    def __str__(self):
        width = max(map(len, type(self).model_fields))
        return "\n".join(f"  {name:<{width}} = {getattr(self, name)!r}" for name in type(self).model_fields)

    def differs(self, other: "Config"):
        """Keys whose values differ, ignoring RUN_ONLY_KEYS; data_seed by the seed it stands for (null: seed)."""
        def value(cfg, name):
            return cfg.rows_seed if name == "data_seed" else getattr(cfg, name)
        return [name for name in type(self).model_fields if name not in self.RUN_ONLY_KEYS
                and value(self, name) != value(other, name)]


def check_device(cfg: Config):
    """Run-start checks of what only the machine can tell (load cannot: the config may be meant for another)."""
    import torch
    if cfg.device != "cpu" and not torch.cuda.is_available():
        if cfg.dtype == "float16":
            raise ConfigError("dtype float16 needs a GPU and none is visible here: use bfloat16 or float32")
        if cfg.device == "cuda":
            raise ConfigError("device cuda, but no GPU is visible here: use device auto or cpu")


def allowed(name: str) -> str:
    """What key `name` accepts, in words: 'an integer >= 1', 'one of auto, cpu, cuda', 'a number > 0, or null'."""
    info = Config.model_fields[name]
    tp, nullable = info.annotation, False
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        tp, nullable = next(a for a in typing.get_args(tp) if a is not type(None)), True
    bounds = [f"{op} {getattr(m, attr)}" for m in info.metadata for attr, op in
              (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if hasattr(m, attr)]
    return " ".join([_describe(tp), " and ".join(bounds)]).strip() + (", or null" if nullable else "")


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _describe(args[0])
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return "a list, each " + _describe(args[0])
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _errors(err: ValidationError, values: dict, origin: str, overridden=()) -> str:
    lines = []
    for e in err.errors():
        key = str(e["loc"][0])
        constraint = e["msg"].removeprefix("Value error, ")
        where = "overrides" if key in overridden else origin
        lines.append(f"{where}: {key}={values.get(key)!r} is not valid ({constraint}); {key} must be "
                     f"{allowed(key)}")
    return "\n".join(lines)


def from_dict(values: dict, origin="config", overridden=()) -> Config:
    """A validated Config; `overridden`: keys that came from the command line, named as such in errors."""
    known = Config.model_fields
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in {origin}: {', '.join(unknown)}. Valid keys: {', '.join(known)}")
    try:
        cfg = Config(**values)
    except ValidationError as err:
        raise ConfigError(_errors(err, values, origin, overridden)) from None
    try:
        return cfg.check()
    except ValueError as err:
        raise ConfigError(f"{origin}: {err}") from None


def load(path: str | None = None, overrides: dict | None = None, base: dict | None = None) -> Config:
    """Config from a YAML/JSON file (or `base`, or the defaults), with `overrides` applied on top, validated."""
    values = dict(base or {})
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                values = (json.load(f) if path.endswith(".json") else yaml.safe_load(f)) or {}
            except (ValueError, yaml.YAMLError) as err:
                raise ConfigError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {err}") \
                    from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        base = os.path.dirname(os.path.abspath(path))
        for key in ("source", "target", "tokenizer", "data", "eval_data", "ds_source_config", "ds_target_config"):
            if key in values:
                values[key] = _relative_to(values[key], base)
    values.update(overrides or {})
    return from_dict(values, origin=path or "overrides", overridden=tuple(overrides or ()))


def _relative_to(value, base):
    """Paths in a config file that start with ./ or ../ are relative to the file, not to the working directory."""
    if isinstance(value, str) and value.startswith(("./", "../")):
        return os.path.normpath(os.path.join(base, value))
    return value


def parse_value(key: str, text: str):
    """A command-line string as a value for `key`: YAML syntax (numbers, true/false, null, [lists]); types are
    coerced and checked when the config is made (YAML 1.1 reads 2e-4 as a string: it becomes a float there)."""
    if key not in Config.model_fields:
        raise ConfigError(f"unknown key {key!r}. Valid keys: {', '.join(Config.model_fields)}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}={text}: not a YAML value ({err})") from None


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--config", help="YAML or JSON config file (keys of semalign_ds.config.Config)")
    parser.add_argument("--output-dir", help="run directory; an existing run there is resumed")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, YAML syntax (repeatable), e.g. --set stage_steps=20")


def parse_sets(items) -> dict:
    """{key: value} of --set KEY=VALUE items, each value read as its key's YAML (parse_value)."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        overrides[key.strip()] = parse_value(key.strip(), text)
    return overrides


def from_args(args, base: dict | None = None) -> Config:
    """The config of a command line: --config FILE (else `base`), then --output-dir and --set overrides."""
    overrides = parse_sets(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    return load(args.config, overrides, base if args.config is None else None)
