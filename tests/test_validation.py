"""validation_fraction: a seeded share of the transfer set held out (never trained on), its NLL in report.json."""
import json

import pytest
import torch
import torch.nn.functional as F

from semalign_ds import config as config_mod, pipeline
from semalign_ds.data import TokenizedSet
from tests.helpers import TINY_YAML


def test_split_is_seeded_disjoint_and_complete():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 9, (23,), generator=g)
    offsets = torch.zeros(24, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    full = TokenizedSet(torch.randint(0, 50, (int(offsets[-1]),), generator=g),
                        torch.rand(int(offsets[-1]), generator=g) > 0.5, offsets)
    kept, held = full.split(0.3, seed=5)
    assert len(held) == 7 and len(kept) == 16
    rows = lambda s: {tuple(s.ids[s.offsets[i]:s.offsets[i + 1]].tolist()) for i in range(len(s))}
    assert rows(kept) | rows(held) == rows(full) and not rows(kept) & rows(held)
    again, _ = full.split(0.3, seed=5)
    other, _ = full.split(0.3, seed=6)
    assert torch.equal(again.ids, kept.ids) and not torch.equal(other.ids, kept.ids)
    for i, s in enumerate(held.offsets[:-1]):  # loss masks travel with their sequences
        j = [k for k in range(23) if torch.equal(full.ids[full.offsets[k]:full.offsets[k + 1]],
                                                  held.ids[s:held.offsets[i + 1]])][0]
        assert torch.equal(full.loss[full.offsets[j]:full.offsets[j + 1]], held.loss[s:held.offsets[i + 1]])


@pytest.mark.slow
def test_validation_nll_is_reported_on_held_out_examples(tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    cfg = config_mod.load(TINY_YAML, {"max_examples": 17, "stage_steps": 2, "eval_data": None, "batch_size": 3,
                                      "cache_shard_examples": 7, "output_dir": str(out), "report_to": ["none"],
                                      "validation_fraction": 0.25})
    pipeline.run(cfg)
    train = TokenizedSet.load(str(out / "data" / "transfer.safetensors"))
    held = TokenizedSet.load(str(out / "data" / "validation.safetensors"))
    assert len(train) == 13 and len(held) == 4
    report = json.loads((out / "report.json").read_text())
    # the NLL of the exported target on the held-out responses, from the model's own logits in float64
    model = AutoModelForCausalLM.from_pretrained(out / "target").double()
    total, count = 0.0, 0
    for i in range(len(held)):
        ids = held.ids[held.offsets[i]:held.offsets[i + 1]].unsqueeze(0)
        loss = held.loss[held.offsets[i]:held.offsets[i + 1]][:-1]
        logp = F.log_softmax(model(ids).logits[0, :-1], dim=-1)
        total -= float(logp[torch.arange(len(loss)), ids[0, 1:]][loss].sum())
        count += int(loss.sum())
    assert report["validation"]["target_after"]["tokens"] == count
    assert abs(report["validation"]["target_after"]["nll"] - total / count) < 1e-4  # float32 model
    # the trained batches never hold a held-out sequence: the cache has rows for the 13 kept ones only
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["n_examples"] == 13 and manifest["tokens"] == int(train.loss.sum())
