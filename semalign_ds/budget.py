"""Compute accounting: layer-token counts and an estimated FLOP count per phase, so that methods are compared at
equal training compute rather than at equal step counts.

A layer-token is one decoder layer run on one token position (padding excluded). The FLOP estimate is the usual
dense count: a layer's forward costs 2 FLOPs per weight per token plus causal attention, 2 * T * d per token
(scores and values over T/2 keys on average, 2 FLOPs each); a backward that also takes weight gradients costs twice
its forward, one that only passes activation gradients (frozen weights: attribution, LoRA) costs once its forward;
a projection through the LM head costs 2 * d * V per loss position (it dominates a small model's step: SmolLM2's
head is 16 times a layer). Norms, softmaxes and the alignment map are left out.
"""
from __future__ import annotations


def shape(config, vocab: int) -> dict:
    """What the estimate needs of a Hugging Face model config: per-layer matmul weights (norms and biases left
    out), width, layer count, vocabulary."""
    d = config.hidden_size
    if config.model_type == "gpt2":
        inner = config.n_inner or 4 * d
        per_layer = 4 * d * d + 2 * d * inner
        layers = config.n_layer
    else:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        per_layer = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * config.intermediate_size
        layers = config.num_hidden_layers
    return {"layer_params": per_layer, "width": d, "layers": layers, "vocab": vocab}


def cost(model: dict, positions: int, loss_positions: int, mean_len: float, layers_forward: int,
         layers_backward: int = 0, heads_forward: int = 0, heads_backward: int = 0, weight_grads=True,
         seconds: float | None = None) -> dict:
    """Counts and FLOPs of running `layers_forward` layers of `model` (shape()) forward over `positions` token
    positions and `layers_backward` of them backward, and the head `heads_forward` / `heads_backward` times over
    `loss_positions` positions. mean_len: mean sequence length (attention's share)."""
    per_token = 2 * model["layer_params"] + 2 * mean_len * model["width"]
    head = 2 * model["width"] * model["vocab"]
    backward_factor = 2 if weight_grads else 1
    flops = (per_token * positions * (layers_forward + backward_factor * layers_backward)
             + head * loss_positions * (heads_forward + backward_factor * heads_backward))
    out = {"forward_layer_tokens": positions * layers_forward, "backward_layer_tokens": positions * layers_backward,
           "flops": float(flops)}
    if seconds is not None:
        out["seconds"] = seconds
    return out


def add(*costs) -> dict:
    """The sum of several cost() results (seconds included when every one has them)."""
    out = {"forward_layer_tokens": 0, "backward_layer_tokens": 0, "flops": 0.0}
    for c in costs:
        for key in out:
            out[key] += c[key]
    if costs and all("seconds" in c for c in costs):
        out["seconds"] = sum(c["seconds"] for c in costs)
    return out


def training_heads(cfg, final: bool, kind: str, n_layers: int = 1) -> tuple[int, int]:
    """(head projections forward, backward) per loss position of one training step. kind: "stage" (one frontier
    stage), "output_kd", "finetune", or "joint" (every layer: the output's and n_layers - 1 layer objectives)."""
    if kind == "finetune":
        return 1, 1  # the labels' cross-entropy
    layer = (2, 1) if cfg.method == "semalign" and cfg.layer_objective == "fisher" else (0, 0)  # W x and W y
    if kind == "stage" and not final:
        return layer
    fwd, bwd = 2, 1  # the KL: the target's and the source's logits, the target's backward
    terms = (kind != "output_kd" and cfg.fisher_weight > 0) + (n_layers - 1 if kind == "joint" else 0)
    fwd, bwd = fwd + terms * layer[0], bwd + terms * layer[1]
    if cfg.ce_weight > 0:
        fwd, bwd = fwd + 1, bwd + 1
    return fwd, bwd
