"""Compute accounting: the FLOP estimate against hand counts, and a run's budget.json against its batches."""
import json

import pytest

from semalign_ds import budget, config as config_mod, pipeline
from semalign_ds.data import TokenizedSet, batch_order
from tests.helpers import TINY_YAML, random_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_layer_weights_are_the_models_own(arch):
    model = random_model(arch, layers=2)
    layer = (model.transformer.h if arch == "gpt2" else model.model.layers)[0]
    d = model.config.hidden_size
    # norms and biases are not matmul weights: count only 2-D weights
    weights = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    assert budget.shape(model.config, 97) == {"layer_params": weights, "width": d, "layers": 2, "vocab": 97,
                                              "source_width": d}
    assert budget.shape(model.config, 97, source_width=7)["source_width"] == 7


def test_cost_is_the_hand_count():
    model = {"layer_params": 1237, "width": 19, "layers": 3, "vocab": 301}
    got = budget.cost(model, positions=731, loss_positions=211, mean_len=17.5, layers_forward=3, layers_backward=2,
                      heads_forward=2, heads_backward=1, seconds=1.5)
    per_token = 2 * 1237 + 2 * 17.5 * 19
    want = per_token * 731 * (3 + 2 * 2) + 2 * 19 * 301 * 211 * (2 + 2 * 1)
    assert got == {"forward_layer_tokens": 731 * 3, "backward_layer_tokens": 731 * 2, "flops": want, "seconds": 1.5}
    frozen = budget.cost(model, 731, 211, 17.5, 3, 2, 2, 1, weight_grads=False)
    assert frozen["flops"] == per_token * 731 * (3 + 2) + 2 * 19 * 301 * 211 * 3
    total = budget.add(got, frozen)
    assert total["flops"] == got["flops"] + frozen["flops"] and "seconds" not in total


@pytest.mark.slow
def test_a_runs_budget_counts_its_batches(tmp_path):
    cfg = config_mod.load(TINY_YAML, {"max_examples": 13, "stage_steps": 3, "eval_data": None, "batch_size": 3,
                                      "cache_shard_examples": 7, "output_dir": str(tmp_path / "run"),
                                      "report_to": ["none"], "attribution_recompute": True})
    pipeline.run(cfg)
    got = json.loads((tmp_path / "run" / "budget.json").read_text())
    data = TokenizedSet.load(str(tmp_path / "run" / "data" / "transfer.safetensors"))
    total = int(data.lengths.sum())
    for k in (1, 2, 3):
        trained = sum(int(data.lengths[b].sum()) for b in batch_order(13, 3, 3, cfg.seed, k))
        stage = got["phases"][f"stage_{k}"]
        assert stage["backward_layer_tokens"] == trained
        assert stage["forward_layer_tokens"] == trained + total  # and the next frontier
        assert stage["flops"] > 0 and stage["seconds"] > 0
    assert got["phases"]["cache"]["forward_layer_tokens"] == 6 * total  # 6 source layers
    assert got["phases"]["attribution"]["backward_layer_tokens"] == 6 * total
    assert got["phases"]["attribution"]["forward_layer_tokens"] == 2 * 6 * total  # each layer recomputed
    assert got["training"]["flops"] == pytest.approx(sum(got["phases"][f"stage_{k}"]["flops"] for k in (1, 2, 3)))
    assert got["total"]["flops"] == pytest.approx(got["training"]["flops"] + got["phases"]["cache"]["flops"]
                                                  + got["phases"]["attribution"]["flops"])
    # the prediction compare.py matches budgets with (mean lengths for the sampled batches) against the count
    from semalign_ds import models
    shape = budget.shape(models.config_of(cfg.target), 512, models.config_of(cfg.source).hidden_size)
    predicted = budget.predicted_training(cfg, shape, data.lengths, data.loss_counts)
    assert predicted == pytest.approx(got["training"]["flops"], rel=0.15)
    print(f"predicted / counted training FLOPs: {predicted / got['training']['flops']:.4f}")


def test_the_joint_phase_counts_the_layer_objectives_it_computes():
    """Heads per loss position of a joint step: the output's KL (2 forward, 1 backward) plus, while the layer
    weight is above 0, the Fisher objective's two projections (W x, W y) and one backward for each of the L - 1
    lower layers; a joint phase at weight 0 is output KD and costs what it does."""
    from semalign_ds import objectives
    cfg = config_mod.load(TINY_YAML, {"joint_steps": 5})
    assert cfg.layer_objective == "fisher" and cfg.fisher_weight == 0 and cfg.ce_weight == 0

    def heads(c, kind, weight=None):
        weight = c.joint_layer_weight if weight is None else weight
        return objectives.recipe(c).step_heads(kind, True, 97, 16, 16, 7, weight)

    assert heads(cfg, "joint") == (2 + 2 * 6, 1 + 6)
    assert heads(cfg, "joint", 0.0) == (2, 1)
    assert heads(cfg, "joint", 0.0) == heads(cfg.model_copy(update={"method": "output_kd", "joint_steps": 0}),
                                             "whole")
    cosine = cfg.model_copy(update={"layer_objective": "cosine"})
    assert heads(cosine, "joint") == (2, 1)  # the cosine objective needs no head


def test_the_dry_run_and_the_budget_count_the_same_training_flops():
    """One cost model: the dry run's training rows are budget.predicted_phases of the same counts."""
    from semalign_ds import dryrun
    for extra in ({}, {"method": "output_kd"}, {"joint_steps": 3, "layer_objective": "cosine"},
                  {"fisher_topk": 5}):
        cfg = config_mod.load(TINY_YAML, {"max_examples": 13, "stage_steps": 3, **extra})
        p = dryrun.plan(cfg, 1)
        model = {"layer_params": p.target.layer_matmul, "width": p.target.width, "layers": p.target.layers,
                 "vocab": min(p.source.vocab, p.target.vocab), "source_width": p.source.width}
        want = budget.predicted_phases(cfg, model, p.tokens.examples, p.tokens.tokens, p.tokens.loss_positions)
        training = sum(ph.flops for ph in p.phases if ph.in_total and ph.name not in ("attribution", "alignment",
                                                                                    "activation cache"))
        assert training == pytest.approx(sum(want.get("stages", [])) + want.get("whole", 0) + want.get("joint", 0),
                                         rel=1e-12), extra
