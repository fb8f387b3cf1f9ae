"""Width and depth pruning (semalign_ds/pruning.py, docs/method.md section 7) on tiny random Llama-shaped models of odd
sizes, in float64. transformers' RMSNorm rounds its input to float32; the tests patch it to compute in the input's
dtype, so that the model and the hand-written references below agree to float64 rounding (rtol 1e-10)."""
import json

import pytest
import torch
import torch.nn.functional as F

from semalign_ds import pruning
from semalign_ds.config import ConfigError

F64 = dict(rtol=1e-10, atol=1e-10)  # float64 throughout; sums of ~50 terms of size ~1

# odd sizes; hidden_size != heads x head_dim (transformers' LlamaConfig wants hidden_size a multiple of the heads,
# the attention does not); 3 query heads per KV head or 2
ARCHS = {
    "llama": dict(model_type="llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                  intermediate_size=37),
    # o_proj and MLP biases, tied embeddings
    "llama_bias_tied": dict(model_type="llama", hidden_size=36, num_attention_heads=6, num_key_value_heads=3,
                            head_dim=10, intermediate_size=31, attention_bias=True, mlp_bias=True,
                            tie_word_embeddings=True),
    # q/k/v biases
    "qwen2": dict(model_type="qwen2", hidden_size=44, num_attention_heads=6, num_key_value_heads=3, head_dim=10,
                  intermediate_size=29, use_sliding_window=False, tie_word_embeddings=False),
    # per-head q/k norms, tied embeddings
    "qwen3": dict(model_type="qwen3", hidden_size=42, num_attention_heads=6, num_key_value_heads=2, head_dim=6,
                  intermediate_size=33, tie_word_embeddings=True),
}


@pytest.fixture(autouse=True)
def exact_rmsnorm(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    for cls in (LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm):
        monkeypatch.setattr(cls, "forward", forward)


def make_source(tmp_path, arch, seed=0, vocab=101):
    """A random 3-layer model saved as safetensors (every parameter random: norm weights too, never ones or
    zeros); returns (folder, model)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    values = dict(ARCHS[arch], vocab_size=vocab, num_hidden_layers=3, rms_norm_eps=1e-6)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.eval().requires_grad_(False)
    folder = tmp_path / f"source_{arch}"
    model.save_pretrained(folder)
    return str(folder), model


def load(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="sdpa").eval()


def batch(seed, lengths=(9, 6, 4)):
    """Random ids, right-padded (padding ids random too: they must not matter)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids, mask


def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]  # real positions only


def random_kept(config, seed, channels=None, groups=None, neurons=None, layers=(0, 1, 2)):
    """A random choice of units to keep (different per layer), in source order."""
    g = torch.Generator().manual_seed(seed)

    def pick(n, k):
        return sorted(torch.randperm(n, generator=g)[:k].tolist())
    d, kv, inter = config.hidden_size, config.num_key_value_heads, config.intermediate_size
    return pruning.Kept(channels=pick(d, channels or d), layers=list(layers),
                        groups={i: pick(kv, groups or kv) for i in layers},
                        neurons={i: pick(inter, neurons or inter) for i in layers})


# ---------------------------------------------------------------------------------------------------------------
# the hand-written reference: the Llama-shaped forward from the source's tensors, sliced by index arithmetic here

def by_hand(model, ids, kept=None):
    """(logits [B, T, V], record of per-unit quantities) of the source `model`'s tensors restricted to `kept`
    (None: everything), written from the slicing rules with plain torch ops. Right padding: causal mask only."""
    cfg, sd = model.config, model.state_dict()
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rep = heads // kv
    c = kept.channels if kept else list(range(cfg.hidden_size))
    layers = kept.layers if kept else list(range(cfg.num_hidden_layers))
    eps = cfg.rms_norm_eps

    def rms(x, w):  # the mean square over the kept channels only
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def linear(x, name, rows, cols):
        w = sd[name + ".weight"][rows][:, cols]
        b = sd.get(name + ".bias")
        return x @ w.T + (0 if b is None else b[rows])

    record = {"norms": [], "attn": {}, "act": {}, "h_in": {}, "h_out": {}}
    batch_size, length = ids.shape
    h = sd["model.embed_tokens.weight"][ids][..., c]
    positions = torch.arange(length).expand(batch_size, length)
    cos, sin = model.model.rotary_emb(h, positions)
    causal = torch.full((length, length), float("-inf"), dtype=h.dtype).triu(1)
    for i in layers:
        p = f"model.layers.{i}."
        groups = kept.groups[i] if kept else list(range(kv))
        q_rows = [g * rep * hd + r for g in groups for r in range(rep * hd)]
        kv_rows = [g * hd + r for g in groups for r in range(hd)]
        neurons = kept.neurons[i] if kept else list(range(cfg.intermediate_size))
        record["h_in"][i] = h
        x = rms(h, sd[p + "input_layernorm.weight"][c])
        record["norms"].append(x)
        q = linear(x, p + "self_attn.q_proj", q_rows, c).view(batch_size, length, -1, hd)
        k = linear(x, p + "self_attn.k_proj", kv_rows, c).view(batch_size, length, -1, hd)
        v = linear(x, p + "self_attn.v_proj", kv_rows, c).view(batch_size, length, -1, hd)
        if p + "self_attn.q_norm.weight" in sd:  # Qwen 3: RMSNorm over each head's head_dim
            q, k = rms(q, sd[p + "self_attn.q_norm.weight"]), rms(k, sd[p + "self_attn.k_norm.weight"])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # query head j uses KV head j // rep
        weights = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5 + causal, dim=-1)
        attn = (weights @ v).transpose(1, 2).reshape(batch_size, length, -1)
        record["attn"][i] = attn
        h = h + linear(attn, p + "self_attn.o_proj", c, q_rows)
        x = rms(h, sd[p + "post_attention_layernorm.weight"][c])
        record["norms"].append(x)
        act = F.silu(linear(x, p + "mlp.gate_proj", neurons, c)) * linear(x, p + "mlp.up_proj", neurons, c)
        record["act"][i] = act
        h = h + linear(act, p + "mlp.down_proj", c, neurons)
        record["h_out"][i] = h
    x = rms(h, sd["model.norm.weight"][c])
    record["norms"].append(x)
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head[:, c].T, record


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# (a) heads and neurons drop out exactly

@pytest.mark.parametrize("arch", list(ARCHS))
def test_pruned_heads_and_neurons_equal_the_source_with_their_outputs_zeroed(tmp_path, arch):
    import copy

    from semalign_ds.models import prune_layers
    folder, source = make_source(tmp_path, arch, seed=1)
    cfg = source.config
    kept = random_kept(cfg, seed=2, groups=cfg.num_key_value_heads - 1, neurons=cfg.intermediate_size - 8,
                       layers=[0, 2])
    pruning.write_pruned(folder, kept, tmp_path / "pruned")
    pruned = load(tmp_path / "pruned")

    reference = copy.deepcopy(source)
    rep, hd = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            for g in set(range(cfg.num_key_value_heads)) - set(kept.groups.get(i, [])):
                layer.self_attn.o_proj.weight[:, g * rep * hd:(g + 1) * rep * hd] = 0
            dropped = sorted(set(range(cfg.intermediate_size)) - set(kept.neurons.get(i, [])))
            layer.mlp.down_proj.weight[:, dropped] = 0
    reference = prune_layers(reference, kept.layers)
    ids, mask = batch(3)
    out = logits(pruned, ids, mask)
    assert out.std() > 0.1  # a live model, not a degenerate one
    torch.testing.assert_close(out, logits(reference, ids, mask), **F64)
    # and the zeroing matters: the unpruned source differs
    assert not torch.allclose(out, logits(prune_layers(source, kept.layers), ids, mask), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# (b) channels pruned: the forward of the slicing rules, RMSNorm averaging over the kept channels

@pytest.mark.parametrize("arch", list(ARCHS))
def test_channel_pruned_model_equals_the_hand_written_forward(tmp_path, arch):
    folder, source = make_source(tmp_path, arch, seed=4)
    cfg = source.config
    # 30 channels: a multiple of the 2 or 3 heads left (LlamaConfig wants it)
    kept = random_kept(cfg, seed=5, channels=30, groups=1, neurons=cfg.intermediate_size // 2, layers=[1, 2])
    pruning.write_pruned(folder, kept, tmp_path / "pruned")
    pruned = load(tmp_path / "pruned")
    ids, mask = batch(6)
    expected = by_hand(source, ids, kept)[0][mask.bool()]
    torch.testing.assert_close(logits(pruned, ids, mask), expected, **F64)
    # the reference is the model's forward when nothing is pruned
    torch.testing.assert_close(logits(source, ids, mask), by_hand(source, ids)[0][mask.bool()], **F64)


# ---------------------------------------------------------------------------------------------------------------
# (c), (d) importance scores and block importance against the hand-written forward

def _hand_scores(source, batches):
    """The per-unit scores from the hand-written forward's quantities: each a mean over the real tokens of all
    batches of a squared magnitude; BI = 1 - mean cos(h_in, h_out)."""
    records = []
    for ids, mask in batches:
        _, rec = by_hand(source, ids)
        records.append((rec, mask.bool()))
    cat = lambda get: torch.cat([get(rec)[m] for rec, m in records])  # noqa: E731
    n_norms = len(records[0][0]["norms"])
    channels = sum(cat(lambda r: r["norms"][k]).pow(2).mean(0) for k in range(n_norms))
    layers = range(source.config.num_hidden_layers)
    kv = source.config.num_key_value_heads
    groups = torch.stack([cat(lambda r: r["attn"][i]).unflatten(-1, (kv, -1)).pow(2).sum(-1).mean(0)
                          for i in layers])
    neurons = torch.stack([cat(lambda r: r["act"][i]).pow(2).mean(0) for i in layers])
    blocks = torch.stack([1 - F.cosine_similarity(cat(lambda r: r["h_in"][i]), cat(lambda r: r["h_out"][i]),
                                                  dim=-1).mean() for i in layers])
    return {"channels": channels, "groups": groups, "neurons": neurons, "blocks": blocks}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_importance_scores_equal_the_hand_computed_ones(tmp_path, arch):
    _, source = make_source(tmp_path, arch, seed=7)
    batches = [batch(8, (7, 3)), batch(9, (5, 8, 2))]  # padding differs per batch: it must not count
    scores = pruning.importance(source, batches)
    expected = _hand_scores(source, batches)
    for key in ("channels", "groups", "neurons", "blocks"):
        assert scores[key].shape == expected[key].shape, key
        assert scores[key].std() > 0, key  # scores that rank: not all equal
        torch.testing.assert_close(scores[key], expected[key], **F64, msg=key)
    # padding excluded: changing the padding ids changes nothing
    ids, mask = batches[0]
    noisy = [(torch.where(mask.bool(), ids, (ids + 17) % 101), mask), batches[1]]
    torch.testing.assert_close(pruning.importance(source, noisy)["channels"], scores["channels"], **F64)


def test_block_importance_keeps_the_most_important_layers_and_the_last():
    blocks = torch.tensor([0.5, 0.1, 0.9, 0.05, 0.3], dtype=torch.float64)
    assert pruning.block_order(blocks, 3) == [0, 2, 4]  # 2 and 0 rank first; 4 is the last layer
    assert pruning.block_order(blocks, 1) == [4]
    assert pruning.block_order(torch.tensor([0.0, 0.9, 0.1]), 2) == [1, 2]  # the last kept though least important


def test_prune_target_by_block_importance_keeps_the_layers_the_hand_computation_ranks(tmp_path):
    folder, source = make_source(tmp_path, "llama", seed=10)
    batches = [batch(11, (9, 5))]
    blocks = _hand_scores(source, batches)["blocks"]
    expected = sorted(torch.argsort(blocks[:-1], descending=True)[:1].tolist()) + [2]
    shape = pruning.Shape(num_layers=2, depth="block_importance", hidden_size=39, num_kv_heads=1,
                          intermediate_size=30)
    kept, scores = pruning.prune_target(folder, batches, shape, tmp_path / "pruned", dtype=torch.float64)
    torch.testing.assert_close(scores["blocks"], blocks, **F64)
    assert kept.layers == expected
    # what was kept is the top of each score, in source order
    assert kept.channels == sorted(torch.argsort(scores["channels"], descending=True)[:39].tolist())
    assert kept.neurons[2] == sorted(torch.argsort(scores["neurons"][2], descending=True)[:30].tolist())
    assert kept.groups[2] == [int(scores["groups"][2].argmax())]


# ---------------------------------------------------------------------------------------------------------------
# (e) the export

@pytest.mark.parametrize("arch", ["llama_bias_tied", "qwen2"])
def test_the_export_loads_and_equals_a_model_built_from_the_sliced_tensors(tmp_path, arch):
    from transformers import AutoModelForCausalLM
    folder, source = make_source(tmp_path, arch, seed=12)
    cfg = source.config
    # 6 query heads in 3 KV groups of 2: 4 heads are 2 whole groups
    shape = pruning.Shape(hidden_size=24, num_heads=4, intermediate_size=cfg.intermediate_size - 5,
                          keep_layers=[0, 2])
    kept, _ = pruning.prune_target(folder, [batch(13)], shape, tmp_path / "pruned", dtype=torch.float64)
    on_disk = json.loads((tmp_path / "pruned" / "config.json").read_text())
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    assert {k: on_disk[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                    "intermediate_size", "num_hidden_layers", "head_dim")} == {
        "hidden_size": 24, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": cfg.intermediate_size - 5, "num_hidden_layers": 2,
        "head_dim": cfg.head_dim}
    exported = load(tmp_path / "pruned")

    # the same model built from the config and the tensors sliced here, by name
    config = pruning.pruned_config(cfg, kept)
    built = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation="sdpa").eval()
    sd, c, hd = source.state_dict(), kept.channels, cfg.head_dim
    sliced = {}
    for new, old in enumerate(kept.layers):
        q = [g * rep * hd + r for g in kept.groups[old] for r in range(rep * hd)]
        k = [g * hd + r for g in kept.groups[old] for r in range(hd)]
        j = kept.neurons[old]
        rules = {"self_attn.q_proj": (q, c), "self_attn.k_proj": (k, c), "self_attn.v_proj": (k, c),
                 "self_attn.o_proj": (c, q), "mlp.gate_proj": (j, c), "mlp.up_proj": (j, c),
                 "mlp.down_proj": (c, j)}
        for module, (rows, cols) in rules.items():
            sliced[f"model.layers.{new}.{module}.weight"] = sd[f"model.layers.{old}.{module}.weight"][rows][:, cols]
            if f"model.layers.{old}.{module}.bias" in sd:
                sliced[f"model.layers.{new}.{module}.bias"] = sd[f"model.layers.{old}.{module}.bias"][rows]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sliced[f"model.layers.{new}.{norm}.weight"] = sd[f"model.layers.{old}.{norm}.weight"][c]
    sliced["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:, c]
    sliced["model.norm.weight"] = sd["model.norm.weight"][c]
    if not cfg.tie_word_embeddings:
        sliced["lm_head.weight"] = sd["lm_head.weight"][:, c]
    missing, unexpected = built.load_state_dict(sliced, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    built.tie_weights()
    ids, mask = batch(14)
    torch.testing.assert_close(logits(exported, ids, mask), logits(built, ids, mask), rtol=0, atol=0)
    if cfg.tie_word_embeddings:
        assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------------------------------------------------------
# (f) refusals, before any weights load

@pytest.fixture
def config_only_source(tmp_path, monkeypatch):
    """A source folder with a config and no weights, and loaders that fail loudly: a refusal must come first."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def loads(*_a, **_k):
        raise AssertionError("weights were loaded before the shape was checked")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loads)
    monkeypatch.setattr(pruning, "write_pruned", loads)
    values = dict(ARCHS["llama"], vocab_size=101, num_hidden_layers=3)
    folder = tmp_path / "config_only"
    AutoConfig.for_model(values.pop("model_type"), **values).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("shape, words", [
    (pruning.Shape(hidden_size=49), ["target_hidden_size 49", "allowed 1..48"]),
    (pruning.Shape(intermediate_size=38), ["target_intermediate_size 38", "allowed 1..37"]),
    (pruning.Shape(num_kv_heads=3), ["target_num_kv_heads 3", "allowed 1..2"]),
    (pruning.Shape(num_heads=4), ["target_num_heads 4", "3 x target_num_kv_heads",
                                  "3 heads with 1 KV heads, 6 heads with 2 KV heads"]),
    (pruning.Shape(num_heads=6, num_kv_heads=1), ["target_num_heads 6 with target_num_kv_heads 1"]),
    (pruning.Shape(depth="block_importance"), ["target_num_layers in 1..3"]),
    (pruning.Shape(hidden_size=40, num_kv_heads=1), ["target_hidden_size 40", "target_num_heads 3",
                                                     "allowed target_hidden_size 3, 6, ..., 48"]),
    (pruning.Shape(keep_layers=[0, 3], hidden_size=42), ["target_keep_layers [0, 3]", "0..2"]),
])
def test_shapes_the_source_cannot_give_are_refused_before_weights_load(config_only_source, tmp_path, shape, words):
    with pytest.raises(ConfigError) as err:
        pruning.prune_target(config_only_source, [batch(0)], shape, tmp_path / "out")
    for w in words:
        assert w in str(err.value)


def test_a_source_without_safetensors_files_is_refused_before_loading(config_only_source, tmp_path):
    with pytest.raises(ConfigError, match="slices the source's safetensors files"):
        pruning.prune_target(config_only_source, [batch(0)], pruning.Shape(hidden_size=24), tmp_path / "out")


def test_a_non_llama_family_is_refused_with_the_reason(tmp_path, monkeypatch):
    from transformers import GPT2Config
    GPT2Config(n_embd=40, n_head=4, n_layer=3, vocab_size=101).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="Llama-shaped source .*llama, mistral, qwen2, qwen3.*'gpt2'"):
        pruning.prune_target(str(tmp_path / "gpt2"), [], pruning.Shape(hidden_size=32), tmp_path / "out")


def test_config_checks_that_need_no_model():
    from semalign_ds.config import from_dict
    with pytest.raises(ConfigError, match=r"target_num_kv_heads 4 does not divide target_num_heads 6.*allowed "
                                          r"target_num_kv_heads: 1, 2, 3, 6"):
        from_dict({"target_hidden_size": 384, "target_num_heads": 6, "target_num_kv_heads": 4})
    with pytest.raises(ConfigError, match="block_importance .* target_num_layers"):
        from_dict({"target_depth": "block_importance"})
    with pytest.raises(ConfigError, match="target_num_layers 3 disagrees with target_keep_layers"):
        from_dict({"target_keep_layers": [0, 5], "target_num_layers": 3})
    with pytest.raises(ConfigError, match="target_num_layers 4 needs a choice of layers"):
        from_dict({"target_num_layers": 4})
    with pytest.raises(ConfigError, match="exactly one of `target`"):
        from_dict({"target": "some/model", "target_hidden_size": 384})
    with pytest.raises(ConfigError, match="target_hidden_size=0 .* an integer >= 1"):
        from_dict({"target_hidden_size": 0})
    cfg = from_dict({"target_depth": "block_importance", "target_num_layers": 12, "target_hidden_size": 384,
                     "target_num_kv_heads": 2, "target_intermediate_size": 1024})
    assert pruning.Shape.of(cfg).needs_calibration


def width_run(tmp_path, **extra):
    """A run config whose target is cut by width (and depth by block importance) from a 3-layer source folder on
    the tiny tokenizer."""
    import shutil

    from semalign_ds.config import from_dict
    from tests.helpers import TINY
    folder, _ = make_source(tmp_path, "llama", vocab=512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{TINY}/{name}", f"{folder}/{name}")
    return from_dict({"source": folder, "data": "embedded:stdlib", "max_examples": 10, "max_seq_len": 48,
                      "eval_data": None, "stage_steps": 2, "batch_size": 2, "cache_shard_examples": 5,
                      "report_to": ["none"], "output_dir": str(tmp_path / "run"), "target_hidden_size": 24,
                      "target_num_kv_heads": 1, "target_intermediate_size": 20, "target_depth": "block_importance",
                      "target_num_layers": 2, "prune_calibration_examples": 4, **extra})


def test_the_run_refuses_a_shape_the_source_cannot_give_before_loading(tmp_path):
    from semalign_ds import pipeline
    cfg = width_run(tmp_path, target_hidden_size=50)
    with pytest.raises(ConfigError, match="target_hidden_size 50 is larger than the source's hidden_size 48"):
        pipeline.run(cfg)
    assert not (tmp_path / "run" / "pruned-target").exists()


def test_the_dry_run_plans_the_cut_shape(tmp_path):
    from semalign_ds import dryrun
    plan = dryrun.plan(width_run(tmp_path), 1)
    assert (plan.target.width, plan.target.layers, plan.source.width) == (24, 2, 48)
    assert [ph.name for ph in plan.phases][:3] == ["prune", "attribution", "alignment"]


@pytest.mark.slow
def test_a_width_pruned_target_runs_the_pipeline_and_exports_its_own_logits(tmp_path):
    """Prune (into the run directory), attribution, alignment across widths, cache, stages, export: the export
    loads in transformers and gives the trainer's logits; a rerun reuses the pruned target after checking it, and
    a damaged one is cut again to the same weights."""
    import json

    from transformers import AutoModelForCausalLM

    from semalign_ds import models, pipeline
    cfg = width_run(tmp_path)
    pipeline.run(cfg)
    run = tmp_path / "run"
    state = json.loads((run / "state.json").read_text())
    assert {"prune", "cache", "export"} <= set(state["done"])
    exported = AutoModelForCausalLM.from_pretrained(run / "target", dtype=torch.float32).eval()
    assert (exported.config.hidden_size, exported.config.num_hidden_layers) == (24, 2)
    from safetensors.torch import load_file
    assert load_file(run / "alignment.safetensors")["M"].shape == (24, 48)  # d_t x d_s: two different heads
    assert models.Adapter(pipeline.initial_target(cfg)).width == 24  # the cut before training, in the run dir
    ids, mask = batch(3)
    trainer = models.Adapter(models.load_model(str(run / "target"), None, "float32"))  # the trainer's forward
    with torch.no_grad():
        want = trainer.head(trainer.norm(trainer.hidden_states(ids, mask)[-1]))
        got = exported(input_ids=ids, attention_mask=mask).logits
    assert float((got - want)[mask.bool()].abs().max()) < 1e-4
    files = dict(state["done"]["prune"]["files"])
    with open(run / "pruned-target" / "model.safetensors", "r+b") as f:  # damage it
        f.seek(200)
        f.write(b"\x00" * 64)
    pipeline.run(cfg)
    again = json.loads((run / "state.json").read_text())
    assert again["done"]["prune"]["files"] == files  # cut again, to the same weights: nothing else reruns


# ---------------------------------------------------------------------------------------------------------------
# the command line: a run config in, a loadable target with the source's tokenizer out

def test_the_command_line_writes_a_target_the_run_can_name(tmp_path, capsys):
    import shutil

    import yaml

    from semalign_ds import models
    from tests.helpers import TINY
    folder, source = make_source(tmp_path, "llama", vocab=512)  # the tiny tokenizer's
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{TINY}/{name}", f"{folder}/{name}")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"def f{i}(x):", "response": f" return x * {i} + {i * i}"}) + "\n"
                            for i in range(6)))
    run = {"source": folder, "data": str(data), "chat_template": "off", "target_hidden_size": 24,
           "target_num_kv_heads": 1, "target_intermediate_size": 20, "target_depth": "block_importance",
           "target_num_layers": 2, "prune_calibration_examples": 5}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert pruning.main(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "target")]) == 0
    assert "run with target:" in capsys.readouterr().out
    target = models.load_model(str(tmp_path / "target"))
    assert (target.config.hidden_size, target.config.num_attention_heads, target.config.num_key_value_heads,
            target.config.intermediate_size, target.config.num_hidden_layers) == (24, 3, 1, 20, 2)
    assert len(models.load_tokenizer(str(tmp_path / "target"))) == len(models.load_tokenizer(folder))
    assert json.loads((tmp_path / "target" / "pruning.json").read_text())["layers"][-1] == 2

    run["target_hidden_size"] = 25  # not a multiple of the 3 heads left: refused with the allowed values
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert pruning.main(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "t2")]) == 2
    assert "allowed target_hidden_size 3, 6, ..., 48" in capsys.readouterr().err
    assert not (tmp_path / "t2").exists()


def test_calibration_batches_hold_every_example_once_right_padded():
    from semalign_ds.data import TokenizedSet
    lengths = [5, 9, 2, 7, 3]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    ids = torch.randint(1, 50, (int(offsets[-1]),))
    data = TokenizedSet(ids, torch.ones_like(ids, dtype=torch.bool), offsets)
    batches = list(pruning.calibration_batches(data, pad_id=0, examples=4, batch_size=3))
    seen = sorted(tuple(row[m.bool()].tolist()) for b_ids, b_mask in batches for row, m in zip(b_ids, b_mask))
    assert seen == sorted(tuple(ids[offsets[i]:offsets[i + 1]].tolist()) for i in range(4))
    for _, mask in batches:
        assert bool((mask.cummin(dim=1).values == mask).all())  # ones, then zeros
