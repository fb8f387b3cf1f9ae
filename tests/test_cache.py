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


@pytest.mark.slow
def test_shard_rows_are_in_example_order(tmp_path):
    """The cache cuts a shard into its cheapest batches, longest examples first, and puts each batch's rows back in
    example order: every row of a shard equals that example's entries computed alone, shards of 7 in batches of 3
    over examples of unequal lengths (float32: the batch shapes differ, so the last bits may)."""
    from safetensors.torch import load_file

    from semalign_ds import data as data_mod
    from semalign_ds import models
    from semalign_ds.cache import batch_entries
    out = tmp_path / "run"
    cfg = tiny_config(out, eval_data=None, stage_steps=1, max_examples=17, cache_shard_examples=7,
                      eval_batch_size=3)
    pipeline.run(cfg)
    pairs = json.loads((out / "plan.json").read_text())["pairs"]
    m = load_file(out / "alignment.safetensors")["M"]
    flat = load_file(out / "data" / "transfer.safetensors")
    tokens = data_mod.TokenizedSet(flat["ids"], flat["loss"], flat["offsets"])
    order = [i for b in data_mod.cheapest_batches(range(7), tokens.lengths, 3)[1] for i in b]
    assert order != sorted(order)  # lengths that the cheapest cut reorders
    ad = models.Adapter(models.load_model(cfg.source, dtype="float32", seed=cfg.seed))
    for shard, (lo, hi) in enumerate([(0, 7), (7, 14), (14, 17)]):
        got = load_file(out / "cache" / f"shard-{shard:05d}.safetensors")
        want = {}
        for i in range(lo, hi):
            ids, attn, loss = tokens.batch([i], data_mod.pad_id(models.load_tokenizer(cfg.source)))
            with torch.no_grad():
                one = batch_entries(ad, ids, attn, loss, pairs, m, cfg.normalize_source)
            for k, v in one.items():
                want.setdefault(k, []).append(v)
        for k, parts in want.items():
            torch.testing.assert_close(got[k], torch.cat(parts), rtol=1e-5, atol=1e-5)
