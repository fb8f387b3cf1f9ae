"""--dry-run: check what can be checked without running a model, build the models on the meta device (shapes,
no weights), and estimate per phase and rank what a run holds and computes.

The estimates are first-order, meant for sizing a job before submitting it:
- bytes per value: 4 (float32) or 2 (bfloat16/float16); optimizer: AdamW's two moments in the parameter dtype and
  the trained parameters' gradients on one process; under ZeRO-2 the gradients whole in the reduce bucket, then
  this rank's share of the fp32 master copy, its two fp32 moments and its gradients;
- activations: one decoder layer keeps B*T*d*(34 + 5*a*T/d) bytes at 2 bytes per value for its backward
  (Korthikanti et al. 2022, no recomputation), scaled to the run's dtype; the naive loss keeps 3 float32
  [positions, vocabulary] tensors (the chunked and Triton back ends keep less);
- resident memory: each phase's peak is its model's parameters, training state and activations plus the named
  terms in Phase.held: the runtime (RUNTIME_BYTES, engines.DEEPSPEED_BYTES: measured constants), the target
  (loaded before the source phases), the tokenised data, the parameters ZeRO-3 holds gathered (one layer and a
  prefetch bucket: the vocabulary matrices stay in rows, vocab_parallel.py), the source head and the frontier of
  the stages (see held_source and held_stages);
- FLOPs: 2 per multiply-add of every linear layer (the LM head included where it runs) plus 4*T*d per token and
  layer for attention, backward twice the forward; Fisher loss 8*N*V*d_t, output KL 2*N*V*(d_s + 3*d_t);
  data parallel over the ranks.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

import torch

from semalign_ds import alignment, budget, data as data_mod, distributed, engines, models, objectives, pairing, \
    pruning, vocab_parallel
from semalign_ds.config import Config, ConfigError

_CHEAP_DATA_BYTES = 256 * 2**20  # data files up to this size are read and tokenised for exact token counts
# Resident memory of a rank before any model: the interpreter, torch, transformers, this package and the tokenizer
# (VmHWM of a process that imports the pipeline and loads the SmolLM2 tokenizer: 487 MiB; x86_64 Linux, Python
# 3.11, torch 2.13 CPU, transformers 5.24).
RUNTIME_BYTES = 490 * 2**20
_DATA_BYTES_PER_TOKEN = 9  # the tokenised transfer set: int64 id and bool loss flag per position


@dataclass
class Shapes:
    """What the estimates need of a model, read from one built on the meta device."""
    layers: int
    width: int
    heads: int
    vocab: int
    params: int  # every parameter, tied ones once
    layer_params: int  # of one decoder layer
    layer_matmul: int  # multiply-adds per token of one decoder layer's linear modules
    head_matmul: int  # of the LM head
    body_matmul: int  # of all decoder layers
    lora_params: int = 0  # of the LoRA adapters of one layer, when lora_rank > 0
    max_positions: int | None = None


@dataclass
class Tokens:
    examples: int
    tokens: int
    loss_positions: int
    how: str


@dataclass
class Phase:
    name: str
    param_bytes: float  # parameters held per rank
    train_bytes: float  # gradients and optimizer states per rank
    activation_bytes: float  # per rank, at the peak of one micro-batch
    flops: float  # all ranks together
    note: str = ""
    in_total: bool = True  # False for a single stage's row, which the all-stages row already counts
    held: dict = field(default_factory=dict)  # what else the rank holds at the phase's peak: bytes by name

    @property
    def peak_bytes(self):
        """Per-rank resident memory at the phase's peak."""
        return self.param_bytes + self.train_bytes + self.activation_bytes + sum(self.held.values())


@dataclass
class Plan:
    world: int
    source: Shapes
    target: Shapes
    tokens: Tokens
    pairs: str
    cache_bytes: float  # on disk, all ranks together
    frontier_bytes: float  # one frontier on disk, all ranks together
    phases: list = field(default_factory=list)
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# models on the meta device

def _pruned(config, keep):
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):  # per-layer attention kinds follow the kept layers
        config.layer_types = [config.layer_types[i] for i in keep]
    return config


def shapes(config, cfg: Config, role: str) -> Shapes:
    """Shapes of the model `config` describes, counted by the cost model (budget.model_counts) on a copy built on
    the meta device: no memory for weights."""
    c = budget.model_counts(config, models.DTYPES[cfg.dtype])
    lora = 0
    if cfg.lora_rank > 0 and role == "target":
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            layer = models.Adapter(AutoModelForCausalLM.from_config(config)).layers[0]
        linear = [(name.split(".")[-1], budget.linear_in_out(m)) for name, m in layer.named_modules()
                  if budget.linear_in_out(m)]
        missing = [t for t in cfg.lora_targets if t not in {n for n, _ in linear}]
        if missing:
            raise ConfigError(f"lora_targets {missing} name no linear module in a {config.model_type} layer; its "
                              f"linear modules: {sorted({n for n, _ in linear})}")
        # r x (in + out) per adapted module; a name may match several (GPT-2's attn.c_proj and mlp.c_proj)
        lora = cfg.lora_rank * sum(i + o for n, (i, o) in linear if n in cfg.lora_targets)
    return Shapes(layers=c["layers"], width=c["width"], heads=c["heads"], vocab=c["vocab"], params=c["params"],
                  layer_params=c["layer_params"], layer_matmul=c["layer_matmul"], head_matmul=c["head_matmul"],
                  body_matmul=c["body_matmul"], lora_params=lora, max_positions=c["max_positions"])


# ---------------------------------------------------------------------------------------------------------------
# data

def _cheap(spec):
    if spec.startswith("embedded:"):
        return True
    if os.path.isfile(spec):
        return os.path.getsize(spec) <= _CHEAP_DATA_BYTES
    return False  # a folder or hub id: reading it may mean a download or a large scan


def count_tokens(cfg: Config, tokenizer) -> Tokens:
    """Token and loss-position counts: tokenised from the data when that is cheap, else the upper bound
    max_examples x max_seq_len."""
    if tokenizer is not None and _cheap(cfg.data):
        rows = data_mod.read_rows(cfg.data, cfg.prompt_field, cfg.response_field, cfg.data_split, cfg.rows_seed)
        tokenized, _ = data_mod.tokenize(rows, tokenizer, cfg.max_seq_len, cfg.loss_on, cfg.chat_template,
                                         cfg.max_examples, origin=cfg.data)
        return Tokens(len(tokenized), int(tokenized.offsets[-1]), int(tokenized.loss.sum()),
                      "counted by tokenising the data")
    if cfg.max_examples is None:
        raise ConfigError(f"--dry-run cannot count the tokens of {cfg.data!r} cheaply (no tokenizer, or a large "
                          f"or remote data set) and max_examples is null: set max_examples to estimate from "
                          f"max_examples x max_seq_len")
    n = cfg.max_examples
    why = "no tokenizer beside the model" if tokenizer is None else "data not cheap to read"
    return Tokens(n, n * cfg.max_seq_len, n * cfg.max_seq_len,
                  f"upper bound max_examples x max_seq_len ({why}): every position full and scored")


def _tokenizer(spec, gguf_file):
    if spec.startswith("synthetic:"):  # its tokenizer alone: the model is not written for a dry run
        from semalign_ds import synthetic
        return models.load_tokenizer(synthetic.tokenizer_folder())
    try:
        return models.load_tokenizer(spec, gguf_file)
    except ConfigError:
        return None  # a config.json without a tokenizer beside it: shapes only


# ---------------------------------------------------------------------------------------------------------------
# the plan

def plan(cfg: Config, world: int | None = None) -> Plan:
    world = distributed.detect().world if world is None else world
    if world < 1:
        raise ConfigError(f"--world {world}: the number of ranks must be >= 1")
    from semalign_ds.pipeline import check_paths, check_run
    check_paths(cfg)
    for key, role in (("ds_source_config", "source"), ("ds_target_config", "target")):
        if getattr(cfg, key):
            engines.load_ds_config(getattr(cfg, key), role)

    config_s = models.config_of(cfg.source, cfg.source_gguf_file)
    given_t = models.config_of(cfg.target, cfg.target_gguf_file) if cfg.target is not None else None
    check_run(cfg, world, config_s, given_t)
    shape = pruning.Shape.of(cfg)
    if shape.needs_calibration:  # cut by width: the shape check_run accepted
        config_t = pruning.shape_config(config_s, pruning.check_shape(config_s, shape))
    else:
        config_t = given_t if given_t is not None else _pruned(config_s, cfg.target_keep_layers)
    src, tgt = shapes(config_s, cfg, "source"), shapes(config_t, cfg, "target")
    notes = []
    tok_s = _tokenizer(cfg.tokenizer or cfg.source, None if cfg.tokenizer else cfg.source_gguf_file)
    if tok_s is not None and cfg.target is not None:
        tok_t = _tokenizer(cfg.target, cfg.target_gguf_file)
        if tok_t is not None:
            models.check_same_vocabulary(tok_s, tok_t, cfg.tokenizer or cfg.source, cfg.target, src.vocab,
                                         tgt.vocab)
        else:
            notes.append("no target tokenizer: vocabularies compared by size only")
    if tok_s is None:
        notes.append("no tokenizer: vocabularies compared by size only")
        if src.vocab != tgt.vocab:
            raise ConfigError(f"source vocabulary {src.vocab} != target vocabulary {tgt.vocab}")
    for name, limit in (("max_seq_len", cfg.max_seq_len), ("eval_max_seq_len", cfg.eval_max_seq_len)):
        if src.max_positions and limit > min(src.max_positions, tgt.max_positions or src.max_positions):
            notes.append(f"{name} {limit} exceeds the models' max_position_embeddings")
    if cfg.dtype == "float16":
        notes.append("dtype float16 needs a GPU: a run refuses it at start when none is visible")

    tokens = count_tokens(cfg, tok_s)
    if tokens.examples < world:
        raise ConfigError(f"{tokens.examples} transfer examples for {world} ranks: every rank needs at least one")
    pairs = ("attribution: decided at run time" if cfg.pairing == "attribution"
             else "uniform: " + ", ".join(f"{k}->{l}" for k, l in
                                          enumerate(pairing.uniform_pairs(src.layers, tgt.layers), 1)))
    out = Plan(world, src, tgt, tokens, pairs, *disk_bytes(cfg, src, tgt, tokens), notes=notes)
    out.phases = phases(cfg, src, tgt, tokens, world)
    attr = phase_of(out.phases, "attribution")
    if attr is not None and not cfg.attribution_recompute and attr.activation_bytes > attr.peak_bytes / 2:
        lean = phase_of(phases(cfg.model_copy(update={"attribution_recompute": True}), src, tgt, tokens, world),
                        "attribution")
        notes.append(f"attribution's activations are {_bytes(attr.activation_bytes)} of its "
                     f"{_bytes(attr.peak_bytes)} per rank; attribution_recompute: true would hold "
                     f"{_bytes(lean.activation_bytes)} (peak {_bytes(lean.peak_bytes)}) for one more forward")
    return out


def disk_bytes(cfg, src, tgt, tokens):
    """(cache, one frontier): the cache holds per loss position, in float32, the aligned states of every target
    layer (and a^(0) for the geometry objective), the unit source states for the layer-wise baseline, the top-k
    supports of the layer stages (int32 ids, float32 z* and tail mass), and the source's final state; and the source
    head once."""
    contents = objectives.cache_contents(cfg)
    per_position = (tgt.layers + contents["aligned_input"]) * tgt.width + src.width
    if contents["source_states"]:
        per_position += tgt.layers * src.width
    if contents["topk"]:
        per_position += (tgt.layers - 1) * (2 * contents["topk"][0] + 1)
    cache = tokens.loss_positions * per_position * 4 + src.vocab * src.width * 4
    return cache, tokens.tokens * tgt.width * 4  # frontiers are kept in float32


def _activations(batch, seq, width, heads, b):
    return batch * seq * width * (34 + 5 * heads * seq / width) * b / 2


def _counts(src):
    return src.params, src.layer_params


def _zero_src(cfg, src, world):
    return engines.source_zero3(cfg, world, *_counts(src))


def _runtime(deepspeed):
    """The runtime, and DeepSpeed's where it has run by then (imported, it stays)."""
    return {"runtime": RUNTIME_BYTES, **({"DeepSpeed": engines.DEEPSPEED_BYTES} if deepspeed else {})}


def held_source(cfg, src, tgt, tokens, b, world):
    """What a rank holds through the source phases besides the source's own parameters, bytes by name: the
    runtime, the target (loaded before the source; of a target read mapped from its files, only the pages read:
    all of them when it is evaluated before training, else its head), the tokenised data, a copy of this rank's
    rows of the source's vocabulary matrices where its ZeRO-3 partition of them is not whole rows (else they are a
    view of it: vocab_parallel.rows_of); and (second value) what a ZeRO-3 forward holds gathered: one layer and a
    prefetch bucket.

    The cache holds no more, because the phases start a new ZeRO-3 trace (engines.new_trace); replaying
    attribution's, DeepSpeed 0.19.8 prefetched the parameters of a backward the cache never runs and kept them
    gathered: the whole source on every rank."""
    zero = _zero_src(cfg, src, world)
    held = _runtime(zero)
    if cfg.eval_data is not None:  # evaluated before training: every page of it read
        held["target"] = tgt.params * b
    else:  # read mapped, and only its head used (the alignment map, the cache's top-k) until it trains
        held["target head"] = tgt.vocab * tgt.width * b
    if zero and -(-src.vocab * src.width // world) % src.width:
        matrices = 1 if src.params - src.layers * src.layer_params < 2 * src.vocab * src.width else 2
        held["source head and embedding rows, copied"] = matrices * -(-src.vocab // world) * src.width * b
    held["tokenised data"] = tokens.tokens * _DATA_BYTES_PER_TOKEN
    return held, engines.zero3_gathered(cfg, *_counts(src), b) if zero else 0


def phases(cfg: Config, src: Shapes, tgt: Shapes, tokens: Tokens, world: int) -> list:
    """Memory per rank and FLOPs (the cost model's, budget.cost and budget.predicted_phases) of each phase."""
    b = models.DTYPES[cfg.dtype].itemsize
    zero_src = _zero_src(cfg, src, world)
    zero_tgt = world > 1 or cfg.ds_target_config is not None
    mean_len = tokens.tokens / tokens.examples
    loss_share = tokens.loss_positions / tokens.tokens
    seq = cfg.max_seq_len
    micro = cfg.batch_size // (world * cfg.grad_accum_steps)
    vocab = min(src.vocab, tgt.vocab)
    model_s = {"layer_params": src.layer_matmul, "width": src.width, "layers": src.layers, "vocab": vocab}
    model_t = {"layer_params": tgt.layer_matmul, "width": tgt.width, "layers": tgt.layers, "vocab": vocab,
               "source_width": src.width}

    def training(trainable, steps):
        if not zero_tgt:  # gradients, and AdamW's two moments from the first step on (made after its backward)
            return (3 if steps > 1 else 1) * trainable * b
        # ZeRO-2: the gradients whole in the reduce bucket, then this rank's share of the fp32 master copy, its
        # two fp32 moments and its gradients
        bucket = min(engines.zero_setting(cfg, "target", "reduce_bucket_size"), trainable)
        return bucket * b + trainable * (3 * 4 + b) / world

    def loss_memory(n):
        return 3 * n * vocab * 4

    src_held = src.params * b / (world if zero_src else 1)
    held_s, in_flight = held_source(cfg, src, tgt, tokens, b, world)
    gathered = {"ZeRO-3 gathered in a forward": in_flight} if in_flight else {}
    out = []
    if pruning.Shape.of(cfg).needs_calibration:  # rank 0 runs the whole source forward over calibration batches of 4
        n_cal = min(cfg.prune_calibration_examples, tokens.examples)
        before = {k: v for k, v in held_s.items() if k in ("runtime", "DeepSpeed", "tokenised data")}
        out.append(Phase("prune", src.params * b, 0, _activations(4, seq, src.width, src.heads, b) / 2,
                         budget.cost(model_s, tokens.tokens * n_cal / tokens.examples, 0, mean_len,
                                     src.layers)["flops"] * world, f"{n_cal} calibration examples on rank 0 (the "
                                                                   f"others wait); the source whole", held=before))
    n_attr = tokens.examples if cfg.attribution_examples is None else min(cfg.attribution_examples, tokens.examples)
    eb, ab = cfg.eval_batch_size, cfg.attribution_batch_size
    if cfg.pairing == "attribution":
        attr_tokens = tokens.tokens * n_attr / tokens.examples
        attr_loss = tokens.loss_positions * n_attr / tokens.examples
        # every layer's saved activations (recomputed: every layer's input, and one layer's activations at a time),
        # one chunk of float32 logits (vocab_parallel.nll: of one rank's positions on this rank's 1/world of the
        # vocabulary, a 16-bit product first), the [positions, d] float32 gradient it forms, under ZeRO-3 also
        # another rank's positions and its part of their gradient, and the gradient of the state the backward is
        # at (each layer's score is taken from it as it is formed, none is kept)
        state, layer = ab * seq * src.width * b, _activations(ab, seq, src.width, src.heads, b)
        layers_act = src.layers * state + layer if cfg.attribution_recompute else src.layers * layer
        rows, cols = ab * seq, -(-vocab // world) if zero_src else vocab
        others = rows * src.width * (b + 4) if zero_src else 0
        nll = (min(rows, vocab_parallel.chunk_rows(cols)) * cols * (4 if b == 4 else 4 + b) + rows * src.width * 4
               + others)
        out.append(Phase("attribution", src_held, 0, layers_act + nll + state,
                         budget.cost(model_s, attr_tokens, attr_loss, mean_len,
                                     src.layers * (2 if cfg.attribution_recompute else 1), src.layers, 1, 1,
                                     weight_grads=False)["flops"],
                         f"{n_attr} examples, source forward + backward"
                         + (" (each layer recomputed)" if cfg.attribution_recompute else ""),
                         held={**held_s, **gathered}))
    # the map M: every rank its share of the vocabulary, the rows of the source head it holds (the target's head
    # whole on every rank)
    basis_bytes = 8 if cfg.basis_dtype == "float64" else 4
    share = -(-vocab // world)
    mine = alignment.alignment_cost(share, tgt.width, src.width, basis_bytes, kind=cfg.alignment_map)
    out.append(Phase("alignment", src_held, 0, mine["peak_bytes"], world * mine["flops"],
                     f"M through the d x d Gram matrices, {share} vocabulary rows per rank", held=held_s))
    # batches never cross a shard; the forward keeps the loss positions' rows of the paired states h^(l) and of
    # h^(L_s) (cache.batch_entries), one state whole as it is made; one shard's rows are held (fp32) until the
    # shard is written
    batch = min(eb, cfg.cache_shard_examples, tokens.examples)
    shard_rows = min(cfg.cache_shard_examples, tokens.examples) * tokens.loss_positions / tokens.examples
    kept = min(tgt.layers, src.layers) + 2  # the pairs, h^(0) for the geometry objective, h^(L_s)
    out.append(Phase("activation cache", src_held, 0,
                     _activations(batch, seq, src.width, src.heads, b) / 2
                     + batch * seq * src.width * b * (1 + kept * loss_share)
                     + shard_rows * (tgt.width * tgt.layers + src.width) * 4,
                     budget.cost(model_s, tokens.tokens, 0, mean_len, src.layers)["flops"],
                     "source forward, no gradient", held={**held_s, **gathered}))
    recipe, last = objectives.recipe(cfg), tgt.layers
    predicted = budget.predicted_phases(cfg, model_t, tokens.examples, tokens.tokens, tokens.loss_positions)
    micro_loss = micro * seq * loss_share
    every_layer = tgt.layers * _activations(micro, seq, tgt.width, tgt.heads, b) + loss_memory(micro_loss)
    if "whole" in predicted:
        trainable = tgt.layers * (tgt.lora_params or tgt.layer_params)
        steps = cfg.stage_steps * tgt.layers
        name = {"output_kd": "output KD", "finetune": "fine-tuning"}[cfg.method]
        out.append(Phase(f"{name} ({steps} steps)", tgt.params * b, training(trainable, steps), every_layer,
                         predicted["whole"], "all target layers trained at once",
                         held=held_stages(cfg, src, tgt, tokens, b, world, recipe.keys(last, True))))
    if "stages" in predicted:
        trainable = tgt.lora_params or tgt.layer_params
        stages = predicted["stages"]
        held, act = tgt.params * b, _activations(micro, seq, tgt.width, tgt.heads, b) + loss_memory(micro_loss)
        train = training(trainable, cfg.stage_steps)
        frontier = {"frontier, this rank's (the old and the next)": 2 * tokens.tokens / world * tgt.width * 4}
        held_k, held_last = ({**held_stages(cfg, src, tgt, tokens, b, world, recipe.keys(k, k == last)), **frontier}
                             for k in (1, last))
        held_all = max(held_k, held_last, key=lambda h: sum(h.values()))
        if tgt.layers > 1:
            out.append(Phase(f"stage k < {tgt.layers} (each)", held, train, act, stages[0],
                             f"one layer's {'LoRA' if tgt.lora_params else 'weights'} trained, {recipe.layer.name} "
                             f"loss, then its frontier", in_total=False, held=held_k))
        out.append(Phase(f"stage {tgt.layers} (output)", held, train, act, stages[-1], "KL at the output",
                         in_total=False, held=held_last))
        out.append(Phase(f"all {tgt.layers} stages", held, train, act, sum(stages),
                         "each stage then runs its layer over the data (the next frontier)", held=held_all))
    if "joint" in predicted:
        trainable = tgt.layers * (tgt.lora_params or tgt.layer_params)
        held_j = held_stages(cfg, src, tgt, tokens, b, world, recipe.joint_keys(last))
        if "stages" in predicted:  # the frontier after the last stage is still held
            held_j["frontier, this rank's"] = tokens.tokens / world * tgt.width * 4
        out.append(Phase(f"joint ({cfg.joint_steps} steps)", tgt.params * b, training(trainable, cfg.joint_steps),
                         every_layer, predicted["joint"], "all target layers trainable", held=held_j))
    return out


def held_stages(cfg, src, tgt, tokens, b, world, keys):
    """What a rank holds through a training phase besides the target and its training state, bytes by name: the
    runtime, the tokenised data, the source head (read from the cache for the output KL) and this rank's rows of
    the cache entries `keys` the phase reads (its share of the loss positions, 4 bytes a value). The source is
    released before training."""
    held = _runtime(world > 1 or cfg.ds_target_config is not None or _zero_src(cfg, src, world))
    held["tokenised data"] = tokens.tokens * _DATA_BYTES_PER_TOKEN
    if objectives.recipe(cfg).uses_source_head:
        held["source head"] = min(src.vocab, tgt.vocab) * src.width * b
    topk = cfg.fisher_topk
    width = {"aligned": tgt.width, "source": src.width, "source_final": src.width, "topk_ids": topk, "topk_z": topk,
             "topk_tail": 1}
    held["cached rows, this rank's"] = tokens.loss_positions / world * sum(width[k.split(".")[0]] for k in keys) * 4
    return held


def phase_of(phases, run_phase):
    """The row of `phases` that estimates a run's phase as state.json names it (plan, cache, stage_K, joint,
    stage_output_kd, ...; "stages": all frontier stages), or None."""
    def first(prefix):
        return next((ph for ph in phases if ph.name.startswith(prefix)), None)

    if run_phase == "stages":  # every frontier stage together (the scale benchmark's sum of them)
        return next((ph for ph in phases if ph.name.startswith("all ") and ph.name.endswith(" stages")), None)
    stage = run_phase.removeprefix("stage_")
    if stage.isdigit():  # the output stage's own row, else the row of every stage below it
        return first(f"stage {stage} (output)") or first("stage k < ")
    names = {"plan": "attribution", "cache": "activation cache", "stage_output_kd": "output KD",
             "stage_finetune": "fine-tuning"}
    return first(names.get(run_phase, run_phase))


# ---------------------------------------------------------------------------------------------------------------
# the printout

def _bytes(n):
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n):
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return str(n)


def _seconds(s):
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def report(cfg: Config, world: int | None = None, tflops: float = 400.0) -> str:
    if not tflops > 0 or math.isinf(tflops):
        raise ConfigError(f"--accelerator-tflops {tflops}: give the sustained TFLOP/s of one rank, e.g. 400")
    p = plan(cfg, world)
    s, t, tok = p.source, p.target, p.tokens
    lines = [
        f"dry run: config checked, models built on the meta device (no weights), {p.world} rank(s), {cfg.dtype}",
        f"  source {cfg.source}: {s.layers} layers, width {s.width}, vocab {s.vocab}, {_count(s.params)} params",
        f"  target {cfg.target or f'source layers {cfg.target_keep_layers}'}: {t.layers} layers, width {t.width}, "
        f"{_count(t.params)} params" + (f", LoRA rank {cfg.lora_rank}: {t.lora_params} params per layer"
                                           if t.lora_params else ""),
        f"  pairing: {p.pairs}",
        f"  data {cfg.data}: {tok.examples} examples, {tok.tokens} tokens, {tok.loss_positions} loss positions "
        f"({tok.how})",
        f"  batch {cfg.batch_size} = {p.world} rank(s) x {cfg.grad_accum_steps} accumulation x "
        f"{cfg.batch_size // (p.world * cfg.grad_accum_steps)} sequences per micro-batch",
        f"  on disk: activation cache {_bytes(p.cache_bytes)} ({_bytes(p.cache_bytes / p.world)} per rank)"
        + (f", one frontier {_bytes(p.frontier_bytes)}" if cfg.frontier_stages else ""),
        f"estimate per rank at {tflops:g} TFLOP/s sustained" + (" (the default: an H100 in bf16 at about 40% of its "
                                                               "dense peak; set --accelerator-tflops)"
                                                               if tflops == 400 else "") + ":",
        f"  {'phase':<34} {'params':>11} {'grad+AdamW':>11} {'activations':>11} {'held':>11} {'peak':>11} "
        f"{'TFLOP':>11} {'time':>9}"]
    for ph in p.phases:
        per_rank = ph.flops / p.world
        lines.append(f"  {ph.name:<34} {_bytes(ph.param_bytes):>11} {_bytes(ph.train_bytes):>11} "
                     f"{_bytes(ph.activation_bytes):>11} {_bytes(sum(ph.held.values())):>11} "
                     f"{_bytes(ph.peak_bytes):>11} {per_rank / 1e12:>11.4g} "
                     f"{_seconds(per_rank / (tflops * 1e12)):>9}" + (f"  {ph.note}" if ph.note else ""))
    total = sum(ph.flops for ph in p.phases if ph.in_total) / p.world
    top = max(p.phases, key=lambda ph: ph.peak_bytes)
    lines.append(f"  {'run (phases above, once each)':<34} {'peak ' + _bytes(top.peak_bytes):>59} "
                 f"{total / 1e12:>11.4g} {_seconds(total / (tflops * 1e12)):>9}")
    lines.append(f"  held at the peak ({top.name}): " + ", ".join(f"{k} {_bytes(v)}" for k, v in top.held.items()))
    lines += [f"note: {n}" for n in p.notes]
    lines.append("evaluation and export are not estimated; see semalign_ds/dryrun.py for the formulas")
    return "\n".join(lines)
