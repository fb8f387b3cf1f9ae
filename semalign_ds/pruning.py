"""Cutting a smaller target from the source by width and depth, Minitron-style (docs/method.md, section 7).

1. Importance, from forward passes of the source over a calibration slice of the transfer set (padding excluded),
   each score a mean over real tokens of a squared magnitude (the activation energy of the unit):
   - embedding channel c: mean x_c^2 of the outputs of every norm layer (input and post-attention RMSNorm of each
     layer, and the final norm), summed over those 2L + 1 norms;
   - KV group g of layer l (its KV head with its n_heads / n_kv query heads): mean ||y_g||^2, y_g being the
     group's query heads' attention outputs before o_proj, concatenated;
   - MLP neuron j of layer l: mean (act(gate_j x) up_j x)^2, the input of down_proj;
   - block importance of layer l: BI_l = 1 - mean cos(h_in, h_out) of the residual stream around the layer.
2. Selection: the top channels (one set for the whole residual stream), the top KV groups and neurons of each
   kept layer, kept units in source order; layers from target_keep_layers, or the most important by BI (the last
   layer always kept, source order).
3. Slicing, tensor by tensor from the source's safetensors files (no process holds the whole source to slice
   it): embed[:, C], every norm weight[C], q/k/v_proj[rows of G's heads, C], o_proj[C, columns of G's query
   heads], gate/up_proj[J, C], down_proj[C, J], lm_head[:, C]; biases as their rows. Qwen 3's q_norm/k_norm act
   on one head_dim and stay whole; head_dim stays the source's and is written into the target's config.

Heads and neurons drop out exactly: the pruned model equals the source with those units' outputs zeroed. Pruned
channels do not: RMSNorm then averages over |C| channels, which changes the scale (distillation heals it).

The importance pass runs the source model whole (as attribution does); the calibration examples are few.
`python -m semalign_ds.pruning --config RUN.yaml --out DIR` writes the pruned target for a run config, which the
run then names as `target: DIR`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time

import torch

from semalign_ds.config import ConfigError

# families whose layers are Llama-shaped: q/k/v/o_proj, gate/up/down_proj, two RMSNorms per layer, rotary
# positions, logits = lm_head(norm(h))
PRUNABLE = ("llama", "mistral", "qwen2", "qwen3")
WIDTH_KEYS = ("target_hidden_size", "target_num_heads", "target_num_kv_heads", "target_intermediate_size")


@dataclasses.dataclass
class Shape:
    """The target's shape as the config names it; None: the source's (all layers, or target_keep_layers)."""
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    keep_layers: list[int] | None = None
    depth: str = "keep_layers"  # or "block_importance"

    @classmethod
    def of(cls, cfg):
        return cls(cfg.target_hidden_size, cfg.target_num_heads, cfg.target_num_kv_heads,
                   cfg.target_intermediate_size, cfg.target_num_layers, cfg.target_keep_layers, cfg.target_depth)

    @property
    def cuts_width(self):
        return any(v is not None for v in (self.hidden_size, self.num_heads, self.num_kv_heads,
                                           self.intermediate_size))

    @property
    def needs_calibration(self):
        return self.cuts_width or self.depth == "block_importance"


@dataclasses.dataclass
class Kept:
    """Source indices of what the target keeps, each list in source order."""
    channels: list[int]
    layers: list[int]
    groups: dict[int, list[int]]   # source layer -> kept KV groups
    neurons: dict[int, list[int]]  # source layer -> kept MLP neurons


def check_shape(config, shape: Shape) -> Shape:
    """The shape with every field filled from the source's config; refuses, before any weights load, a family
    that cannot be width-pruned and a shape the source cannot give, naming the key and the allowed values."""
    arch = config.model_type
    if arch not in PRUNABLE:
        raise ConfigError(
            f"width and block-importance pruning ({', '.join(WIDTH_KEYS)}, target_depth: block_importance) need a "
            f"Llama-shaped source (model types {', '.join(PRUNABLE)}: separate q/k/v/o and gate/up/down "
            f"projections, RMSNorm); the source is {arch!r}. Use target_keep_layers alone, or give a `target`")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv
    n_layers = config.num_hidden_layers

    def at_most(key, value, limit, what):
        if value is not None and value > limit:
            raise ConfigError(f"{key} {value} is larger than the source's {what} {limit}: pruning only removes "
                              f"units; allowed 1..{limit}")
        return limit if value is None else value

    hidden = at_most("target_hidden_size", shape.hidden_size, config.hidden_size, "hidden_size")
    intermediate = at_most("target_intermediate_size", shape.intermediate_size, config.intermediate_size,
                           "intermediate_size")
    num_kv = at_most("target_num_kv_heads", shape.num_kv_heads, kv, "num_key_value_heads")
    num_heads = at_most("target_num_heads", shape.num_heads, heads, "num_attention_heads")
    if shape.num_kv_heads is None and shape.num_heads is not None:
        num_kv = num_heads // group
    elif shape.num_heads is None and shape.num_kv_heads is not None:
        num_heads = num_kv * group
    # whole KV groups are kept, each with all its query heads: the target keeps the source's heads per group
    if num_heads != num_kv * group or num_kv < 1:
        allowed = ", ".join(f"{k * group} heads with {k} KV heads" for k in range(1, kv + 1))
        raise ConfigError(f"target_num_heads {num_heads} with target_num_kv_heads {num_kv}: the source has {heads} "
                          f"query heads in {kv} KV groups of {group}, and whole groups are kept, so "
                          f"target_num_heads must be {group} x target_num_kv_heads; allowed: {allowed}")
    if arch == "llama" and hidden % num_heads:
        # the attention itself does not need it (head_dim is explicit), but transformers' LlamaConfig refuses it
        raise ConfigError(f"target_hidden_size {hidden} is not a multiple of target_num_heads {num_heads}, which "
                          f"transformers' LlamaConfig requires: allowed target_hidden_size "
                          f"{num_heads}, {2 * num_heads}, ..., {config.hidden_size // num_heads * num_heads}")
    if shape.depth == "block_importance":
        if shape.num_layers is None or not 1 <= shape.num_layers <= n_layers:
            raise ConfigError(f"target_depth block_importance needs target_num_layers in 1..{n_layers} (the "
                              f"source's layers), got {shape.num_layers}")
        layers, keep = shape.num_layers, None
    elif shape.keep_layers is not None:
        keep = list(shape.keep_layers)
        if keep[-1] >= n_layers:
            raise ConfigError(f"target_keep_layers {keep} names layer {keep[-1]}, but the source has only "
                              f"{n_layers} layers (0..{n_layers - 1})")
        layers = len(keep)
    else:
        layers = at_most("target_num_layers", shape.num_layers, n_layers, "num_hidden_layers")
        if layers != n_layers:
            raise ConfigError(f"target_num_layers {layers} needs a choice of layers: set target_keep_layers (a list of "
                              f"{layers} source layers) or target_depth: block_importance")
        keep = list(range(n_layers))
    checked = Shape(hidden, num_heads, num_kv, intermediate, layers, keep, shape.depth)
    _validate(shape_config(config, checked))  # whatever else the family's config class requires of the sizes
    return checked


def shape_config(config, shape: Shape):
    """The config of a target of a checked `shape` cut from a source of `config` (which units are kept does not
    change it: only counts matter; layers by block importance stand in as the first ones)."""
    layers = shape.keep_layers if shape.keep_layers is not None else list(range(shape.num_layers))
    return pruned_config(config, Kept(list(range(shape.hidden_size)), layers, {0: list(range(shape.num_kv_heads))},
                                      {0: list(range(shape.intermediate_size))}))


def _validate(target):
    """Refuse a target config that transformers would refuse on save or load, before any weights are read."""
    try:
        target.validate() if hasattr(target, "validate") else None
    except Exception as err:  # huggingface_hub's StrictDataclassError is no ValueError
        raise ConfigError(f"the pruned target's config is refused by transformers' {type(target).__name__} "
                          f"({err}); change target_hidden_size, target_num_heads, target_num_kv_heads or "
                          f"target_intermediate_size") from None


# ---------------------------------------------------------------------------------------------------------------
# importance

@torch.no_grad()
def importance(model, batches):
    """Per-unit scores of `model` (Llama-shaped) over `batches` of (input_ids, attention_mask), padding excluded:
    {"channels": [d], "groups": [L, n_kv], "neurons": [L, I], "blocks": [L]}, float64 (see the module doc)."""
    from semalign_ds.models import Adapter
    adapter = Adapter(model)
    config, layers = model.config, adapter.layers
    n_layers, d = len(layers), adapter.width
    n_kv = config.num_key_value_heads
    device = next(model.parameters()).device
    zeros = dict(dtype=torch.float64, device=device)  # sums of squares over many tokens: float64
    sums = {"channels": torch.zeros(d, **zeros), "groups": torch.zeros(n_layers, n_kv, **zeros),
            "neurons": torch.zeros(n_layers, config.intermediate_size, **zeros),
            "blocks": torch.zeros(n_layers, **zeros)}
    real = {}  # the current batch's [B, T] bool mask of real tokens
    h_in = {}

    def tokens(x):
        return x[real["mask"]].to(torch.float64)  # [N, width]: real positions only

    def on_norm(_m, _args, out):
        sums["channels"].add_(tokens(out).pow(2).sum(0))

    def on_o_proj(i):
        def hook(_m, args):
            y = tokens(args[0])
            sums["groups"][i].add_(y.view(y.shape[0], n_kv, -1).pow(2).sum((0, 2)))
        return hook

    def on_down_proj(i):
        def hook(_m, args):
            sums["neurons"][i].add_(tokens(args[0]).pow(2).sum(0))
        return hook

    def on_layer_in(i):
        def hook(_m, args, kwargs):
            h_in[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def on_layer_out(i):
        def hook(_m, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(tokens(h_in.pop(i)), tokens(h), dim=-1)
            sums["blocks"][i].add_((1 - cos).sum())
        return hook

    hooks = [adapter.norm.register_forward_hook(on_norm)]
    for i, layer in enumerate(layers):
        hooks += [layer.input_layernorm.register_forward_hook(on_norm),
                  layer.post_attention_layernorm.register_forward_hook(on_norm),
                  layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)),
                  layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)),
                  layer.register_forward_pre_hook(on_layer_in(i), with_kwargs=True),
                  layer.register_forward_hook(on_layer_out(i))]
    count = 0
    try:
        for ids, mask in batches:
            ids, mask = ids.to(device), mask.to(device)
            real["mask"] = mask.bool()
            count += int(real["mask"].sum())
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    if count == 0:
        raise ConfigError("pruning calibration saw no tokens: give at least one non-empty example")
    return {k: (v / count).cpu() for k, v in sums.items()}


def block_order(blocks, num_layers):
    """The `num_layers` layers of highest block importance, the last layer always among them, in source order."""
    last = blocks.numel() - 1
    others = torch.argsort(blocks[:last], descending=True, stable=True)[:num_layers - 1]
    return sorted(others.tolist()) + [last]


def _top(scores, k):
    return sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist())


def select(scores, shape: Shape) -> Kept:
    """What a checked shape keeps, given importance scores."""
    layers = block_order(scores["blocks"], shape.num_layers) if shape.depth == "block_importance" \
        else list(shape.keep_layers)
    return Kept(channels=_top(scores["channels"], shape.hidden_size),
                layers=layers,
                groups={i: _top(scores["groups"][i], shape.num_kv_heads) for i in layers},
                neurons={i: _top(scores["neurons"][i], shape.intermediate_size) for i in layers})


# ---------------------------------------------------------------------------------------------------------------
# slicing

_LAYER = re.compile(r"^(?P<pre>.*\.layers\.)(?P<i>\d+)\.(?P<rest>.+)$")


def pruned_config(config, kept: Kept):
    """The target's config: the source's with the kept sizes (head_dim written out: it stays the source's)."""
    import copy
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    groups = len(next(iter(kept.groups.values())))
    out = copy.deepcopy(config)
    out.hidden_size = len(kept.channels)
    out.num_key_value_heads = groups
    out.num_attention_heads = groups * (heads // kv)
    out.intermediate_size = len(next(iter(kept.neurons.values())))
    out.num_hidden_layers = len(kept.layers)
    out.head_dim = head_dim
    if getattr(config, "layer_types", None):
        out.layer_types = [config.layer_types[i] for i in kept.layers]
    return out


def _rows_and_cols(rest, kept: Kept, layer, head_dim, group):
    """(rows, cols) index lists (None: all) of a layer tensor, by its name after `layers.N.`."""
    c = kept.channels
    q = [g * group * head_dim + r for g in kept.groups[layer] for r in range(group * head_dim)]
    k = [g * head_dim + r for g in kept.groups[layer] for r in range(head_dim)]
    j = kept.neurons[layer]
    table = {"self_attn.q_proj.weight": (q, c), "self_attn.q_proj.bias": (q, None),
             "self_attn.k_proj.weight": (k, c), "self_attn.k_proj.bias": (k, None),
             "self_attn.v_proj.weight": (k, c), "self_attn.v_proj.bias": (k, None),
             "self_attn.o_proj.weight": (c, q), "self_attn.o_proj.bias": (c, None),
             "self_attn.q_norm.weight": (None, None), "self_attn.k_norm.weight": (None, None),  # per head_dim
             "mlp.gate_proj.weight": (j, c), "mlp.gate_proj.bias": (j, None),
             "mlp.up_proj.weight": (j, c), "mlp.up_proj.bias": (j, None),
             "mlp.down_proj.weight": (c, j), "mlp.down_proj.bias": (c, None),
             "input_layernorm.weight": (c, None), "post_attention_layernorm.weight": (c, None)}
    if rest not in table:
        raise ConfigError(f"width pruning does not know the layer tensor {rest!r}: it slices Llama-shaped layers "
                          f"({', '.join(sorted(table))})")
    return table[rest]


def _read(f, key, rows, cols):
    """Tensor `key` restricted to `rows` and `cols` (None: all), reading only runs of kept rows from the file."""
    part = f.get_slice(key)
    if rows is None:
        t = part[:]
    else:
        runs, start = [], rows[0]  # contiguous runs of kept rows, one read each
        for a, b in zip(rows, rows[1:] + [None]):
            if b != a + 1:
                runs.append(part[start:a + 1])
                start = b
        t = torch.cat(runs)
    return t if cols is None else t[:, cols].contiguous()


def write_pruned(source_dir, kept: Kept, out_dir, dtype=None):
    """Slice the source's safetensors files into a Hugging Face folder at out_dir (config, weights, tokenizer
    files, and pruning.json naming what was kept). dtype: a torch dtype for the weights (None: the source's)."""
    import glob
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(source_dir)
    target = pruned_config(config, kept)
    _validate(target)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    files = sorted(glob.glob(os.path.join(source_dir, "*.safetensors")))
    if not files:
        raise ConfigError(f"{source_dir} holds no safetensors files: width pruning slices them (save the source "
                          f"with save_pretrained first)")
    new_index = {old: new for new, old in enumerate(kept.layers)}
    c = kept.channels
    outer = {"embed_tokens.weight": (None, c), "norm.weight": (c, None), "lm_head.weight": (None, c)}
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                m = _LAYER.match(key)
                if m is not None:
                    layer = int(m["i"])
                    if layer not in new_index:
                        continue
                    rows, cols = _rows_and_cols(m["rest"], kept, layer, head_dim, heads // kv)
                    name = f"{m['pre']}{new_index[layer]}.{m['rest']}"
                else:
                    suffix = next((s for s in outer if key == s or key.endswith("." + s)), None)
                    if suffix is None:
                        raise ConfigError(f"width pruning does not know the tensor {key!r} of {file}")
                    (rows, cols), name = outer[suffix], key
                t = _read(f, key, rows, cols)
                state[name] = t if dtype is None else t.to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    if dtype is not None:
        target.dtype = str(dtype).removeprefix("torch.")
    target.save_pretrained(out_dir)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(source_dir):  # the tokenizer travels with the target (same vocabulary)
        if name.startswith(("tokenizer", "special_tokens_map", "vocab.", "merges.")) or name == "chat_template.jinja":
            shutil.copy(os.path.join(source_dir, name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "pruning.json"), "w") as out:
        json.dump({"source": os.path.abspath(source_dir), **dataclasses.asdict(kept)}, out)
    return target


def prune_target(source_path, data_batches, shape: Shape, out_dir, dtype="float32", device="cpu"):
    """Cut the target from the source: check the shape against the source's config (before any weights load),
    score units over `data_batches` (an iterable of (input_ids, attention_mask), right-padded) when the shape
    cuts width or ranks layers, select, and write the sliced target to out_dir. Returns (Kept, scores or None).
    source_path: a Hugging Face folder with safetensors files, or "embedded:NAME"."""
    from semalign_ds import models
    path, gguf = models.resolve(source_path)
    config = models.config_of(source_path)
    shape = check_shape(config, shape)
    import glob
    if gguf is not None or not glob.glob(os.path.join(path, "*.safetensors")):
        raise ConfigError(f"pruning slices the source's safetensors files: {source_path!r} is not a local folder "
                          f"holding them (a hub id: download it; a GGUF file or a .bin checkpoint: load it and "
                          f"save_pretrained it first)")
    torch_dtype = models.DTYPES.get(dtype, dtype)  # a name, or a torch dtype (tests use float64)
    if shape.needs_calibration:
        from transformers import AutoModelForCausalLM
        source = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval().to(device)
        scores = importance(source, data_batches)
        del source
        kept = select(scores, shape)
    else:  # depth alone: every unit of the kept layers
        scores = None
        kept = Kept(list(range(shape.hidden_size)), shape.keep_layers,
                    {i: list(range(shape.num_kv_heads)) for i in shape.keep_layers},
                    {i: list(range(shape.intermediate_size)) for i in shape.keep_layers})
    write_pruned(path, kept, out_dir, torch_dtype)
    return kept, scores


def calibration_batches(data, pad_id, examples, batch_size=4):
    """Right-padded (ids, mask) batches of the first `examples` sequences of a TokenizedSet, longest first (little
    padding per batch)."""
    from semalign_ds.data import index_batches
    order = sorted(range(min(examples, len(data))), key=lambda i: -int(data.lengths[i]))
    for idx in index_batches(len(order), batch_size):
        ids, mask, _loss = data.batch([order[i] for i in idx], pad_id)
        yield ids, mask


def main(argv=None):
    """Write the pruned target of a run config (its source, data and target_* keys; without --config, the
    embedded default's) to --out."""
    import sys

    from semalign_ds import config as config_mod
    p = argparse.ArgumentParser(prog="python -m semalign_ds.pruning", description=main.__doc__)
    config_mod.add_arguments(p)
    p.add_argument("--out", required=True, help="folder for the pruned target (Hugging Face format)")
    args = p.parse_args(argv)
    try:
        _main(args)
    except ConfigError as err:
        print(f"semalign_ds.pruning: error: {err}", file=sys.stderr)
        return 2
    return 0


def _main(args):
    from semalign_ds import config as config_mod
    from semalign_ds import data as data_mod
    from semalign_ds import models
    from semalign_ds.embedded import DEFAULT_RUN
    cfg = config_mod.from_args(args, base=DEFAULT_RUN)
    if cfg.source_gguf_file:
        raise ConfigError(f"source_gguf_file {cfg.source_gguf_file!r}: pruning slices safetensors files; load the "
                          f"GGUF model and save_pretrained it, then name that folder as source")
    source_config = models.config_of(cfg.source)
    shape = check_shape(source_config, Shape.of(cfg))  # before any loading
    tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.source, None if cfg.tokenizer else cfg.source_gguf_file)
    rows = data_mod.read_rows(cfg.data, cfg.prompt_field, cfg.response_field, cfg.data_split, cfg.rows_seed,
                              cfg.data_format, cfg.messages_field, cfg.completion_field, cfg.max_row_chars)
    data, _ = data_mod.tokenize(rows, tokenizer, cfg.max_seq_len, cfg.loss_on, cfg.chat_template,
                                cfg.prune_calibration_examples, origin=cfg.data, max_row_chars=cfg.max_row_chars)
    models.out_of_vocabulary(data.ids, source_config.vocab_size, f"calibration set {cfg.data}")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    t0 = time.time()
    kept, _ = prune_target(cfg.source, calibration_batches(data, data_mod.pad_id(tokenizer),
                                                           cfg.prune_calibration_examples),
                           shape, args.out, cfg.dtype, "cuda" if cuda else "cpu")
    print(f"pruned target ({len(kept.layers)} layers {kept.layers}, width {len(kept.channels)}, "
          f"{shape.num_heads} heads, {shape.num_kv_heads} KV heads, intermediate {shape.intermediate_size}) "
          f"written to {args.out} in {time.time() - t0:.0f} s; run with target: {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
