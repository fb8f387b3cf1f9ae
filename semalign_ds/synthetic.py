"""Random-initialised Llama-shaped models by name, for measuring memory and speed at scale without real weights.

`synthetic:NAME` names a model of a real model's shape (width, depth, heads) on the SmolLM2 tokenizer (vocabulary
49152), so that the embedded transfer set and tokenizer work with it. It is written once into the cache directory
(embedded.cache_dir()/synthetic/NAME) as sharded safetensors with its config.json and the real SmolLM2 tokenizer,
then loaded like any local Hugging Face folder.

Writing never holds the model: each shard's safetensors header is computed from the tensor shapes, and the values
are generated and written a chunk of rows at a time (normal, std 0.02, as transformers initialises Linear and
Embedding weights; norms at 1), so building the 3B model needs a few tens of MB. A marker file, written last,
records each shard's size and a digest of sampled blocks; a folder whose marker is missing or does not match its
files (a killed build, a damaged shard) is rebuilt.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import zlib
from typing import NamedTuple

import torch

from semalign_ds.config import ConfigError

VOCAB = 49152  # SmolLM2's tokenizer
BOS, EOS, PAD = 1, 2, 2  # its <|im_start|>, <|im_end|> (also its pad token)
MARKER = "synthetic.json"
FORMAT = 1  # bumped when the way a model is written changes: older folders are rebuilt
_CHUNK = 1 << 22  # values generated and written at a time (16 MiB of fp32)


class Shape(NamedTuple):
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool = True
    shard_bytes: int = 1 << 30  # max_shard_size, as save_pretrained(max_shard_size="1GB")


# Bodies of real models (their widths, depths, heads and MLP sizes) on the 49152-token vocabulary; parameters
# are counted with that vocabulary (Qwen's own is 151936, so llama-0.5b has 0.40B here, not 0.49B).
SHAPES = {
    "llama-tiny": Shape(64, 4, 128, 4, 2, tied=False, shard_bytes=4 << 20),  # tests: several 4 MiB shards
    "llama-tiny-tied": Shape(64, 3, 128, 4, 2, shard_bytes=4 << 20),  # tests: the head is the embedding
    "llama-tiny-odd": Shape(36, 3, 92, 2, 1, shard_bytes=4 << 20),  # tests: no tensor fills whole pages
    "llama-0.4b": Shape(1024, 16, 5120, 16, 4),  # a target: 0.34B, 16 layers (no more than any source here)
    "llama-0.5b": Shape(896, 24, 4864, 14, 2),  # Qwen2.5-0.5B's body: 0.40B
    "llama-1b": Shape(2048, 16, 8192, 32, 8),  # Llama-3.2-1B: 1.07B
    "llama-1.5b": Shape(1536, 28, 8960, 12, 2),  # Qwen2.5-1.5B's body: 1.39B
    "llama-3b": Shape(3072, 28, 8192, 24, 8),  # Llama-3.2-3B: 2.97B
}


def shape_of(name) -> Shape:
    if name not in SHAPES:
        raise ConfigError(f"unknown synthetic model {name!r}; synthetic models: {', '.join(SHAPES)}")
    return SHAPES[name]


def config(name):
    """The model's LlamaConfig (nothing built or written)."""
    from transformers import LlamaConfig
    s = shape_of(name)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=s.hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=s.tied,
                       initializer_range=0.02, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                       dtype="float32")


def tensors(name):
    """[(tensor name, shape, init)] in the order they are written; init: "normal" or "ones"."""
    s = shape_of(name)
    head_dim = s.hidden // s.heads
    q, kv = s.heads * head_dim, s.kv_heads * head_dim
    out = [("model.embed_tokens.weight", (VOCAB, s.hidden), "normal")]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (s.hidden,), "ones"),
                (p + "self_attn.q_proj.weight", (q, s.hidden), "normal"),
                (p + "self_attn.k_proj.weight", (kv, s.hidden), "normal"),
                (p + "self_attn.v_proj.weight", (kv, s.hidden), "normal"),
                (p + "self_attn.o_proj.weight", (s.hidden, q), "normal"),
                (p + "post_attention_layernorm.weight", (s.hidden,), "ones"),
                (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden), "normal"),
                (p + "mlp.up_proj.weight", (s.intermediate, s.hidden), "normal"),
                (p + "mlp.down_proj.weight", (s.hidden, s.intermediate), "normal")]
    out.append(("model.norm.weight", (s.hidden,), "ones"))
    if not s.tied:
        out.append(("lm_head.weight", (VOCAB, s.hidden), "normal"))
    return out


def parameter_count(name):
    return sum(_numel(shape) for _, shape, _ in tensors(name))


def folder(name):
    from semalign_ds import embedded
    return os.path.join(embedded.cache_dir(), "synthetic", name)


_VERIFIED = set()  # folders verified by this process (verification reads sampled blocks of every shard)


def ensure(name, seed=0):
    """The model's folder: written on first use, verified, rewritten when missing or damaged. Several processes
    (the ranks on one machine) may ask at once: one writes it, the others wait for it."""
    shape_of(name)
    out = folder(name)
    if out in _VERIFIED or verify(name, out) is None:
        _VERIFIED.add(out)
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        problem = verify(name, out)  # another process may have written it while this one waited
        if problem is not None:
            if os.path.exists(out):
                print(f"synthetic:{name}: {problem}; writing it again", flush=True)
            build(name, out, seed)
    _VERIFIED.add(out)
    return out


def verify(name, out):
    """None when `out` holds the model as its marker describes it, else what is wrong."""
    try:
        with open(os.path.join(out, MARKER)) as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError):
        return "no complete copy (marker missing or unreadable)"
    if marker.get("format") != FORMAT or marker.get("shape") != list(shape_of(name)):
        return "written for another shape or format"
    for file, expect in marker["files"].items():
        path = os.path.join(out, file)
        if not os.path.isfile(path) or os.path.getsize(path) != expect["size"]:
            return f"{file} is missing or has the wrong size"
        if expect.get("sampled_sha256") is not None and _sampled_digest(path) != expect["sampled_sha256"]:
            return f"{file} is damaged (its sampled digest differs)"
    return None


def build(name, out, seed=0):
    """Write the model into `out` (replaced only once the new copy is complete)."""
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = _shards(tensors(name), shape_of(name).shard_bytes)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(os.path.join(tmp, file), shard, seed)
        weight_map.update({t[0]: file for t in shard})
    _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    config(name).save_pretrained(tmp)
    for file in os.listdir(tokenizer_folder()):
        shutil.copy(os.path.join(tokenizer_folder(), file), tmp)
    files = {f: {"size": os.path.getsize(os.path.join(tmp, f)),
                 "sampled_sha256": _sampled_digest(os.path.join(tmp, f))} for f in sorted(os.listdir(tmp))}
    # last: a folder with this marker is complete
    _write_json(os.path.join(tmp, MARKER), {"name": name, "format": FORMAT, "shape": list(shape_of(name)),
                                            "seed": seed, "parameters": parameter_count(name), "files": files})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def tokenizer_folder():
    """SmolLM2's tokenizer, saved once from the embedded model's GGUF file (the tokenizer alone: the embedded
    model itself is not converted)."""
    from semalign_ds import embedded
    out = os.path.join(embedded.cache_dir(), "synthetic", "smollm2-tokenizer")
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(out, "tokenizer.json")):
            from transformers import AutoTokenizer
            gguf_dir, gguf = os.path.split(embedded.gguf_path("smollm2-135m-instruct"))
            tmp = f"{out}.tmp{os.getpid()}"
            AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf).save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# writing without holding the model

def _numel(shape):
    n = 1
    for x in shape:
        n *= x
    return n


def _shards(specs, shard_bytes):
    """Consecutive tensors grouped into shards of at most shard_bytes (a larger tensor gets a shard alone)."""
    shards, size = [[]], 0
    for spec in specs:
        nbytes = 4 * _numel(spec[1])
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _write_safetensors(path, specs, seed):
    """A safetensors file of fp32 tensors, its values generated a chunk at a time; returns the bytes of data."""
    header, offset = {}, 0
    for name, shape, _ in specs:
        nbytes = 4 * _numel(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, init in specs:
            for chunk in _values(name, shape, init, seed):
                f.write(chunk.numpy().data)
    return offset


def _values(name, shape, init, seed):
    """The tensor's values, row blocks of at most _CHUNK values; each tensor has its own seeded generator, so a
    tensor's values do not depend on which shard it lands in."""
    rows = shape[0]
    cols = _numel(shape[1:])
    step = max(1, _CHUNK // cols)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    for start in range(0, rows, step):
        n = min(step, rows - start) * cols
        if init == "ones":
            yield torch.ones(n)
        else:
            yield torch.empty(n).normal_(0.0, 0.02, generator=gen)


def _sampled_digest(path, blocks=64, block=1 << 16):
    """sha256 of the size and 64 blocks of 64 KiB spread over the file (all of a file up to 4 MiB): catches a
    truncated, zeroed or partly overwritten shard without reading gigabytes."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek((size * i) // blocks)
            digest.update(f.read(block))
    return digest.hexdigest()


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
