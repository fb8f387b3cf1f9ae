"""The export: what transformers 5 reloads equals what was saved, and the files also carry the keys that
transformers 4.x, llama.cpp's converter and vLLM read (rope_theta, rope_scaling, a tokenizer class 4.x has)."""
import json
import os

import pytest
import torch

from semalign_ds import export, models
from tests.helpers import TINY, random_model


def _export(tmp_path, model):
    tokenizer = models.load_tokenizer(TINY)
    folder = str(tmp_path / "target")
    export.save_hf(model, tokenizer, folder, {"semalign_plan.json": {"pairs": [1, 3]}})
    read = lambda name: json.loads(open(os.path.join(folder, name)).read())  # noqa: E731
    return folder, read, tokenizer


def test_a_llama_export_reloads_the_same_and_carries_the_legacy_keys(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = random_model("llama", layers=2, seed=7, rope_parameters={"rope_type": "default", "rope_theta": 123457.0})
    folder, read, tokenizer = _export(tmp_path, model)
    config = read("config.json")
    assert config["rope_theta"] == 123457.0 and config["rope_scaling"] is None
    assert config["rope_parameters"]["rope_theta"] == 123457.0  # transformers 5 still reads its own key
    assert config["torch_dtype"] == config["dtype"] == "float64"
    assert read("tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert read("semalign_plan.json") == {"pairs": [1, 3]}
    assert not os.path.exists(folder + ".tmp")

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    assert again.config.rope_parameters["rope_theta"] == 123457.0
    saved = model.state_dict()
    assert all(torch.equal(p, saved[n]) for n, p in again.state_dict().items())
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():  # float64; the reloaded model may pick another attention kernel: rounding only
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-12, atol=1e-12)
    text = "def f(x):\n    return x * 17  # odd"
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_scaled_rope_is_written_where_4x_reads_it():
    rope = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "partial_rotary_factor": 0.5}
    out = export.legacy_config({"model_type": "llama", "rope_parameters": rope})
    assert out["rope_theta"] == 50000.0 and out["partial_rotary_factor"] == 0.5
    assert out["rope_scaling"] == {"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 64}
    assert out["rope_parameters"] == rope
    # keys already present are kept; a config without rotary settings (GPT-2) is left as it is
    assert export.legacy_config({"rope_theta": 1.0, "rope_parameters": rope})["rope_theta"] == 1.0
    gpt2 = {"model_type": "gpt2", "n_embd": 40, "n_positions": 256}
    assert export.legacy_config(gpt2) == gpt2


def test_gemma3_local_and_global_bases(tmp_path):
    model = random_model("gemma3_text", layers=2, seed=9)
    _, read, _ = _export(tmp_path, model)
    config = read("config.json")
    rope = config["rope_parameters"]
    assert config["rope_theta"] == rope["full_attention"]["rope_theta"] == 1000003.0
    assert config["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"] == 10007.0


@pytest.mark.parametrize("extra, expected", [(["<a>", "<b>"], ["<a>", "<b>"]), ([], None)])
def test_tokenizer_config_for_4x(extra, expected):
    out = export.legacy_tokenizer_config({"tokenizer_class": "TokenizersBackend", "extra_special_tokens": extra})
    assert out["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in out
    assert out.get("additional_special_tokens") == expected
    # a model's own class name (LlamaTokenizer...) is one 4.x knows: kept
    assert export.legacy_tokenizer_config({"tokenizer_class": "LlamaTokenizer"})["tokenizer_class"] == \
        "LlamaTokenizer"
