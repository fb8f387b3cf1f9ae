"""Compute accounting: layer-token counts and an estimated FLOP count per phase, so that methods are compared at
equal training compute rather than at equal step counts.

A layer-token is one decoder layer run on one token position (padding excluded). The FLOP estimate is the usual
dense count: a layer's forward costs 2 FLOPs per weight per token plus causal attention, 2 * T * d per token
(scores and values over T/2 keys on average, 2 FLOPs each); a backward that also takes weight gradients costs twice
its forward, one that only passes activation gradients (frozen weights: attribution, LoRA) costs once its forward;
a projection through the LM head costs 2 * d * V per loss position (it dominates a small model's step: SmolLM2's
head is 16 times a layer). Norms, softmaxes and the alignment map are left out. The objectives' head projections
per loss position come from the objectives registry (objectives.Recipe.step_heads).

This is the project's one cost model: a run's budget.json, the dry run's FLOPs and compare.py's equal-compute
matching all count with cost() and predicted_phases().
"""
from __future__ import annotations

from semalign_ds import objectives


def model_counts(config, dtype=None) -> dict:
    """Counts of the model a Hugging Face config describes, from a copy built on the meta device (no memory for
    weights, any architecture the adapter supports): layers, width, heads, vocabulary rows, every parameter (tied
    ones once), one decoder layer's parameters, multiply-adds per token of one layer's linear maps, of all layers'
    and of the LM head, and max_position_embeddings."""
    key = (config.to_json_string(), str(dtype))
    if key not in _COUNTS:
        import torch
        from transformers import AutoModelForCausalLM

        from semalign_ds import models
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
        adapter = models.Adapter(model)  # refuses unsupported architectures, as a run would
        layer = adapter.layers[0]
        _COUNTS[key] = {
            "layers": adapter.num_layers, "width": adapter.width, "heads": config.num_attention_heads,
            "vocab": adapter.head.weight.shape[0], "params": sum(p.numel() for p in model.parameters()),
            "layer_params": sum(p.numel() for p in layer.parameters()), "layer_matmul": matmul(layer),
            "body_matmul": sum(matmul(x) for x in adapter.layers), "head_matmul": matmul(adapter.head),
            "max_positions": getattr(config, "max_position_embeddings", None)}
    return _COUNTS[key]


_COUNTS = {}


def linear_in_out(module):
    """(inputs, outputs) of a linear map: nn.Linear, or GPT-2's Conv1D (weight stored [in, out]); else None."""
    import torch
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def matmul(module) -> int:
    """Multiply-adds per token of every linear map inside `module`."""
    return sum(i * o for i, o in filter(None, map(linear_in_out, module.modules())))


def shape(config, vocab: int, source_width: int | None = None) -> dict:
    """What cost() needs of a model: per-layer matmul weights (norms and biases left out), width, layer count,
    vocabulary, and the width of the source whose head the output KL also projects through (default: the same)."""
    counts = model_counts(config)
    return {"layer_params": counts["layer_matmul"], "width": counts["width"], "layers": counts["layers"],
            "vocab": vocab, "source_width": source_width or counts["width"]}


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


def predicted_phases(cfg, model: dict, examples: int, tokens: int, loss_positions: int) -> dict:
    """The FLOPs each training phase of `cfg` will count (cost() as training.py writes them), before it runs, from
    the transfer set's size: {"whole": f} for output KD or fine-tuning; {"stages": [f_1, ..., f_L]} (stage k and the
    frontier it then computes over every position) and/or {"joint": f}. Sampled batches are counted at the set's
    mean length and mean loss positions. One model of cost for the run's budget, the dry run and compare.py."""
    n_layers, mean_len, mean_loss = model["layers"], tokens / examples, loss_positions / examples
    step_positions, step_loss = cfg.batch_size * mean_len, cfg.batch_size * mean_loss
    recipe = objectives.recipe(cfg)

    def heads(kind, final=True):
        return recipe.step_heads(kind, final, model["vocab"], model["width"], model.get("source_width", model["width"]),
                                 n_layers, cfg.joint_layer_weight)

    def phase(steps, layers, heads):
        return cost(model, steps * step_positions, steps * step_loss, mean_len, layers, layers, *heads,
                    weight_grads=cfg.lora_rank == 0)["flops"]

    if cfg.trains_whole_model:
        return {"whole": phase(cfg.stage_steps * n_layers, n_layers, heads("whole"))}
    out = {}
    if cfg.frontier_stages:
        frontier = cost(model, tokens, 0, mean_len, 1)["flops"]
        out["stages"] = [phase(cfg.stage_steps, 1, heads("stage", k == n_layers)) + frontier
                         for k in range(1, n_layers + 1)]
    if cfg.joint_steps > 0:
        out["joint"] = phase(cfg.joint_steps, n_layers, heads("joint"))
    return out


def predicted_training(cfg, model: dict, lengths, loss_counts) -> float:
    """The training FLOPs a run of `cfg` will count, from the transfer set's sequence lengths and loss counts: what
    compare.py sets each method's steps by, to hold training compute equal."""
    phases = predicted_phases(cfg, model, len(lengths), int(lengths.sum()), int(loss_counts.sum()))
    return sum(phases.get("stages", [])) + phases.get("whole", 0.0) + phases.get("joint", 0.0)


def steps_for(cfg, budget_flops: float, model: dict, lengths, loss_counts) -> int:
    """The stage_steps (at least 1) that bring cfg's predicted training FLOPs closest to budget_flops (the
    prediction is affine in stage_steps; joint_steps stay as set)."""
    one, two = (predicted_training(cfg.model_copy(update={"stage_steps": k}), model, lengths, loss_counts)
                for k in (1, 2))
    per_step = two - one
    return max(1, round((budget_flops - (one - per_step)) / per_step))
