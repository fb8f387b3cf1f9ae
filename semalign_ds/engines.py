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

from semalign_ds import distributed
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
    for key in ("bf16", "fp16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = (dtype == "bfloat16") if key == "bf16" else False
    expect = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    if ds["train_batch_size"] != expect:
        raise ConfigError(f"DeepSpeed batch sizes disagree: train_batch_size {ds['train_batch_size']} != micro "
                          f"{ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']}"
                          f" x world {world}; leave them \"auto\"")
    return ds


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

def sharded_source(spec, gguf_file, dtype, seed, ds):
    """(model, engine): the source built partitioned (no rank ever holds it whole) and its inference engine."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from semalign_ds import models
    distributed.group_for_deepspeed()  # zero.Init partitions over the group while the model loads
    if models.resolve(spec, gguf_file)[0].endswith(".json"):
        # a random-init model must get the same weights as on one process: build it whole, partition it in
        # deepspeed.initialize (random-init models are small test models)
        model = models.load_model(spec, gguf_file, dtype, seed)
    else:
        # while this object lives, from_pretrained loads straight into partitions (zero.Init); it is one global,
        # dropped at once so that later models are built whole
        zero3 = HfDeepSpeedConfig(ds)
        try:
            model = models.load_model(spec, gguf_file, dtype, seed)
        finally:
            del zero3
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return model, engine


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


def whole(param):
    """A detached, whole copy of a (possibly partitioned) parameter."""
    with gathered([param]):
        return param.detach().clone()


# ---------------------------------------------------------------------------------------------------------------
# a frontier stage: plain PyTorch, or a DeepSpeed ZeRO-2 engine

class TorchStage:
    """One process: AdamW with gradient clipping on the stage's layer."""

    def __init__(self, layer, cfg):
        self.layer = layer
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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


class DeepSpeedStage:
    """Several ranks (or a DeepSpeed config): a ZeRO engine over the stage's layer; gradients all-reduced."""

    def __init__(self, layer, cfg, ds):
        import deepspeed
        self.layer = layer
        params = [p for p in layer.parameters() if p.requires_grad]
        # a config with an optimizer block (optimizer offload needs DeepSpeed's CPU Adam) builds its own;
        # otherwise torch's AdamW, which needs no compiled op
        distributed.group_for_deepspeed()
        optimizer = None if "optimizer" in ds else torch.optim.AdamW(params, lr=cfg.lr,
                                                                       weight_decay=cfg.weight_decay)
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
