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


def random_model(arch="llama", layers=3, seed=0, dtype=torch.float64):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(ARCH_CONFIGS[arch], vocab_size=97)
    cfg["n_layer" if arch == "gpt2" else "num_hidden_layers"] = layers
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval().requires_grad_(False)
