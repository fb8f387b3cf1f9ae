"""Loading Hugging Face decoder-only LMs, and the small adapter that exposes what SemAlign needs of one: the
embeddings, the decoder layers one at a time (with their rotary embeddings and causal masks), the final norm and
the LM head."""
from __future__ import annotations

import copy
import os
import re

import torch

from semalign_ds.config import ConfigError

# model_type -> where the pieces live. Llama-family models share one layout.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = LLAMA_LIKE + ("gpt2",)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedArchitecture(ConfigError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# loading

def resolve(spec: str, gguf_file: str | None = None):
    """(path or hub id, gguf file) for a model spec; "embedded:NAME" is prepared into a local folder once."""
    if spec.startswith("embedded:"):
        from semalign_ds import embedded
        return embedded.model_dir(spec.split(":", 1)[1]), None
    return spec, gguf_file


def check_exists(spec: str, role: str, gguf_file: str | None = None):
    """Fail before any model runs when a local model path is missing (hub ids are left to transformers)."""
    if spec.startswith("embedded:"):
        from semalign_ds import embedded
        embedded.check_name(spec.split(":", 1)[1])
        return
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.endswith(".json")
    if not hub_id and not os.path.exists(spec):
        raise ConfigError(f"{role} model not found: {spec!r} (a local folder, a config.json for a random-init "
                          f"model, a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or 'embedded:NAME')")
    if gguf_file and os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, gguf_file)):
        raise ConfigError(f"{role}: GGUF file {gguf_file!r} not found in {spec}")


def load_model(spec: str, gguf_file: str | None = None, dtype="float32", seed: int = 0):
    """A causal LM in eval mode with frozen parameters.

    spec: a local folder or hub id (from_pretrained), "embedded:NAME", or a path to a config.json, which builds a
    randomly initialised model from that config (seeded): tiny models for tests and dry runs."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path, gguf_file = resolve(spec, gguf_file)
    torch_dtype = DTYPES[dtype]
    if path.endswith(".json"):
        config = AutoConfig.from_pretrained(path)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch_dtype)
        except OSError as err:
            raise ConfigError(f"could not load model {path!r}: {err}. Without network access, give a local "
                              f"folder.") from err
        if getattr(model.config, "quantization_config", None) is not None and gguf_file:
            model = _dequantized_copy(model)
    model.eval().requires_grad_(False)
    Adapter(model)  # refuse unknown architectures at load
    return model


def _dequantized_copy(model):
    """A GGUF-loaded model carries quantization_config, which save_pretrained refuses: rebuild it plainly."""
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def load_tokenizer(spec: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer
    path, gguf_file = resolve(spec, gguf_file)
    if path.endswith(".json"):  # random-init model: the tokenizer lives beside its config.json
        path = os.path.dirname(os.path.abspath(path))
    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load a tokenizer from {path!r}: {err}") from err


def prune_layers(model, keep: list[int]):
    """A copy of `model` with only the decoder layers in `keep` (0-based, increasing): a smaller target on the
    same tokenizer."""
    adapter = Adapter(model)
    if keep[-1] >= adapter.num_layers:
        raise ConfigError(f"target_keep_layers {keep} names layer {keep[-1]}, but the source has only "
                          f"{adapter.num_layers} layers (0..{adapter.num_layers - 1})")
    pruned = copy.deepcopy(model)
    kept = torch.nn.ModuleList([Adapter(pruned).layers[i] for i in keep])
    Adapter(pruned).set_layers(kept)
    config = pruned.config
    config.num_hidden_layers = len(keep)  # GPT-2's n_layer is an alias of it
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # the KV-cache index of each attention module
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return pruned


# ---------------------------------------------------------------------------------------------------------------
# the adapter

class Adapter:
    """What SemAlign needs of a decoder-only LM, whatever its family."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.arch = model.config.model_type
        if self.arch in LLAMA_LIKE:
            base = model.model
            self.layers, self.norm, self.embed_tokens = base.layers, base.norm, base.embed_tokens
            self.rotary, self.position_embed = base.rotary_emb, None
        elif self.arch == "gpt2":
            base = model.transformer
            self.layers, self.norm, self.embed_tokens = base.h, base.ln_f, base.wte
            self.rotary, self.position_embed = None, base.wpe
        else:
            raise UnsupportedArchitecture(
                f"model type {self.arch!r} ({type(model).__name__}) is not supported; supported: "
                f"{', '.join(SUPPORTED)}. Adding one means naming its layers, final norm and embeddings in "
                f"semalign_ds/models.py:Adapter")
        self._base = base

    @property
    def num_layers(self):
        return len(self.layers)

    @property
    def width(self):
        return self.embed_tokens.weight.shape[1]

    @property
    def head(self):
        return self.model.get_output_embeddings()

    def set_layers(self, layers):
        if self.arch == "gpt2":
            self._base.h = layers
        else:
            self._base.layers = layers
        self.layers = layers

    def embed(self, input_ids):
        """The residual stream before layer 1 (GPT-2 adds its learned positions here)."""
        h = self.embed_tokens(input_ids)
        if self.position_embed is not None:
            h = h + self.position_embed(_positions(input_ids))
        return h

    def context(self, h, attention_mask):
        """Per-layer keyword arguments for a right-padded batch [B, T, d] with its [B, T] attention mask."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
        positions = _positions(attention_mask)
        mask_args = dict(config=self.config, inputs_embeds=h, attention_mask=attention_mask,
                         past_key_values=None, position_ids=positions)
        types = self._layer_types()
        masks = {"full_attention": create_causal_mask(**mask_args)}
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        extra = {} if self.rotary is None else dict(position_ids=positions,
                                                     position_embeddings=self.rotary(h, positions))
        return [dict(attention_mask=masks[t], **extra) for t in types]

    def _layer_types(self):
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)
        sliding = self.arch == "mistral" and getattr(self.config, "sliding_window", None)
        return ["sliding_attention" if sliding else "full_attention"] * self.num_layers

    def layer(self, i, h, ctx):
        """Decoder layer i (0-based) on h; ctx from context()."""
        out = self.layers[i](h, **ctx[i])
        return out[0] if isinstance(out, tuple) else out

    def hidden_states(self, input_ids, attention_mask, grad=False, runner=None):
        """[h^(0), h^(1), ..., h^(L)]: the residual stream before and after each decoder layer, from the model's own
        forward (so that DeepSpeed's ZeRO-3 hooks gather parameters as usual; `runner` is the engine then). With
        grad=True, h^(0) is a leaf that requires grad, so that activation gradients flow to every h^(l) while the
        parameters stay frozen."""
        states = []

        def take_input(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if grad:
                h = h.detach().requires_grad_(True)
                args, kwargs = ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
            states.append(h)
            return args, kwargs

        def take_output(_module, _args, out):
            states.append(out[0] if isinstance(out, tuple) else out)

        hooks = [self.layers[0].register_forward_pre_hook(take_input, with_kwargs=True)]
        hooks += [layer.register_forward_hook(take_output) for layer in self.layers]
        try:
            # logits_to_keep=1: the LM head runs on one position only; callers project what they need
            (runner or self.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                   logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        return states


def _positions(ids_or_mask):
    """Position ids of a right-padded batch: 0..T-1 on every row."""
    batch, length = ids_or_mask.shape
    return torch.arange(length, device=ids_or_mask.device).unsqueeze(0).expand(batch, length)


def vocab_size(tokenizer):
    """Ids the tokenizer can produce: the LM head rows beyond them are padding."""
    return len(tokenizer)


def check_same_vocabulary(tok_s, tok_t, name_s, name_t, head_rows_s, head_rows_t):
    """Source and target must share token ids; refuse anything else before any model runs."""
    v_s, v_t = vocab_size(tok_s), vocab_size(tok_t)
    problems = []
    if v_s != v_t:
        problems.append(f"vocabulary sizes differ ({v_s} vs {v_t})")
    else:
        a, b = tok_s.get_vocab(), tok_t.get_vocab()
        diff = [t for t, i in a.items() if b.get(t) != i]
        if diff:
            problems.append(f"{len(diff)} tokens have different ids (e.g. {diff[:3]})")
    if head_rows_s < v_s or head_rows_t < v_t:
        problems.append(f"an LM head has fewer rows than its tokenizer's vocabulary "
                        f"(source {head_rows_s} for {v_s}, target {head_rows_t} for {v_t})")
    if problems:
        raise ConfigError(f"source and target must share one tokenizer: {'; '.join(problems)}. Source tokenizer: "
                          f"{name_s} ({type(tok_s).__name__}); target tokenizer: {name_t} ({type(tok_t).__name__})")
    return v_s


# ---------------------------------------------------------------------------------------------------------------
# reading models without building them whole

def config_of(spec, gguf_file=None):
    """The model config alone (nothing allocated)."""
    from transformers import AutoConfig
    path, gguf_file = resolve(spec, gguf_file)
    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not read the model config of {spec!r}: {err}") from err


def parameter_count(spec, gguf_file=None):
    """Parameters of a model from its config alone (built on the meta device: nothing allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config_of(spec, gguf_file))
    return sum(p.numel() for p in model.parameters())


_LAYER_KEY = re.compile(r"(^|\.)(layers|h)\.(\d+)\.")


def load_pruned(spec, keep, gguf_file=None, dtype="float32", seed=0):
    """The model `spec` with only its decoder layers `keep` (as prune_layers), reading just those layers'
    tensors from its safetensors files: no process ever holds the whole model. A model without local safetensors
    files (a random-init config, a GGUF file, a hub id) is loaded whole and pruned."""
    import glob

    from safetensors import safe_open
    path, gguf = resolve(spec, gguf_file)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) and not gguf else []
    if not files:
        return prune_layers(load_model(spec, gguf_file, dtype, seed), keep)
    from transformers import AutoModelForCausalLM
    config = config_of(spec, gguf_file)
    if keep[-1] >= config.num_hidden_layers:
        raise ConfigError(f"target_keep_layers {keep} names layer {keep[-1]}, but the source has only "
                          f"{config.num_hidden_layers} layers (0..{config.num_hidden_layers - 1})")
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                m = _LAYER_KEY.search(key)
                if m is not None:
                    if int(m.group(3)) not in new_index:
                        continue
                    key_new = f"{key[:m.start(3)]}{new_index[int(m.group(3))]}{key[m.end(3):]}"
                else:
                    key_new = key
                state[key_new] = f.get_tensor(key).to(DTYPES[dtype])
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ConfigError(f"{spec}: its weight files do not match its config (missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    model.eval().requires_grad_(False)
    Adapter(model)
    return model


def fingerprint(spec, gguf_file=None, seed=0):
    """What identifies a model's weights, cheaply: for weight files, their names, sizes, headers and 64 blocks
    of 64 KiB spread over each file (a changed checkpoint changes them); for a random-init config, the config and
    the seed; for a hub id not on disk, the id (unverified)."""
    import hashlib
    path, gguf = resolve(spec, gguf_file)
    digest = hashlib.sha256()
    if path.endswith(".json") and os.path.isfile(path):
        with open(path, "rb") as f:
            digest.update(f.read())
        return f"config+seed{seed}:{digest.hexdigest()[:32]}"
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin", ".gguf", ".pt", ".pth"))
                       and (gguf is None or n == gguf))
        files = [os.path.join(path, n) for n in names]
    else:
        return f"hub:{spec} (unverified)"
    for file in files:
        size = os.path.getsize(file)
        digest.update(f"{os.path.basename(file)}:{size}".encode())
        with open(file, "rb") as f:
            for i in range(64):
                f.seek(min(size, (size * i) // 64))
                digest.update(f.read(1 << 16))
    return f"files:{digest.hexdigest()[:32]}"
