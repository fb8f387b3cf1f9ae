"""The paths users take, on CPU: the tiny config in bfloat16 on 1 and 2 ranks, a pruned target
(target_keep_layers), every shipped DeepSpeed config on 2 ranks, and the baselines on 2 ranks against 1 rank."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.parity import GOLDEN, ROOT, launch

pytestmark = pytest.mark.slow  # pipeline runs on 1 and 2 ranks

GOLD = json.load(open(GOLDEN))


def stage_metrics(out):
    return json.loads((out / "metrics.json").read_text())["stages"]


def weights(out):
    return load_file(os.path.join(out, "target", "model.safetensors"))


@pytest.mark.parametrize("world", [1, 2])
def test_bfloat16_runs_to_the_end_with_the_float32_losses(world, tmp_path):
    proc = launch(tmp_path / "bf16", world, {"dtype": "bfloat16"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = stage_metrics(tmp_path / "bf16")
    fp32 = GOLD[f"world{world}"]["losses"]
    for k, m in metrics.items():
        assert math.isfinite(m["last_loss"])
        # the first step's loss depends on the cache and the initial layer only: bf16 rounding, not a new method
        assert m["first_loss"] == pytest.approx(fp32[f"stage_{k}"][0], rel=0.05), k
    assert all(t.dtype == torch.bfloat16 for t in weights(tmp_path / "bf16").values())
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())
    assert math.isfinite(report["target_after"]["nll"])


def test_a_pruned_target_on_2_ranks_matches_1_rank(tmp_path):
    keep = {"target": "null", "target_keep_layers": "[0,2,5]"}
    one, two = tmp_path / "one", tmp_path / "two"
    for out, world in ((one, 1), (two, 2)):
        proc = launch(out, world, keep)
        assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys() and sum(".layers." in k and "q_proj" in k for k in a) == 3
    for k in a:  # sums in another order, amplified by Adam in near-zero gradient coordinates: compare norms
        # (wrong gradient averaging across ranks would differ by tens of percent)
        assert (b[k].double() - a[k].double()).norm() <= 1e-3 * a[k].double().norm(), k


@pytest.mark.parametrize("name", ["source_zero3", "target_zero2", "target_zero3", "target_zero2_offload"])
def test_every_shipped_deepspeed_config_on_2_ranks(name, tmp_path):
    key = "ds_source_config" if name.startswith("source") else "ds_target_config"
    proc = launch(tmp_path / name, 2, {key: os.path.join(ROOT, "ds_configs", f"{name}.json")}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = json.loads((tmp_path / name / "metrics.json").read_text())["stages"]
    gold = GOLD["world2"]["losses"]
    for k, m in losses.items():
        # ZeRO stages and optimizer offload change where the optimizer runs, not what it computes
        assert m["last_loss"] == pytest.approx(gold[f"stage_{k}"][-1], rel=1e-3), (name, k)


@pytest.mark.parametrize("method", ["layerwise", "output_kd"])
def test_baselines_on_2_ranks_match_1_rank(method, tmp_path):
    runs, first = {}, {}
    for world in (1, 2):
        proc = launch(tmp_path / f"w{world}", world, {"method": method, "eval_data": "null"})
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[world] = weights(tmp_path / f"w{world}")
        first[world] = first_losses(tmp_path / f"w{world}")
    # every phase's first step: the same loss but for the order of float32 sums (wrong averaging: tens of percent);
    # a later stage's first step runs through the layers the earlier stages trained, whose Adam steps amplify the
    # sums' order (layerwise, stage 3: 1.8e-6 relative, with caches equal to the bit on 1 and 2 ranks)
    assert first[1].keys() == first[2].keys() and first[1]
    for tag, loss in first[1].items():
        assert first[2][tag] == pytest.approx(loss, rel=1e-6 if tag == "stage_1" else 1e-5), tag
    for k in runs[1]:  # after the steps: the sums' order, amplified by Adam in near-zero coordinates (layerwise, the
        # largest difference 1.1e-3 of a norm, in layer 2's q_proj, with the sequences dealt to the ranks by loss
        # positions, and 2.6e-4 dealt out strided; the first steps' losses agree within 3e-8): compare norms
        a, b = runs[1][k].double(), runs[2][k].double()
        assert (b - a).norm() <= 3e-3 * a.norm(), k


def first_losses(out):
    """{phase: the loss of its first step} from a run's metrics.jsonl."""
    first = {}
    with open(out / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row and row["step"] == 0:
                first.setdefault(row["tag"], row["loss"])
    return first


def tiny_checkpoint(folder):
    """The tiny config's source (its random weights, seed 0) saved as safetensors with the tiny tokenizer: a target
    cut by width is sliced from a checkpoint's files."""
    import shutil

    from semalign_ds import models
    from tests.helpers import TINY
    models.load_model(os.path.join(TINY, "source.json"), None, "float32", 0).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TINY, name), folder / name)
    return str(folder)


def test_a_width_pruned_target_on_2_ranks_matches_1_rank_and_runs_in_bfloat16(tmp_path):
    """A target cut by width and depth (64 -> 48 channels, 4 -> 2 query heads in 1 KV group, MLP 160 -> 96, 3 of 6
    layers by block importance): on 2 ranks the same cut, the same 48 x 64 alignment map and the same trained
    target as on 1 rank; in bfloat16 on 1 rank, every stage's first loss near the float32 one and an export that
    loads in transformers and gives the trainer's logits."""
    from transformers import AutoModelForCausalLM

    from semalign_ds import models
    width = {"source": tiny_checkpoint(tmp_path / "source"), "target": "null", "target_hidden_size": 48,
             "target_num_heads": 2, "target_num_kv_heads": 1, "target_intermediate_size": 96,
             "target_depth": "block_importance", "target_num_layers": 3, "prune_calibration_examples": 6}
    for out, world, extra in (("w1", 1, {}), ("w2", 2, {}), ("bf16", 1, {"dtype": "bfloat16"})):
        proc = launch(tmp_path / out, world, {**width, **extra})
        assert proc.returncode == 0, (out, proc.stderr[-4000:])
    done = {out: json.loads((tmp_path / out / "state.json").read_text())["done"] for out in ("w1", "w2", "bf16")}
    from semalign_ds import summary
    assert "-> a cut of it: width 48, 3 layers by block importance" in summary.summarize(str(tmp_path / "w1"))
    assert done["w2"]["prune"]["files"] == done["w1"]["prune"]["files"]  # one cut, made by rank 0
    maps = {out: load_file(os.path.join(tmp_path, out, "alignment.safetensors"))["M"] for out in ("w1", "w2")}
    assert maps["w1"].shape == (48, 64)
    torch.testing.assert_close(maps["w2"], maps["w1"], rtol=1e-5, atol=1e-6)
    a, b = weights(tmp_path / "w1"), weights(tmp_path / "w2")
    assert a["model.embed_tokens.weight"].shape == (512, 48) and sum("q_proj" in k for k in a) == 3
    for k in a:  # as for a depth-pruned target: sums in another order, so compare norms
        assert (b[k].double() - a[k].double()).norm() <= 1e-3 * a[k].double().norm(), k
    fp32, bf16 = stage_metrics(tmp_path / "w1"), stage_metrics(tmp_path / "bf16")
    assert fp32.keys() == bf16.keys() and len(fp32) == 3
    for k, m in bf16.items():
        assert math.isfinite(m["last_loss"]) and m["first_loss"] == pytest.approx(fp32[k]["first_loss"], rel=0.05), k
    assert all(t.dtype == torch.bfloat16 for t in weights(tmp_path / "bf16").values())
    folder = str(tmp_path / "bf16" / "target")
    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    trainer = models.Adapter(models.load_model(folder, None, "bfloat16"))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 512, (3, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 9:] = 0
    with torch.no_grad():
        want = trainer.head(trainer.norm(trainer.hidden_states(ids, mask)[-1])).float()
        got = exported(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    assert float((got - want)[keep].abs().max()) <= 1e-2 * float(want[keep].abs().max())  # bf16 rounding
