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


@pytest.mark.parametrize("block", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rows_read_in_place_stream_blocks_with_no_collective(dtype, block, monkeypatch):
    """Parallel rows whose matrix is read in place (Rows.mapped, as from a shared file): the NLL takes the whole
    vocabulary a block of rows at a time in one pass (blocks of 7 of 53 rows, chunks of 3 of 17 positions: both
    ends short) and equals cross-entropy in float64 within each dtype's tolerance, its gradient too, with no
    collective (no process group here); the lookup and whole() read the matrix; every read is of rows in range."""
    w, x, targets, upstream = _case(dtype, seed=5)
    w = w.to(dtype)
    reads = []

    def mapped(lo=0, hi=None):
        hi = len(w) if hi is None else hi
        reads.append((lo, hi))
        return w[lo:hi]
    if block:
        monkeypatch.setattr(vocab_parallel, "BLOCK_BYTES", block * w.shape[1] * w.element_size())
        monkeypatch.setattr(vocab_parallel, "CHUNK_BYTES", 4 * block * 3)
    rows = vocab_parallel.Rows(w[20:40], 20, len(w), parallel=True, mapped=mapped)
    assert not rows.collective and vocab_parallel.Rows(w[20:40], 20, len(w), parallel=True).collective
    xd = x.to(dtype).requires_grad_(True)
    got = vocab_parallel.nll(xd, targets, rows)
    (got * upstream.to(got.dtype)).sum().backward()
    ref_x = xd.detach().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_x @ w.double().T, targets, reduction="none")
    (ref * upstream).sum().backward()
    assert (got.detach().double() - ref).abs().max() <= TOL[dtype] * ref.abs().max()
    assert (xd.grad.double() - ref_x.grad).abs().max() <= TOL[dtype] * ref_x.grad.abs().max()
    blocks = sorted(set(reads))
    assert blocks[0][0] == 0 and blocks[-1][1] == len(w) and all(0 <= a < b <= len(w) for a, b in blocks)
    if block:
        assert len(blocks) == 8 and reads == blocks  # one pass over 8 blocks
    ids = torch.randint(0, len(w), (3, 4))
    assert torch.equal(vocab_parallel.embed(rows, ids), w[ids])
    assert torch.equal(vocab_parallel.whole(rows), w)


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
    pieces too; broadcasts) and equal every rank's share in order; the shared file is unlinked once mapped. Rows
    in a shared file (share_rows) are read in place: the NLL, its gradient and the embedding as above with no
    collective, rank 1 making twice the calls of rank 0."""
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
    for r in ranks:  # rows read in place from a shared file: rank 1 made twice rank 0's calls, none collective
        m = r["mapped"]
        assert m["shared"] and not m["collective"] and m["own"] and m["whole"], m
        assert (m["lo"], m["hi"]) == ((0, 19) if r["rank"] == 0 else (19, 36)), m
        assert len(m["nll"]) == len(m["grad"]) == len(m["embed"]) == 1 + r["rank"], m
        assert max(m["nll"] + m["grad"]) <= TOL[torch.float32] and max(m["embed"]) == 0, m
    assert all(r["gather"] == {"routed": True, "separate": True, "in_place_async": True, "shared_memory": True,
                               "in_pieces": True, "unlinked": True, "slots": True, "direct": True, "direct_odd": True, "bfloat16_in_pieces": True, "other_hosts": True,
                               "broadcasts": True}
               for r in ranks), ranks
    assert all(r["reduce"] == {f"{n}_{p}": True for n in ("float64", "float32", "bfloat16") for p in ("whole", "pieces")}
               | {"gloo": True} for r in ranks), ranks
