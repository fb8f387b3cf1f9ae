"""LoRA adapters on a layer's linear projections (lora_rank > 0): the base weight frozen, a trainable low-rank
update B A scaled by alpha / rank (A Kaiming-uniform, B zeros, so training starts from the base layer), merged
into the weights when the phase ends: checkpoints in between hold the adapters, the export is a plain model."""
from __future__ import annotations

import math

import torch
from torch import nn

from semalign_ds.config import ConfigError


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        return self.base


def check_targets(layer: nn.Module, targets) -> dict:
    """{short name: path} of the linear projections `targets` name in `layer`; a name that matches none is
    refused, naming the ones there are."""
    found = {name.rsplit(".", 1)[-1]: name for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(targets) - set(found))
    if missing:
        raise ConfigError(f"lora_targets {missing} name no linear projection of the target's layers "
                          f"({type(layer).__name__}); its projections: {', '.join(sorted(found)) or 'none'}; "
                          f"set lora_targets to some of them, or lora_rank=0")
    return found


def attach(layer: nn.Module, targets, rank: int, alpha: float, seed: int):
    """Wrap the nn.Linear submodules of `layer` whose own name is in `targets` (seeded init)."""
    found = check_targets(layer, targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for short in sorted(targets):
            parent_name, _, child = found[short].rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    layer.lora_adapted = True  # set_trainable: only the adapters of this layer train


def merge(layer: nn.Module):
    """Fold every adapter of `layer` into its base weight, leaving plain nn.Linear modules."""
    for name, m in list(layer.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, m.merged())
    layer.lora_adapted = False


def set_trainable(module: nn.Module):
    """Every parameter of `module` trainable, except in a layer with adapters, where only the adapters are."""
    module.requires_grad_(True)
    for m in module.modules():
        if getattr(m, "lora_adapted", False):
            for name, p in m.named_parameters():
                p.requires_grad_(".lora_" in "." + name)
