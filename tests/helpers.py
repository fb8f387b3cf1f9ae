"""Tiny random-init models on the committed 512-token tokenizer, for tests."""
import json
import os
import shutil

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launchers", "configs", "tiny")
TINY_YAML = os.path.join(ROOT, "launchers", "configs", "tiny.yaml")

ARCH_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=40, intermediate_size=72, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5),
    "mistral": dict(model_type="mistral", hidden_size=40, intermediate_size=72, num_attention_heads=4,
                    num_key_value_heads=2, sliding_window=5, head_dim=10),
    "qwen2": dict(model_type="qwen2", hidden_size=40, intermediate_size=72, num_attention_heads=4,
                  num_key_value_heads=2, use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", hidden_size=40, intermediate_size=72, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=10),
    "gpt2": dict(model_type="gpt2", n_embd=40, n_head=4, n_positions=256),
    # Gemma 2: sliding and global layers alternating, attention soft-capping, scaled embeddings. Its final-logit
    # soft-cap is refused (models.check_config), so it is off here.
    "gemma2": dict(model_type="gemma2", hidden_size=40, intermediate_size=72, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=10, query_pre_attn_scalar=10, sliding_window=5,
                   attn_logit_softcapping=0.3, final_logit_softcapping=None),
    # Gemma 3 (text): local layers with their own rotary base, every second layer global, q/k norms
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=40, intermediate_size=72, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=10, query_pre_attn_scalar=10, sliding_window=5,
                        sliding_window_pattern=2,
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10007.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1000003.0}}),
    # Phi-3: fused qkv and gate/up projections, a sliding window on every layer, partial rotary
    "phi3": dict(model_type="phi3", hidden_size=40, intermediate_size=72, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=5, pad_token_id=0, eos_token_id=0, bos_token_id=0,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.6}),
    # OLMo 2: norms after attention and MLP, q/k norms over all heads
    "olmo2": dict(model_type="olmo2", hidden_size=40, intermediate_size=72, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=0),
}


def tiny_model_dir(tmp_path, name, arch="llama", layers=4, **extra):
    """A folder holding NAME.json (a random-init model config) and the tiny tokenizer; returns the json path."""
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TINY, f), folder / f)
    cfg = dict(ARCH_CONFIGS[arch], vocab_size=512, eos_token_id=0, pad_token_id=0, **extra)
    cfg["n_layer" if arch == "gpt2" else "num_hidden_layers"] = layers
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def random_model(arch="llama", layers=3, seed=0, dtype=torch.float64, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(ARCH_CONFIGS[arch], **{"vocab_size": 97, **extra})
    cfg["n_layer" if arch == "gpt2" else "num_hidden_layers"] = layers
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval().requires_grad_(False)


def processes_with(text):
    """PIDs of host processes whose command line holds `text` (the host's /proc sees into every PID namespace)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found
