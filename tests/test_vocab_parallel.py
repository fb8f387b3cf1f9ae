"""The vocabulary-parallel NLL and embedding (semalign_ds/vocab_parallel.py) against float64 references: on one
process here, on 2 ranks (gloo) in tests/vocab_parallel_ranks.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from semalign_ds import models, vocab_parallel
from tests.helpers import ARCH_CONFIGS, ROOT, random_model

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the largest value


def _case(dtype, vocab=53, d=11, n=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64) * 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return w, x, targets, upstream


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_nll_and_its_gradient_equal_cross_entropy_in_float64(dtype, chunk, monkeypatch):
    """In one chunk, and in chunks of 3 rows (17 rows: the last chunk shorter)."""
    w, x, targets, upstream = _case(dtype)
    if chunk:
        monkeypatch.setattr(vocab_parallel, "CHUNK_BYTES", 4 * len(w) * chunk)
        assert vocab_parallel.chunk_rows(len(w)) == chunk
    xd = x.to(dtype).requires_grad_(True)
    got = vocab_parallel.nll(xd, targets, vocab_parallel.Rows(w.to(dtype), 0, len(w)))
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    (got * upstream.to(got.dtype)).sum().backward()
    assert xd.grad.dtype == dtype
    ref_x = xd.detach().double().requires_grad_(True)  # the same rounded inputs, in float64
    ref = torch.nn.functional.cross_entropy(ref_x @ w.to(dtype).double().T, targets, reduction="none")
    (ref * upstream).sum().backward()
    assert ref.min() > 0
    assert (got.detach().double() - ref).abs().max() <= TOL[dtype] * ref.abs().max()
    assert (xd.grad.double() - ref_x.grad).abs().max() <= TOL[dtype] * ref_x.grad.abs().max()
    with torch.no_grad():  # no gradient wanted: the same values
        again = vocab_parallel.nll(xd, targets, vocab_parallel.Rows(w.to(dtype), 0, len(w)))
    assert torch.equal(again, got.detach())


def test_embed_looks_rows_up():
    w = torch.randn(29, 7, dtype=torch.float64)
    ids = torch.randint(0, 29, (3, 5))
    assert torch.equal(vocab_parallel.embed(vocab_parallel.Rows(w, 0, 29), ids), w[ids])


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_hidden_states_from_an_embedding_lookup_equal_the_models_own(arch):
    """With embedding_lookup set, hidden_states runs neither the embedding nor the head module (ZeRO-3 gathers
    neither) and returns the states of the model's own forward: Gemma's scaled embeddings, GPT-2's positions."""
    model = random_model(arch, seed=3)
    adapter = models.Adapter(model)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    want = adapter.hidden_states(ids, mask)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (adapter.embed_tokens, adapter.head)]
    rows = vocab_parallel.rows_of(adapter.embed_tokens.weight)
    adapter.embedding_lookup = lambda ids: vocab_parallel.embed(rows, ids)
    got = adapter.hidden_states(ids, mask)
    for h in hooks:
        h.remove()
    assert calls == [] and adapter.head is not None and not isinstance(adapter.head, torch.nn.Identity)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert torch.equal(a[mask.bool()], b[mask.bool()])


def test_two_ranks_equal_the_whole_matrix(tmp_path):
    """Each of 2 ranks its rows and its own tokens (5 and 9): NLL and gradient within float64 rounding and float32's
    tolerance of the reference over the whole matrix, the embedding exact; rows_of cuts a ZeRO-3 partition into
    each rank's rows, a view when the partition is whole rows, a copy when a row is split; DeepSpeed's all-gathers
    go through distributed.gather_into (shared memory: read from the other rank's memory, or through slots, in
    pieces too; broadcasts) and equal every rank's share in order; the shared file is unlinked once mapped."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tests.vocab_parallel_ranks", str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            got = r[name]
            assert got["nll"] <= TOL[dtype] and got["grad"] <= TOL[dtype] and got["whole"], r
            assert got["embed"] <= (0 if dtype == torch.float64 else 1e-6), r
            assert got["shape"] == [3, 4 + r["rank"], 13]
    parts = [r["partition"] for r in ranks]
    assert [(p["38"]["lo"], p["38"]["hi"], p["38"]["view"]) for p in parts] == [(0, 19, True), (19, 36, True)]
    assert [(p["37"]["lo"], p["37"]["hi"], p["37"]["view"]) for p in parts] == [(0, 18, False), (18, 36, False)]
    assert all(p[n]["equal"] and p[n]["parallel"] for p in parts for n in ("38", "37"))
    assert all(r["gather"] == {"routed": True, "separate": True, "in_place_async": True, "shared_memory": True,
                               "in_pieces": True, "unlinked": True, "slots": True, "direct": True, "direct_odd": True, "bfloat16_in_pieces": True, "other_hosts": True,
                               "broadcasts": True}
               for r in ranks), ranks
    assert all(r["reduce"] == {f"{n}_{p}": True for n in ("float64", "float32", "bfloat16") for p in ("whole", "pieces")}
               | {"gloo": True} for r in ranks), ranks
