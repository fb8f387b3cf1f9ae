"""DeepSpeed, kept in one place: the ZeRO-3 inference engine that shards the source, the ZeRO-2 engine of a
frontier stage, their configs, and reading partitioned weights whole.

The pipeline uses these when it runs on several ranks or when a DeepSpeed config is given; a single process without
one uses plain PyTorch (TorchStage) and never imports DeepSpeed.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os

import torch

from semalign_ds import distributed, shared_weights
from semalign_ds.config import ConfigError

_HERE = os.path.dirname(os.path.abspath(__file__))
_TRAINING_KEYS = ("optimizer", "scheduler")


def default_config_path(name):
    """The packaged ds_configs/NAME.json (installed as semalign_ds.ds_configs)."""
    for folder in (os.path.join(_HERE, "ds_configs"), os.path.join(os.path.dirname(_HERE), "ds_configs")):
        path = os.path.join(folder, f"{name}.json")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"ds_configs/{name}.json is missing from the installation")


def load_ds_config(path, role):
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"DeepSpeed config for the {role} ({path}) cannot be read: {err}") from err
    ds.pop("_comment", None)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if role == "source":
        present = [k for k in _TRAINING_KEYS if k in ds]
        if present:
            raise ConfigError(f"{path}: the source is never trained, but its DeepSpeed config has "
                              f"{' and '.join(present)} block(s); remove them (ZeRO-3 inference needs only "
                              f"zero_optimization and batch sizes)")
        if stage not in (0, 3):
            raise ConfigError(f"{path}: ZeRO stage {stage} does not partition parameters, so it does nothing for a "
                              f"model that is not trained; use stage 3 (sharded source) or 0 (replicated)")
    elif "optimizer" in ds:
        params = ds["optimizer"].get("params", {})
        fixed = [k for k in ("lr", "weight_decay") if params.get(k, "auto") != "auto"]
        if fixed:
            raise ConfigError(f"{path}: the optimizer's {' and '.join(fixed)} come from the run config (lr, "
                              f"weight_decay); set them to \"auto\" in the optimizer block")
    return ds


def fill(ds, micro_batch, world, dtype, grad_clip=None, lr=None, weight_decay=None, accumulation=1):
    """Resolve the "auto" fields a DeepSpeed config leaves to the run."""
    ds = copy.deepcopy(ds)
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", lr), ("weight_decay", weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    auto = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro_batch * accumulation * world,
            "gradient_clipping": grad_clip if grad_clip is not None else 0.0}
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    zero = ds.get("zero_optimization", {})
    for key, value in zero.items():
        zero[key] = _zero_auto(key, value)
    for key in ("bf16", "fp16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = (dtype == "bfloat16") if key == "bf16" else False
    expect = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    if ds["train_batch_size"] != expect:
        raise ConfigError(f"DeepSpeed batch sizes disagree: train_batch_size {ds['train_batch_size']} != micro "
                          f"{ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']}"
                          f" x world {world}; leave them \"auto\"")
    return ds


# What DeepSpeed adds on every rank where it runs (several ranks, or a DeepSpeed config): its import (95 MiB), the
# process group, its engines' buffers. Measured as 2-rank minus 1-rank resident memory with the same models held,
# after the source is released (benchmarks/scale.csv, synthetic:llama-0.5b: export 1,311 and 1,125 MiB against
# 918, after the run 987 against 611).
DEEPSPEED_BYTES = 380 * 2**20
_DS_DEFAULTS = {"stage3_prefetch_bucket_size": 5e7, "reduce_bucket_size": 5e8,  # DeepSpeed's own defaults
                "reduce_scatter": True}


def prefetch_bucket(cuda=None):
    """stage3_prefetch_bucket_size "auto": DeepSpeed's default (5e7 parameters) on CUDA, 0 on CPU. On CPU a
    prefetch overlaps nothing (gloo's collectives run between the forward's own operations), and from the second
    batch on, when DeepSpeed replays the recorded trace, the prefetched parameters stay gathered: a 0.40B source at 2
    ranks, attribution batches of 4 x 128 tokens, peaked at 4,542 MiB on rank 0 from the second batch on against 3,136
    in the first, and at 3,150-3,168 in every batch without prefetch (the 1-rank model whole: 3,557). cuda: where
    the source runs (default: this machine has CUDA)."""
    import torch
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return _DS_DEFAULTS["stage3_prefetch_bucket_size"] if cuda else 0


def reduce_scatter(cuda=None):
    """ZeRO-1/2's reduce_scatter "auto": DeepSpeed's default (True) on CUDA, False on CPU. True reduces a gradient
    bucket by partitions: with gloo, DeepSpeed's epilogue first copies the whole bucket into a new flat tensor,
    all-reduces that and copies it back; False all-reduces the contiguous bucket in place, and each rank keeps its
    partition of it. Same values to the bit (a sum of the same ranks' gradients); a 0.34B target's layer (18.4M
    parameters) at 2 ranks spent 54 ms a step in that copy, in steps of about 0.5 s (the frontier stages at 2
    sequences per rank). cuda: where the stages run (default: this machine has CUDA)."""
    import torch
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return _DS_DEFAULTS["reduce_scatter"] if cuda else False


def _zero_auto(key, value):
    """A zero_optimization value, "auto" resolved where the run resolves it (the prefetch bucket, reduce_scatter),
    else as given."""
    if value != "auto":
        return value
    return {"stage3_prefetch_bucket_size": prefetch_bucket, "reduce_scatter": reduce_scatter}.get(key, lambda: value)()


def zero_setting(cfg, role, key):
    """A ZeRO setting of the source's or the target's DeepSpeed config (the run's default one when none is
    given), or DeepSpeed's own default."""
    path = getattr(cfg, f"ds_{role}_config") or default_config_path(
        {"source": "source_zero3", "target": "target_zero2"}[role])
    return float(_zero_auto(key, load_ds_config(path, role).get("zero_optimization", {}).get(key, _DS_DEFAULTS[key])))


def zero3_gathered(cfg, params, layer_params, b):
    """Bytes a ZeRO-3 forward of the source holds gathered: one layer and a prefetch bucket (the embedding and the
    LM head stay in this rank's rows: vocab_parallel.py)."""
    bucket = min(zero_setting(cfg, "source", "stage3_prefetch_bucket_size"), params)
    return (layer_params + bucket) * b


def source_zero3(cfg, world, params, layer_params):
    """Whether the source runs under ZeRO-3, else whole on every rank. One rank runs it whole unless a DeepSpeed
    config is given; with several, source_sharding decides, and auto picks ZeRO-3 only when that holds less per
    rank: when the parameters it takes off a rank, P (1 - 1/world), outweigh what it adds, DeepSpeed's runtime and
    what a forward holds gathered. In float32 on CPU the 135M embedded source stays whole at 2 and 4 ranks (257 and
    385 MiB taken off, 394 MiB added: DeepSpeed and one layer), and a 0.40B one is partitioned at 2 (767 against
    about 420)."""
    if cfg.ds_source_config is not None:
        return True
    if world == 1 or cfg.source_sharding == "replicated":
        return False
    if cfg.source_sharding == "zero3":
        return True
    from semalign_ds import models
    b = models.DTYPES[cfg.dtype].itemsize
    return params * b * (1 - 1 / world) > DEEPSPEED_BYTES + zero3_gathered(cfg, params, layer_params, b)


def check_source_fits(ds, n_params, bytes_per_param, role="source"):
    """Refuse ZeRO stage 0 for a source that cannot fit one rank's memory."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    need = n_params * bytes_per_param
    have = device_memory()
    if stage < 3 and need > 0.9 * have:
        raise ConfigError(f"the {role} needs {need / 2**30:.1f} GiB for its parameters, more than one rank has "
                          f"({have / 2**30:.1f} GiB), and its DeepSpeed config does not shard it; use ZeRO stage 3 "
                          f"(ds_configs/source_zero3.json)")


def device_memory():
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return float("inf")


# ---------------------------------------------------------------------------------------------------------------
# the source under ZeRO-3

def sharded_source(spec, gguf_file, dtype, seed, ds, shared=False):
    """(model, engine): the source built partitioned (no rank ever holds it whole) and its inference engine. shared:
    on ranks of one host, its partitions go in one shared file and its gathers map them (shared_weights.py)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from semalign_ds import models
    distributed.group_for_deepspeed()  # zero.Init partitions over the group while the model loads
    path, gguf = models.resolve(spec, gguf_file)
    files = models.safetensors_files(path, gguf)
    if path.endswith(".json"):
        # a random-init model must get the same weights as on one process: build it whole, partition it in
        # deepspeed.initialize (random-init models are small test models)
        model = models.load_model(spec, gguf_file, dtype, seed)
    elif files and (model := partitioned_from_safetensors(spec, files, dtype, ds)) is not None:
        distributed.barrier()  # every rank has read its partitions: the files' pages serve nothing any more
        models.drop_from_page_cache(files)
    else:
        # (GGUF, .bin, hub ids) while this object lives, from_pretrained builds the model partitioned
        # (zero.Init), but rank 0 reads the whole checkpoint and every parameter is gathered whole on every rank
        # as it is loaded; it is one global, dropped at once so that later models are built whole
        zero3 = HfDeepSpeedConfig(ds)
        try:
            model = models.load_model(spec, gguf_file, dtype, seed)
        finally:
            del zero3
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    if shared and distributed.world() > 1 and not torch.cuda.is_available():
        # the embedding and the head are read as this rank's rows, never gathered (vocab_parallel.py): they go in
        # a file of their own, so that the rows, which outlive the model, do not keep the source's; from it every
        # rank reads all rows in place, and the ranks' forwards and NLLs need no collective
        adapter = models.Adapter(model)
        vocab = (adapter.embed_tokens.weight, adapter.head.weight)
        shared_weights.share(model, exclude=vocab)
        shared_weights.share_rows(model, vocab)
    return model, engine


def partitioned_from_safetensors(spec, files, dtype, ds):
    """The model built under zero.Init, each rank reading only its own partition of every tensor from the
    safetensors files (a few rows more), so a rank's peak while loading is about model / world; None when the
    files' tensor names do not match the model's (a checkpoint with legacy names: the caller loads it through
    transformers instead).

    transformers' own ZeRO-3 loading (HfDeepSpeedConfig + from_pretrained) reads the whole checkpoint on rank 0
    and gathers every parameter whole on every rank to copy it in: measured on a 0.40B fp32 model at 2 ranks, rank
    0 peaked at the whole model plus its partition while loading."""
    import math

    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers before 5.1
        from transformers.modeling_utils import no_init_weights

    from semalign_ds import models
    if dtype not in ("float32", "bfloat16"):  # the configs enable no fp16 block: float16 goes through transformers
        return None
    config = models.config_of(spec)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]  # imported before zero.Init (PLATFORM.md)
    # No weight init at all (transformers' on partitioned-empty parameters fails, torch's would fill each module
    # whole before it is partitioned): every parameter is read from the files below, and one that is not refused.
    # zero.Init takes its dtype from the config's bf16 block (fill() sets it from the run's dtype): its own dtype
    # argument is misread on CPU (DeepSpeed 0.19.8 makes any dtype bfloat16 where fp16 is unsupported)
    with deepspeed.zero.Init(config_dict_or_path=ds), no_init_weights():
        model = model_class(config)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()  # done by the weight init that was skipped: the head is the embedding
    model.eval().requires_grad_(False)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    prefix = model.base_model_prefix
    names = {}  # file -> {checkpoint key: model name}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names[file] = {k: next((n for n in (k, f"{prefix}.{k}") if n in params or n in buffers), None)
                           for k in f.keys()}
    found = {n for keys in names.values() for n in keys.values()}
    unknown = [k for keys in names.values() for k, n in keys.items() if n is None]
    if unknown or set(params) - found:
        if distributed.rank() == 0:
            print(f"{spec}: its safetensors files do not name the model's parameters as the model does (unknown "
                  f"{unknown[:3]}, missing {sorted(set(params) - found)[:3]}): loading it through transformers, "
                  f"which reads it whole on rank 0", flush=True)
        return None
    for file, keys in names.items():
        with safe_open(file, framework="pt") as f:
            for key, name in keys.items():
                if name in buffers:
                    buffers[name].copy_(f.get_tensor(key))
                    continue
                p = params[name]
                part = p.ds_tensor  # this rank's slice of the flattened parameter, padded at the end
                start = dist.get_rank(group=p.ds_process_group) * part.numel()
                end = min(start + part.numel(), p.ds_numel)
                sl = f.get_slice(key)
                shape = sl.get_shape()
                if math.prod(shape) != p.ds_numel:
                    raise ConfigError(f"{spec}: {key} has shape {shape} in {os.path.basename(file)}, but the "
                                      f"model's config makes it {tuple(p.ds_shape)}")
                if end <= start:
                    continue
                cols = math.prod(shape[1:])
                first, last = start // cols, -(-end // cols)  # the rows holding this rank's slice
                rows = sl[first:last] if shape else f.get_tensor(key).reshape(1)
                part.narrow(0, 0, end - start).copy_(rows.reshape(-1)[start - first * cols:end - first * cols])
    return model


def release_source(engine):
    """Let the ZeRO-3 source be freed once its phases are done (the caller drops its own references). DeepSpeed
    keeps references to it in two module-level places, so without this the source's partitions stayed resident on
    every rank through the frontier stages (measured: rank 0 of a 0.40B source at 2 ranks kept about 2 GiB more
    than 1 rank from the cache to the end of the run)."""
    if engine is None:
        return
    module = engine.module
    engine.destroy()
    distributed.unshare_partitions()
    # both are private to DeepSpeed: guarded, a later version may not have them
    try:
        from deepspeed.runtime.zero import parameter_offload
        stack = parameter_offload.FWD_MODULE_STACK
        stack[:] = [m for m in stack if m is not module]
    except (ImportError, AttributeError):
        pass
    _clear_release_cache()


def new_trace(engine):
    """Make a ZeRO-3 source record its parameter trace anew at its next forward: call it between phases that
    run it differently (attribution's forward and backward, the cache's forward only). DeepSpeed replays the trace
    recorded by the first phase: in the cache it prefetched, near the end of every forward, the parameters of a
    backward that never ran, and they stayed gathered (measured: the whole 0.40B source on each of 2 ranks, 1.5
    GiB more than its partition). Invalidating the trace is not enough, because the coordinator's release
    decisions are cached per (module, step) and outlive the trace they were computed from."""
    if engine is None:
        return
    offload = getattr(engine, "optimizer", None)
    coordinator = getattr(getattr(offload, "parameter_offload", offload), "param_coordinator", None)
    if coordinator is None:  # not ZeRO-3, or a DeepSpeed that keeps it elsewhere
        return
    engine.empty_partition_cache()  # releases whatever the last phase left gathered
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # private to DeepSpeed, as the two below
    _clear_release_cache()


def _trace_check():
    """DeepSpeed's module holding the ZeRO-3 trace check, or None where this DeepSpeed has none by that name."""
    try:
        from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator
    except ImportError:
        return None
    return coordinator if hasattr(coordinator, "assert_ints_same_as_other_ranks") else None


def can_run_apart():
    """Whether ranks_apart can take the collective out of a ZeRO-3 forward's start."""
    return _trace_check() is not None


def forwards_apart(runner):
    """Whether a rank's source forwards need no other rank, so that ranks need not keep step: a source whole on
    every rank (no runner), or a ZeRO-3 source on one host whose partitions every rank reads in place
    (shared_weights.py) and whose forwards ranks_apart can start alone."""
    return runner is None or (distributed.shares_partitions() and can_run_apart())


@contextlib.contextmanager
def ranks_apart():
    """Within the block a ZeRO-3 forward's start is not collective. While DeepSpeed records the order in which a
    model's modules gather (the first forwards after new_trace, and again after the order changes) it checks at the
    start of every forward that all ranks recorded the same order: a broadcast. Ranks that run their own batches
    (attribution.independent) met there at different batches (measured: 17 s of one rank's 62 waiting for the
    other) and hung where their numbers of forwards differ. Here the check is skipped: every rank runs the same
    code, so their orders agree."""
    module = _trace_check()
    original = module.assert_ints_same_as_other_ranks
    module.assert_ints_same_as_other_ranks = lambda ints: None
    try:
        yield
    finally:
        module.assert_ints_same_as_other_ranks = original


def _clear_release_cache():
    """The parameter coordinator's __params_to_release is an lru_cache on the class, keyed by (coordinator,
    submodule, step): it holds every layer of every ZeRO-3 model that ran a forward, and decisions computed from
    a trace that may no longer hold (cleared for all of them: it is a cache, recomputed on use)."""
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C
        fn = getattr(C, "_PartitionedParameterCoordinator__params_to_release")
    except (ImportError, AttributeError):
        return
    # under DeepSpeed's NVTX wrapper, which keeps the cached function in its closure
    inner = [fn] + [c.cell_contents for c in getattr(fn, "__closure__", None) or ()]
    for f in inner:
        if hasattr(f, "cache_clear"):
            f.cache_clear()


def parameter_bytes_on_this_rank(model):
    """Bytes of parameters this rank holds: its ZeRO-3 partitions, or whole tensors."""
    total = 0
    for p in model.parameters():
        numel = getattr(p, "ds_tensor", None)
        total += (numel.numel() if numel is not None else p.numel()) * p.element_size()
    return total


@contextlib.contextmanager
def gathered(params):
    """Whole parameters inside the block, also when ZeRO-3 has partitioned them."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params):
        yield


# ---------------------------------------------------------------------------------------------------------------
# a frontier stage: plain PyTorch, or a DeepSpeed ZeRO-2 engine

def adamw(params, cfg):
    """torch's AdamW with the run's lr and weight decay, fused where torch has the fused kernel for the parameters'
    device (CPU, CUDA): one pass over each tensor instead of a dozen elementwise ones (a 0.34B target's layer, 18.4M
    parameters, one thread: 21 against 85 ms a step). The same update; the last bits of a value can differ."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


class TorchStage:
    """One process: AdamW with gradient clipping on the stage's layer."""

    def __init__(self, layer, cfg):
        self.layer = layer
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, cfg)
        self.clip = cfg.grad_clip

    # one optimizer step: set_lr, then backward() once per micro-batch (gradients add up), then finish()
    scale = 1  # what the loss is multiplied by: plain autograd adds micro-batch gradients as they are

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss):
        loss.backward()

    def finish(self):
        """Clip, step, clear the gradients; the gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, folder, tag):
        torch.save({"layer": self.layer.state_dict(), "optimizer": self.optimizer.state_dict()},
                   os.path.join(folder, tag, "stage.pt"))

    def load(self, folder, tag, device):
        ckpt = torch.load(os.path.join(folder, tag, "stage.pt"), map_location=device, weights_only=True)
        self.layer.load_state_dict(ckpt["layer"])
        self.optimizer.load_state_dict(ckpt["optimizer"])

    def close(self):
        self.optimizer = None


def own_copies(params):
    """Each parameter's values moved into memory of its own, and the pages of a mapped file they were read from
    unmapped (models.release_file_pages). A target is read mapped from its safetensors files; DeepSpeed writes into
    a parameter on every rank but the first (its broadcast from rank 0 at initialize), which turned each of those
    pages into a private copy, and ZeRO-1/2 then copies the parameter into a flat buffer of its own and points the
    parameter there, so the file's pages stayed mapped (rank 0) or copied (the others) beside the trained layer,
    from stage to stage: measured on a 0.34B target at 2 ranks, 140 MiB more a stage on every rank where 1 rank,
    which trains the mapped tensors themselves, grew by 70. Here DeepSpeed writes and copies a copy that it then
    frees. The values are the same to the bit. A parameter already on an accelerator was not read mapped: it is
    left as it is (a copy would only cost device memory)."""
    from semalign_ds import models
    for p in params:
        if p.device.type != "cpu":
            continue
        mapped = p.data
        p.data = mapped.clone()
        models.release_file_pages(mapped)


class DeepSpeedStage:
    """Several ranks (or a DeepSpeed config): a ZeRO engine over the stage's layer; gradients all-reduced."""

    def __init__(self, layer, cfg, ds):
        import deepspeed
        self.layer = layer
        params = [p for p in layer.parameters() if p.requires_grad]
        own_copies(params)
        # a config with an optimizer block (optimizer offload needs DeepSpeed's CPU Adam) builds its own;
        # otherwise torch's AdamW, which needs no compiled op
        distributed.group_for_deepspeed()
        optimizer = None if "optimizer" in ds else adamw(params, cfg)
        self.engine, *_ = deepspeed.initialize(model=layer, optimizer=optimizer, model_parameters=params,
                                               config=ds)
        # DeepSpeed averages gradients over ranks and divides each micro-batch's loss by the accumulation
        # steps; the losses here are already shares of the global batch's mean, so they are scaled back up
        self.scale = distributed.world() * ds["gradient_accumulation_steps"]

    def set_lr(self, lr):
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss):
        # DeepSpeed counts micro-batches itself and steps the optimizer at the accumulation boundary
        self.engine.backward(loss)
        self.engine.step()

    def finish(self):
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder, tag):
        self.engine.save_checkpoint(folder, tag=tag, save_latest=False)

    def load(self, folder, tag, device):
        self.engine.load_checkpoint(folder, tag=tag)

    def close(self):
        """Free the optimizer's state (fp32 master copy, moments, gradient partitions) once the stage is done.
        The engine hooks the layer (a forward pre- and post-hook that destroy() leaves in place) and ZeRO-1/2 its
        parameters, and all of them reach the optimizer: the layer outlives the stage, so without this every
        finished stage's state stayed resident (measured: rank 0 of a 16-layer 0.34B target at 2 ranks grew from
        1.7 to 5.4 GiB over the stages)."""
        engine, self.engine = self.engine, None
        engine.destroy()  # the optimizer's parameter hooks and mappings
        for name in ("module_forward_pre_hook", "module_forward_post_hook"):  # DeepSpeed's own, guarded
            hook = getattr(engine, name, None)
            if hook is not None:
                hook.remove()
                setattr(engine, name, None)
