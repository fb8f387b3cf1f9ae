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
    joint_layers = n_layers - 1 if kind == "joint" and cfg.joint_layer_weight > 0 else 0  # weight 0: not computed
    terms = (kind != "output_kd" and cfg.fisher_weight > 0) + joint_layers
    fwd, bwd = fwd + terms * layer[0], bwd + terms * layer[1]
    if cfg.ce_weight > 0:
        fwd, bwd = fwd + 1, bwd + 1
    return fwd, bwd


def predicted_training(cfg, model: dict, lengths, loss_counts) -> float:
    """The training FLOPs a run of `cfg` will count (its phases' cost() as training.py writes them), before it
    runs, from the transfer set's sequence lengths and loss counts (means for the sampled batches, the whole set
    for the frontiers): what compare.py sets each method's steps by, to hold training compute equal."""
    n_layers, mean_len, mean_loss = model["layers"], float(lengths.float().mean()), float(loss_counts.float().mean())
    step_positions, step_loss = cfg.batch_size * mean_len, cfg.batch_size * mean_loss

    def phase(steps, layers, heads):
        return cost(model, steps * step_positions, steps * step_loss, mean_len, layers, layers, *heads,
                    weight_grads=cfg.lora_rank == 0)["flops"]

    if cfg.method in ("output_kd", "finetune"):
        return phase(cfg.stage_steps * n_layers, n_layers, training_heads(cfg, True, cfg.method, n_layers))
    total = 0.0
    if cfg.frontier_stages:
        total += sum(phase(cfg.stage_steps, 1, training_heads(cfg, k == n_layers, "stage"))
                     for k in range(1, n_layers + 1))
        total += n_layers * cost(model, int(lengths.sum()), 0, mean_len, 1)["flops"]  # the frontiers
    if cfg.joint_steps > 0:
        total += phase(cfg.joint_steps, n_layers, training_heads(cfg, True, "joint", n_layers))
    return total


def steps_for(cfg, budget_flops: float, model: dict, lengths, loss_counts) -> int:
    """The stage_steps (at least 1) that bring cfg's predicted training FLOPs closest to budget_flops (the
    prediction is affine in stage_steps; joint_steps stay as set)."""
    one, two = (predicted_training(cfg.model_copy(update={"stage_steps": k}), model, lengths, loss_counts)
                for k in (1, 2))
    per_step = two - one
    return max(1, round((budget_flops - (one - per_step)) / per_step))
