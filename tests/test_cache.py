"""The activation cache refuses a cache made from other inputs, names damaged shards, and recomputes on request."""
import json

import pytest
import torch

from semalign_ds import pipeline
from semalign_ds.cache import ActivationCache, CacheMismatch, CorruptShard
from tests.test_pipeline import tiny_config


def shard_tensors(seed, rows=5):
    gen = torch.Generator().manual_seed(seed)
    return {"aligned.1": torch.randn(rows, 7, generator=gen), "source_final": torch.randn(rows, 9, generator=gen)}


def test_manifest_refuses_other_inputs(tmp_path):
    store = ActivationCache(tmp_path, n_examples=10, shard_examples=4).open({"source": "a", "pairs": [2, 4]})
    assert store.n_shards == 3 and store.shard_range(2) == (8, 10)
    ActivationCache(tmp_path, 10, 4).open({"source": "a", "pairs": [2, 4]})  # the same inputs: reused
    with pytest.raises(CacheMismatch, match=r"made for other inputs \(differs in: pairs\)"):
        ActivationCache(tmp_path, 10, 4).open({"source": "a", "pairs": [3, 4]})
    with pytest.raises(CacheMismatch, match="n_examples, shard_examples"):
        ActivationCache(tmp_path, 12, 5).open({"source": "a", "pairs": [2, 4]})


def test_shards_are_verified_and_recomputed_on_request(tmp_path):
    store = ActivationCache(tmp_path, n_examples=10, shard_examples=4).open({"source": "a"})
    assert store.pending() == [0, 1, 2]
    for i in (0, 2):
        store.write(i, shard_tensors(i))
    assert store.pending() == [1]
    entry = json.loads((tmp_path / "shard-00002.json").read_text())
    assert entry["tokens"] == 5 and entry["shapes"]["aligned.1"] == [5, 7]
    data = tmp_path / "shard-00002.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte in the tensor data
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptShard, match="shard-00002.safetensors fails its checksum"):
        store.pending()
    assert store.pending(recompute_corrupt=True) == [1, 2]
    assert not data.exists()


@pytest.mark.slow
def test_a_run_recomputes_a_corrupt_shard(tmp_path, capfd):
    """A flipped byte in a shard of a finished cache: the rerun notices, recomputes that shard and trains on it."""
    out = tmp_path / "run"
    pipeline.run(tiny_config(out, eval_data=None, stage_steps=2))
    shard = out / "cache" / "shard-00001.safetensors"
    good = shard.read_bytes()
    target = (out / "target" / "model.safetensors").read_bytes()
    raw = bytearray(good)
    raw[-5] ^= 0x55
    shard.write_bytes(bytes(raw))
    state = json.loads((out / "state.json").read_text())
    assert "cache" in state["done"]
    capfd.readouterr()
    pipeline.run(tiny_config(out, eval_data=None, stage_steps=2))
    assert "recomputing: cache shard" in capfd.readouterr().out
    assert shard.read_bytes() == good
    assert (out / "target" / "model.safetensors").read_bytes() == target


@pytest.mark.parametrize("aligned_input, source_states", [(False, False), (True, True)])
def test_batch_entries_match_the_whole_states(aligned_input, source_states):
    """A cache batch's rows, taken as each layer returns its state, are those computed from every layer's whole
    state, to the bit: a^(k) = M u^(l(k)) at the loss positions of a right-padded batch (u in float32, as the cache
    stores it), the unit states themselves, and n_s(h^(L)); a layer paired twice gives the same rows twice."""
    from semalign_ds import models
    from semalign_ds.alignment import source_direction
    from semalign_ds.cache import batch_entries
    from tests.helpers import random_model
    ad = models.Adapter(random_model("llama", layers=5, seed=11))
    gen = torch.Generator().manual_seed(12)
    ids = torch.randint(1, 97, (3, 11), generator=gen)
    attn = torch.ones_like(ids)
    attn[0, 7:] = 0
    attn[2, 4:] = 0
    loss = (torch.rand(ids.shape, generator=gen) < 0.7) & attn.bool()
    m = torch.randn(6, ad.width, generator=gen)
    pairs = [1, 3, 3, 5]
    got = batch_entries(ad, ids, attn, loss, pairs, m, True, source_states=source_states,
                        aligned_input=aligned_input)
    whole = ad.hidden_states(ids, attn)
    layers = ([0] if aligned_input else []) + pairs
    want = {}
    for k, l in enumerate(layers, start=0 if aligned_input else 1):
        u = source_direction(whole[l][loss], ad.norm)
        want[f"aligned.{k}"] = u @ m.T
        if source_states and k > 0:
            want[f"source.{k}"] = u
    want["source_final"] = ad.norm(whole[-1][loss]).float()
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].shape[0] == int(loss.sum())
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
