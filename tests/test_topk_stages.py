"""Top-k Fisher from the cache (fisher_topk): the layer stages train on the cached support of p*; with k = V it is
the exact loss, and the tail mass of every layer stage goes into the metrics."""
import json

import pytest
from safetensors.torch import load_file

from tests.parity import GOLDEN, launch

pytestmark = pytest.mark.slow  # pipeline runs in subprocesses

GOLD = json.load(open(GOLDEN))


def losses(out):
    got = {}
    for line in open(out / "metrics.jsonl"):
        row = json.loads(line)
        if "loss" in row:
            got.setdefault(row["tag"], []).append((row["step"], row["loss"], row.get("tail_mass")))
    return {tag: sorted(rows) for tag, rows in got.items()}


def test_k_equal_to_the_vocabulary_is_the_exact_loss(tmp_path):
    proc = launch(tmp_path / "run", 1, {"fisher_topk": 512})  # the tiny tokenizer's 512 tokens
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = losses(tmp_path / "run")
    for tag, want in GOLD["world1"]["losses"].items():
        assert [loss for _, loss, _ in got[tag]] == pytest.approx(want, rel=2e-5), tag
    assert all(tail == pytest.approx(0, abs=1e-6) for _, _, tail in got["stage_1"])


def test_a_small_k_trains_on_the_cached_support_and_reports_its_tail(tmp_path):
    proc = launch(tmp_path / "run", 2, {"fisher_topk": 16})
    assert proc.returncode == 0, proc.stderr[-4000:]
    shard = load_file(tmp_path / "run" / "cache" / "shard-00000.safetensors")
    assert shard["topk_ids.1"].shape[1] == 16 and str(shard["topk_ids.1"].dtype) == "torch.int32"
    assert "topk_ids.3" not in shard  # the output stage trains on the KL
    got = losses(tmp_path / "run")
    for tag in ("stage_1", "stage_2"):
        tails = [tail for _, _, tail in got[tag]]
        assert all(0 < t < 1 for t in tails), tag
    assert all(tail is None for _, _, tail in got["stage_3"])
