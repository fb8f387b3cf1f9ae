"""Loading Hugging Face decoder-only LMs, and the small adapter that exposes what SemAlign needs of one: the
embeddings, the decoder layers one at a time (with their rotary embeddings and causal masks), the final norm and
the LM head.

Adding a model family (model_type X):
1. Name where its pieces live in FAMILIES: the base module, its decoder-layer list, final norm, token embeddings
   and learned position embeddings (None with rotary ones). What the adapter derives needs no code when the
   family follows transformers' usual shape: a `rotary_emb` on the base (called per layer type when its forward
   takes `layer_type`, as Gemma 3's local/global pair), masks per `config.layer_types` (else a sliding-window mask
   on every layer when `config.sliding_window` is set, as Mistral and Phi-3 do), scaling inside the embedding
   module (Gemma), and anything inside a layer (fused projections, attention soft-capping, extra norms).
2. If the family's logits are not `final_norm(h) @ W^T` (a final-logit soft-cap, a logit scale), refuse the
   setting in check_config: SemAlign's losses and the NLL use linear logits.
3. Add a tiny config to tests/helpers.py:ARCH_CONFIGS (odd sizes, a short sliding window) and the model type to
   the parametrisations of tests/test_models.py, which compare the layer-by-layer path with the model's own
   forward in float64, with right padding, and pruning.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import inspect
import os
import re
from typing import NamedTuple

import torch
import torch.utils.checkpoint

from semalign_ds.config import ConfigError


class Layout(NamedTuple):
    """Attribute names: the base module on the causal LM, and on it the decoder layers, final norm, token
    embeddings and learned position embeddings (None for rotary families)."""
    base: str
    layers: str
    norm: str
    embed: str
    positions: str | None = None


DECODER = Layout("model", "layers", "norm", "embed_tokens")
FAMILIES = {
    "llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "qwen3": DECODER,
    "gemma2": DECODER, "gemma3_text": DECODER, "phi3": DECODER, "olmo2": DECODER,
    "gpt2": Layout("transformer", "h", "ln_f", "wte", "wpe"),
}
SUPPORTED = tuple(FAMILIES)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedArchitecture(ConfigError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# loading

def resolve(spec: str, gguf_file: str | None = None):
    """(path or hub id, gguf file) for a model spec; "embedded:NAME" and "synthetic:NAME" (a random-init model of
    a real shape, semalign_ds/synthetic.py) are prepared into a local folder once."""
    if spec.startswith("embedded:"):
        return embedded_dir(spec.split(":", 1)[1]), None
    if spec.startswith("synthetic:"):
        from semalign_ds import synthetic
        return synthetic.ensure(spec.split(":", 1)[1]), None
    return spec, gguf_file


def embedded_dir(name):
    """A Hugging Face folder holding the embedded model, converted from its GGUF file on first use."""
    from semalign_ds import embedded
    embedded.gguf_path(name)
    out = os.path.join(embedded.cache_dir(), name)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(embedded.cache_dir(), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several ranks on one machine: one converts, the others wait for it
        if not os.path.isfile(os.path.join(out, "config.json")):
            _convert_embedded(name, out)
    return out


def _convert_embedded(name, out):
    from transformers import AutoTokenizer

    from semalign_ds import embedded
    from semalign_ds.export import save_hf
    folder, gguf = os.path.split(embedded.gguf_path(name))
    model = load_model(folder, gguf_file=gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    save_hf(model, tokenizer, out)  # replaces a half-written folder from a killed conversion


def check_exists(spec: str, role: str, gguf_file: str | None = None):
    """Fail before any model runs when a local model path is missing (hub ids are left to transformers)."""
    if spec.startswith("embedded:"):
        from semalign_ds import embedded
        embedded.gguf_path(spec.split(":", 1)[1])
        return
    if spec.startswith("synthetic:"):
        from semalign_ds import embedded, synthetic
        synthetic.shape_of(spec.split(":", 1)[1])
        embedded.gguf_path("smollm2-135m-instruct")  # its tokenizer comes from the embedded model's GGUF file
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
    randomly initialised model from that config (seeded): tiny models for tests and dry runs. Such a model is drawn
    in float32 and then cast, so that a bfloat16 run has the float32 model's weights, rounded: drawn in bfloat16
    directly, the random values depend on the torch release (2.11 draws other numbers in bfloat16 than in float32,
    2.13 the same ones), and a bfloat16 run would start from another model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path, gguf_file = resolve(spec, gguf_file)
    torch_dtype = DTYPES[dtype]
    if path.endswith(".json"):
        config = AutoConfig.from_pretrained(path)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(torch_dtype)
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

def check_config(config, role="model"):
    """Refuse, from its config alone, a model the adapter cannot run exactly or SemAlign cannot train on."""
    arch = config.model_type
    if arch not in FAMILIES:
        raise UnsupportedArchitecture(
            f"{role}: model type {arch!r} is not supported; supported: {', '.join(SUPPORTED)}. Adding one means "
            f"naming its layers, final norm and embeddings in semalign_ds/models.py:FAMILIES (see that module's "
            f"docstring)")
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        # the Fisher and KL losses, their kernels and the NLL all use linear logits W x; tanh-capped logits would
        # make every one of them a different objective from the model's own
        raise UnsupportedArchitecture(
            f"{role}: final_logit_softcapping={cap} ({arch}) caps the logits as cap*tanh(Wx/cap); SemAlign's losses "
            f"use linear logits Wx. Set \"final_logit_softcapping\": null in the model's config.json to train on "
            f"the uncapped logits (the model's outputs then change where |Wx| approaches {cap})")
    if getattr(config, "use_bidirectional_attention", None):
        raise UnsupportedArchitecture(f"{role}: use_bidirectional_attention is set ({arch}): an encoder, not a "
                                      f"causal LM; SemAlign transfers between causal LMs")


class Adapter:
    """What SemAlign needs of a decoder-only LM, whatever its family."""

    def __init__(self, model):
        check_config(model.config, type(model).__name__)
        self.model = model
        self.config = model.config
        self.arch = model.config.model_type
        self.layout = FAMILIES[self.arch]
        self._base = base = getattr(model, self.layout.base)
        self.layers = getattr(base, self.layout.layers)
        self.norm = getattr(base, self.layout.norm)
        self.embed_tokens = getattr(base, self.layout.embed)  # Gemma's scales by sqrt(width) itself
        self.position_embed = getattr(base, self.layout.positions) if self.layout.positions else None
        self.rotary = getattr(base, "rotary_emb", None)
        # Gemma 3: one rotary embedding per layer type (local layers use another base)
        self._rotary_per_type = (self.rotary is not None and
                                 "layer_type" in inspect.signature(self.rotary.forward).parameters)
        # ids -> the embedding matrix's rows of them (vocab_parallel.source_rows sets it for a ZeRO-3 source):
        # hidden_states then runs neither the embedding nor the LM head module, so that ZeRO-3 gathers neither
        self.embedding_lookup = None

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
        setattr(self._base, self.layout.layers, layers)
        self.layers = layers

    def embed(self, input_ids):
        """The residual stream before layer 1 (GPT-2 adds its learned positions here)."""
        h = self.embed_tokens(input_ids)
        if self.position_embed is not None:
            h = h + self.position_embed(_positions(input_ids))
        return h

    def context(self, h, attention_mask):
        """Per-layer keyword arguments for a right-padded batch [B, T, d] with its [B, T] attention mask."""
        create_causal_mask, create_sliding_window_causal_mask, cache_arg = _mask_builders()
        positions = _positions(attention_mask)
        mask_args = {"config": self.config, "inputs_embeds": h, "attention_mask": _right_padded(attention_mask),
                     cache_arg: None, "position_ids": positions}
        types = self._layer_types()
        masks = {"full_attention": create_causal_mask(**mask_args)}
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        if self.rotary is None:
            return [dict(attention_mask=masks[t]) for t in types]
        if self._rotary_per_type:
            rotary = {t: self.rotary(h, positions, t) for t in set(types)}
        else:
            rotary = dict.fromkeys(set(types), self.rotary(h, positions))
        return [dict(attention_mask=masks[t], position_ids=positions, position_embeddings=rotary[t]) for t in types]

    def _layer_types(self):
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)
        # families without layer_types (Mistral, Phi-3) slide on every layer when a window is set
        sliding = getattr(self.config, "sliding_window", None)
        return ["sliding_attention" if sliding else "full_attention"] * self.num_layers

    def layer(self, i, h, ctx):
        """Decoder layer i (0-based) on h; ctx from context()."""
        out = self.layers[i](h, **ctx[i])
        return out[0] if isinstance(out, tuple) else out

    def hidden_states(self, input_ids, attention_mask, grad=False, runner=None, recompute=False, keep=None):
        """[h^(0), h^(1), ..., h^(L)]: the residual stream before and after each decoder layer, from the model's own
        forward (so that DeepSpeed's ZeRO-3 hooks gather parameters as usual; `runner` is the engine then). With
        grad=True, h^(0) is a leaf that requires grad, so that activation gradients flow to every h^(l) while the
        parameters stay frozen. recompute=True (with grad) keeps only each layer's input for the backward and runs
        the layer again there (transformers' gradient checkpointing on the decoder layers alone): one more forward
        for activation memory of one layer instead of all; take the gradients with backward() then.

        keep(l, h) (forward only): what the list holds of h^(l) instead of h^(l) itself, taken as the layer
        returns it (None: nothing), so that a caller that needs a few layers, or a few rows of them, never holds
        every layer's whole batch (L + 1 states of [B, T, d]: 0.7 GiB at 29 x 32 x 128 x 1536 in float32)."""
        states = []
        if keep is not None and grad:
            raise ValueError("hidden_states: keep is for forwards without grad (the backward needs the states)")
        if recompute and grad:
            with self._checkpointed_layers():
                return self.hidden_states(input_ids, attention_mask, grad, runner)
        if keep is None:
            def keep(_l, h):
                return h

        def take_input(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if grad:
                h = h.detach().requires_grad_(True)
                args, kwargs = ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
            states.append(keep(0, h))
            return args, kwargs

        def take_output(_module, _args, out):
            states.append(keep(len(states), out[0] if isinstance(out, tuple) else out))

        hooks = [self.layers[0].register_forward_pre_hook(take_input, with_kwargs=True)]
        hooks += [layer.register_forward_hook(take_output) for layer in self.layers]
        inputs = {"input_ids": input_ids}
        if self.embedding_lookup is not None:
            inputs = {"inputs_embeds": self.embed_rows(input_ids)}
        # the head's output is not used: it is left out where the model runs plainly, or reads its vocabulary as
        # rows (a ZeRO-3 engine's recorded module order keeps it otherwise). Even on one position per sequence it
        # cost most of a bfloat16 forward on CPU (1.5B, 8 x 128 tokens: 60% of the cache's time at 1 rank)
        head = (self.model.get_output_embeddings()
                if self.embedding_lookup is not None or runner is None else None)
        if head is not None:
            self.model.set_output_embeddings(torch.nn.Identity())
        try:
            # logits_to_keep=1: the LM head runs on one position only; callers project what they need
            (runner or self.model)(**inputs, attention_mask=_right_padded(attention_mask), use_cache=False,
                                   logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
            if head is not None:
                self.model.set_output_embeddings(head)
        return states

    def final_state(self, input_ids, attention_mask, runner=None):
        """h^(L), the last decoder layer's output (before the final norm), holding no other layer's state."""
        last = len(self.layers)
        return self.hidden_states(input_ids, attention_mask, runner=runner,
                                  keep=lambda l, h: h if l == last else None)[-1]

    def embed_rows(self, input_ids):
        """What the embedding module returns for input_ids, through embedding_lookup (Gemma 3's scale applied)."""
        h = self.embedding_lookup(input_ids)
        scale = getattr(self.embed_tokens, "embed_scale", None)
        return h if scale is None else h * scale.to(h.dtype)

    @contextlib.contextmanager
    def _checkpointed_layers(self):
        """The decoder layers checkpoint their forward while the context is open (their submodules stay in eval
        mode: the flag transformers checks is the layer's own `training`). The backward may run after it closes:
        the recompute calls the forward the checkpoint captured."""
        from transformers.modeling_layers import GradientCheckpointingLayer
        if not all(isinstance(layer, GradientCheckpointingLayer) for layer in self.layers):
            raise ValueError(f"{type(self.layers[0]).__name__} does not support gradient checkpointing in this "
                             "transformers; set attribution_recompute: false")
        before = [(layer.gradient_checkpointing, layer.training, layer.__dict__.get("_gradient_checkpointing_func"))
                  for layer in self.layers]
        # reentrant: the layer runs again, forward and backward, inside the backward, so that ZeRO-3 gathers its
        # frozen parameters for both (non-reentrant checkpointing saves them by reference, and ZeRO-3 partitions
        # them in place after the recomputed forward: a CheckpointError). Take gradients with backward(), not grad().
        ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
        for layer in self.layers:
            layer.gradient_checkpointing, layer.training, layer._gradient_checkpointing_func = True, True, ckpt
        try:
            yield
        finally:
            for layer, (on, training, func) in zip(self.layers, before):
                layer.gradient_checkpointing, layer.training = on, training
                if func is None:
                    layer.__dict__.pop("_gradient_checkpointing_func", None)
                else:
                    layer._gradient_checkpointing_func = func


def _right_padded(attention_mask):
    """The mask the model gets for a right-padded batch: none (causal only). Real positions never see the padding
    after them, so they come out the same; but a padding query whose whole sliding window is padding would get a
    fully masked attention row, NaN under eager attention (Gemma 2), and 0 * NaN spreads it to every position of
    its row in the next layer."""
    if attention_mask is None:
        return None
    if not bool((attention_mask.cummin(dim=1).values == attention_mask).all()):
        raise ValueError("the adapter runs right-padded batches only (each attention-mask row: ones, then zeros)")
    return None


@functools.cache
def _mask_builders():
    """transformers' causal-mask builders and the name of their cache argument, looked up once: `cache` since
    transformers renamed `past_key_values` (deprecated in 5.24, removed in 5.40), `past_key_values` before."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    return create_causal_mask, create_sliding_window_causal_mask, cache_argument(create_causal_mask)


def cache_argument(fn):
    """The name under which `fn` (a transformers mask builder) takes the key/value cache."""
    params = inspect.signature(fn).parameters  # follows the deprecation wrapper to the function itself
    return "cache" if "cache" in params else "past_key_values"


def _positions(ids_or_mask):
    """Position ids of a right-padded batch: 0..T-1 on every row."""
    batch, length = ids_or_mask.shape
    return torch.arange(length, device=ids_or_mask.device).unsqueeze(0).expand(batch, length)


def vocab_size(tokenizer):
    """Ids the tokenizer can produce: the LM head rows beyond them are padding."""
    return len(tokenizer)


def check_same_vocabulary(tok_s, tok_t, name_s, name_t, head_rows_s, head_rows_t):
    """The number of token ids source and target share, V: both tokenizers must give ids 0..V-1 to the same
    tokens, V being the smaller vocabulary. Vocabularies that share a prefix of ids (WizardCoder's 32,001 tokens,
    Llama 2's 32,000 plus a pad token) are index-aligned on the shared ids; the LM head rows and data ids from V on
    must not be used (see out_of_vocabulary). Refuse anything else before any model runs."""
    v_s, v_t = vocab_size(tok_s), vocab_size(tok_t)
    shared = min(v_s, v_t)
    problems = []
    by_id_s, by_id_t = _tokens_by_id(tok_s, shared), _tokens_by_id(tok_t, shared)
    diff = [(i, by_id_s[i], by_id_t[i]) for i in range(shared) if by_id_s[i] != by_id_t[i]]
    if diff:
        problems.append(f"{len(diff)} tokens have different ids (of the {shared} shared ids; id, source, target: "
                        f"{diff[:3]})")
    if head_rows_s < v_s or head_rows_t < v_t:
        problems.append(f"an LM head has fewer rows than its tokenizer's vocabulary "
                        f"(source {head_rows_s} for {v_s}, target {head_rows_t} for {v_t})")
    if problems:
        raise ConfigError(f"source and target must share one tokenizer: {'; '.join(problems)}. Source tokenizer: "
                          f"{name_s} ({type(tok_s).__name__}, {v_s} tokens); target tokenizer: {name_t} "
                          f"({type(tok_t).__name__}, {v_t} tokens). Vocabularies that share a prefix of ids (one "
                          f"extends the other) are accepted")
    return shared


def _tokens_by_id(tokenizer, n):
    tokens = [None] * n
    for token, i in tokenizer.get_vocab().items():
        if i < n:
            tokens[i] = token
    return tokens


def out_of_vocabulary(ids, shared, origin):
    """Refuse token ids from `shared` on (tokens only the larger vocabulary has: neither model can be trained or
    scored on them), naming where they come from and what to do."""
    ids = torch.as_tensor(ids)
    bad = ids >= shared
    if bool(bad.any()):
        found = sorted(set(ids[bad].tolist()))
        raise ConfigError(f"{origin}: {int(bad.sum())} token(s) with ids {found[:5]} lie beyond the {shared} ids "
                          f"that source and target share; tokenize with the tokenizer of the smaller vocabulary "
                          f"(the `tokenizer` key), and use a pad token below {shared}")



# ---------------------------------------------------------------------------------------------------------------
# reading models without building them whole

def config_of(spec, gguf_file=None):
    """The model config alone (nothing allocated; a synthetic model is not written for it)."""
    from transformers import AutoConfig
    if spec.startswith("synthetic:"):
        from semalign_ds import synthetic
        return synthetic.config(spec.split(":", 1)[1])
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


def safetensors_files(path, gguf_file=None):
    """The safetensors weight files of a local model folder (none for a GGUF file, a config or a hub id)."""
    import glob
    if gguf_file or not os.path.isdir(path):
        return []
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def drop_from_page_cache(files):
    """Ask the kernel to drop the files' cached pages (posix_fadvise DONTNEED; pages another process maps or
    has dirtied stay), where the platform has it. For a checkpoint read once into partitions: its pages would
    otherwise fill free memory for the rest of the run (5.6 GB at a 1.5B float32 source, 140 GB at a 70B bfloat16
    one), and once free memory is gone every new page a phase allocates waits on reclaim."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def release_file_pages(tensor) -> int:
    """Unmap from this process the pages under a tensor that are still a mapped file's own, for a tensor whose
    values were copied elsewhere and are not read through it again; returns the bytes unmapped. A page counts when
    /proc/self/pagemap says present and file-backed: in a private mapping a page the process wrote has become
    anonymous and is left alone, and a clean one holds exactly the file's bytes, so unmapping it (madvise
    DONTNEED) loses nothing: a later read maps it from the file again. Only pages wholly inside the tensor's bytes
    are touched (its neighbours in the file share the first and last). Such pages are reclaimable page cache, but
    counted in the process's resident memory while mapped: a ZeRO stage's copy of each trained layer read 70 MiB
    of them a stage from a 0.34B target. 0 where the platform has no pagemap or madvise, for a tensor not in host
    memory, and for one that is not contiguous."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    first, last = -(-start // page), end // page  # the page numbers wholly inside
    if last <= first:
        return 0
    try:
        import ctypes
        import mmap
        dontneed = mmap.MADV_DONTNEED
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first * 8)
            entries = memoryview(f.read((last - first) * 8)).cast("Q")
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mask = (1 << 63) | (1 << 61)  # present, file page (or shared anonymous: not in a file's private mapping)
    released, run = 0, None  # run: the first page of the current stretch of file pages
    for i in range(len(entries) + 1):
        clean = i < len(entries) and entries[i] & mask == mask
        if clean and run is None:
            run = i
        elif not clean and run is not None:
            if madvise((first + run) * page, (i - run) * page, dontneed) == 0:
                released += (i - run) * page
            run = None
    return released


_LAYER_KEY = re.compile(r"(^|\.)(layers|h)\.(\d+)\.")


def load_pruned(spec, keep, gguf_file=None, dtype="float32", seed=0):
    """The model `spec` with only its decoder layers `keep` (as prune_layers), reading just those layers'
    tensors from its safetensors files: no process ever holds the whole model. A model without local safetensors
    files (a random-init config, a GGUF file, a hub id) is loaded whole and pruned."""
    from safetensors import safe_open
    path, gguf = resolve(spec, gguf_file)
    files = safetensors_files(path, gguf)
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
