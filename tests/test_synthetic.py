"""Synthetic models: random-init Llama shapes written shard by shard, verified, rebuilt when damaged."""
import json
import os

import pytest
import torch

from semalign_ds import models, synthetic
from semalign_ds.config import ConfigError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh model cache, sharing the SmolLM2 tokenizer of the usual one (converting it takes ~30 s)."""
    tokenizer = synthetic.tokenizer_folder()
    monkeypatch.setenv("SEMALIGN_DS_CACHE", str(tmp_path))
    os.makedirs(tmp_path / "synthetic")
    os.symlink(tokenizer, tmp_path / "synthetic" / "smollm2-tokenizer")
    synthetic._VERIFIED.clear()
    yield tmp_path
    synthetic._VERIFIED.clear()


def test_tiny_is_sharded_and_loads(cache):
    from transformers import AutoModelForCausalLM
    path = models.resolve("synthetic:llama-tiny")[0]
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) > 1  # 4 MiB shards
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert sorted(set(index["weight_map"].values())) == shards
    model = AutoModelForCausalLM.from_pretrained(path)  # strict enough: a missing tensor would be random-init
    n = sum(p.numel() for p in model.parameters())
    assert n == synthetic.parameter_count("llama-tiny") == models.parameter_count("synthetic:llama-tiny")
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)  # every tensor written, none left to transformers' init
    w = state["model.layers.1.mlp.up_proj.weight"]
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    assert torch.equal(state["model.norm.weight"], torch.ones(64))
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # untied in the tiny shape
    assert models.config_of("synthetic:llama-tiny").num_hidden_layers == 4
    tok = models.load_tokenizer("synthetic:llama-tiny")
    assert len(tok) == synthetic.VOCAB == model.config.vocab_size
    ids = torch.tensor([tok("def f(x):\n    return x")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()


def test_same_seed_same_weights_and_damage_is_rebuilt(cache, capsys):
    path = synthetic.ensure("llama-tiny")
    shard = os.path.join(path, sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1])
    with open(shard, "rb") as f:
        original = f.read()
    with open(shard, "r+b") as f:  # damage in place: same size, zeroed middle
        f.seek(len(original) // 2)
        f.write(bytes(4096))
    assert "damaged" in synthetic.verify("llama-tiny", path)
    synthetic._VERIFIED.clear()
    assert synthetic.ensure("llama-tiny") == path
    assert "writing it again" in capsys.readouterr().out
    with open(shard, "rb") as f:
        assert f.read() == original  # rebuilt with the same values
    os.truncate(shard, 100)
    assert "wrong size" in synthetic.verify("llama-tiny", path)
    os.remove(os.path.join(path, synthetic.MARKER))  # a build killed before its marker: incomplete
    assert "marker" in synthetic.verify("llama-tiny", path)
    synthetic._VERIFIED.clear()
    synthetic.ensure("llama-tiny")
    assert synthetic.verify("llama-tiny", path) is None


def test_bad_name_is_refused_with_the_names(cache):
    for call in (lambda: models.check_exists("synthetic:llama-7x", "source"),
                 lambda: models.resolve("synthetic:llama-7x"),
                 lambda: models.config_of("synthetic:llama-7x")):
        with pytest.raises(ConfigError, match="llama-tiny, .*llama-3b"):
            call()
    assert not os.path.exists(cache / "synthetic" / "llama-7x")


def test_named_shapes_are_real_sizes():
    """The names say roughly what the shapes hold (counted with the 49152-token vocabulary)."""
    billions = {n: synthetic.parameter_count(n) / 1e9 for n in synthetic.SHAPES}
    assert 0.3 < billions["llama-0.4b"] < 0.5 and 0.35 < billions["llama-0.5b"] < 0.55
    assert 0.95 < billions["llama-1b"] < 1.2 and 1.3 < billions["llama-1.5b"] < 1.6
    assert 2.8 < billions["llama-3b"] < 3.3
    # a target must have no more layers than its source
    assert all(synthetic.SHAPES["llama-0.4b"].layers <= s.layers for n, s in synthetic.SHAPES.items()
               if not n.startswith("llama-tiny") and n != "llama-0.4b")


def test_zero3_source_loads_partitioned_on_two_ranks(cache):
    """Each rank reads only its partition of every tensor (about half the model here) and the partitioned model
    computes what the whole one does, LM head included. After attribution (forward and backward), DeepSpeed replays
    its trace in the cache's forwards and keeps every layer it prefetched for a backward that never runs gathered;
    engines.new_trace between the phases leaves nothing gathered (prefetching as on CUDA: "auto" turns it off on
    CPU, where it overlaps nothing). Attribution with recomputed layers gives the same scores there."""
    import subprocess
    import sys

    from tests.helpers import ROOT
    specs = ["synthetic:llama-tiny", "synthetic:llama-tiny-tied"]  # a separate head, and the embedding as head
    for spec in specs:
        models.resolve(spec)  # written once, before the ranks start
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tests.zero3_load", *specs], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    traces = [r["trace"] for r in ranks if "trace" in r]
    recomputed = [r["recompute"] for r in ranks if "recompute" in r]
    ranks = [r for r in ranks if "spec" in r]
    assert len(recomputed) == 2
    for r in recomputed:  # attribution_recompute under ZeRO-3: the same scores (float32), at most a layer gathered
        assert r["smallest"] > 0 and r["vs_plain"] < 1e-5 and r["vs_whole"] < 1e-5, r
        assert r["held"][:2] in ([0, 0], [r["layer"]] * 2) and r["held"][2] == 0, r
        assert r["vocab_module_runs"] == 0 and r["head_rows"][1] - r["head_rows"][0] == r["head_rows"][2] // 2, r
        # gathered per batch, in passes over the layers: the forward and the recompute at most (the first batch
        # records the trace); the embedding and the head (20 times the layers here) are never gathered
        assert all(1 <= g <= 2.01 for g in r["gathered_per_batch"]), r
    assert len(traces) == 2
    for t in traces:
        assert t["False"] > 100_000 and t["True"] == 0, t  # the layers (4 x 36,992), then nothing
    assert sorted((r["spec"], r["rank"]) for r in ranks) == [(s, r) for s in specs for r in (0, 1)]
    for r in ranks:
        assert r["max_abs_diff"] == 0.0 and r["head_equal"] and r["freed"]
        assert 0.45 < r["share"] < 0.55  # not the whole model (small tensors are padded to the world size)


def test_shared_partitions_compute_what_copied_gathers_do(cache):
    """Ranks on one host with the source's partitions in one file in /dev/shm (shared_weights.share) and its
    vocabulary rows in another (share_rows): forwards equal, bit for bit, those of the same source whose gathers
    copy through SharedGather, and attribution's scores (with and without recomputed layers) within float32
    rounding (the NLL over the whole vocabulary on each rank instead of the ranks' rows summed); a batch that
    rank 1 runs alone gives the scores both ranks give with copied gathers. Every gather is a
    view of the file, nothing goes through the slots (each region padded to whole pages); after a batch no other
    rank's pages stay resident beyond what is still gathered, a gathered parameter's other pages are resident only
    while it is held, the file is mapped once and read-only, and once the source is dropped nothing of it stays
    mapped. Where /dev/shm has no room, every rank gathers as before."""
    import subprocess
    import sys

    from tests.helpers import ROOT
    spec = "synthetic:llama-tiny-odd"
    models.resolve(spec)  # written once, before the ranks start
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tests.shared_weights_ranks", spec], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        same = r["same"]
        assert same["states"] is True and r["smallest"] > 0, r
        assert max(same[k] for k in ("plain", "recompute")) <= 2e-5, r
        assert ("extra" in same) == (r["rank"] == 1) and same.get("extra", 0) <= 2e-5, r
        assert r["independent"] == [False, True], r
        # the reference copied its gathers and looked the token ids up across the ranks; here nothing is gathered
        assert len(r["copied_slot_gathers"]) > 3 * 9 and r["copied_maps"] == 0, r
        assert r["maps"] > 3 * 9 and r["slot_gathers"] == [], r  # 3 layers of 9 tensors
        # after the batch: the file mapped once, resident beyond this rank's partitions only what the tensors
        # still gathered (with recomputed layers ZeRO-3 keeps at most the last layer it ran) and the pages at
        # partition edges explain; nothing mapped once the source is dropped
        assert r["gathered_tensors"] <= 9 and r["mapped_after"] == 1, r
        assert 0 <= r["resident_after"]["beyond_own"] <= r["resident_after"]["allowed"], r
        assert r["mapped_released"] == 0 and r["vocab_in_file"] is False, r  # the embedding: rows, not gathered
        # a parameter gathered from the file: every rank's partition, the others' pages resident while it is
        # held, gone after; the mapping read-only
        use = r["cow"]
        assert use["equal"] and use["perms"] == ["r--s"] and use["others"] > 100 * use["page"], r
        assert use["others"] - 2 * use["page"] <= use["grew"] <= use["others"] + 32 * use["page"], r  # fault-around
        assert use["left"] <= 32 * use["page"], r
        assert r["fallback"], r
