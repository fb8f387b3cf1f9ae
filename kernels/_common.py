"""Pieces shared by the two fused-loss kernels: dtype choices, tuning configs, row compaction, split-V sizing.

Nothing here is DeepSpeed-specific: under ZeRO-3 the caller passes an already gathered head weight.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, which Triton itself reads
    when a kernel module is imported: set it before that)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
TORCH = {v: k for k, v in _TL.items()}


def operand_dtype(*tensors):
    """The dtype matrix-multiply operands are cast to inside the kernels (accumulation is always float32).

    Half-precision inputs keep their dtype so that the tensor cores run at full rate; mixed or wider inputs use
    float32. bf16 is upcast under the interpreter, whose bf16 tl.dot multiplies raw bits (PLATFORM.md).
    """
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        (dt,) = dtypes
        if dt == torch.float16 or (dt == torch.bfloat16 and not interpreting()):
            return _TL[dt]
    return tl.float32


def dot_precision(op) -> str:
    """How float32 operands use the tensor cores: TF32 only where torch allows it for matmuls, else 3xTF32 (about
    float32 accuracy at a third of the TF32 rate). Half-precision operands ignore it (given the default)."""
    if interpreting():
        return "ieee"
    if op != tl.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def check_dtypes(name, *tensors):
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name}: unsupported dtype {t.dtype}")


def kernel_inputs(*tensors):
    """float64 has no tensor-core dot: run it in float32 (the triton back end returns float32 losses)."""
    return [t.float() if t.dtype == torch.float64 else t for t in tensors]


def autotune(half, f32, interpreter, key):
    """triton.autotune over `half` (fp16/bf16 operands) or `f32` (float32 operands) configs, each a list of
    (kwargs, num_warps, num_stages); under the interpreter a single config (multi-config autotune fails there,
    and large tiles keep its per-op cost down).

    The GPU lists hold configs that compile for sm_90 without register spills and within shared memory (checked
    with ptxas through triton.compile for a GPUTarget("cuda", 90, 32), unit column strides, 16-divisible
    sizes); float32 operands need smaller tiles. The dtype picks its list through early_config_prune, since a
    config cannot carry a non-kernel argument.
    """
    if interpreting():
        return triton.autotune([triton.Config(interpreter, num_warps=4, num_stages=1)], key=key)
    half_cfgs = [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in half]
    f32_cfgs = [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in f32]

    def by_operand_dtype(configs, named_args, **kwargs):
        return f32_cfgs if kwargs.get("OP", named_args.get("OP")) == tl.float32 else half_cfgs

    return triton.autotune(half_cfgs + f32_cfgs, key=key, prune_configs_by={"early_config_prune": by_operand_dtype})


def staging(kernel, rows, splits, op, device):
    """Per-program staging buffers of a forward kernel, sized for the largest of its configs: SUB x 2 operand
    tiles [BLOCK_M, BLOCK_V] in the operand dtype and SUB x 2 per-row scalars in float32. About 128 KiB per
    program (16 MiB for 128 programs, so that they stay in L2); O(rows * SUB * BLOCK_V), never [rows, V]."""
    cfgs = [c.kwargs for c in kernel.configs]
    progs = triton.cdiv(rows, min(c["BLOCK_M"] for c in cfgs)) * splits
    tiles = max(c["SUB"] * c["BLOCK_M"] * c["BLOCK_V"] for c in cfgs)
    lanes = max(c["SUB"] * c["BLOCK_M"] for c in cfgs)
    return (torch.empty(progs * 2 * tiles, dtype=TORCH[op], device=device),
            torch.empty(progs * 2 * lanes, dtype=torch.float32, device=device))


def num_splits(rows: int, vocab: int, device: torch.device, requested=None) -> int:
    """How many slices the vocabulary is cut into, each handled by its own program per row block.

    The forward grid is (row blocks x splits). With few counted rows there are fewer row blocks than
    multiprocessors; splitting V fills the device at the price of a merge over [splits, rows, d] partials in
    float32, so splits are only used to reach one program per SM and are capped at 8.
    """
    if requested is not None:
        return max(1, int(requested))
    if device.type != "cuda" or rows == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(rows, 64)
    return max(1, min(8, sms // max(row_blocks, 1), triton.cdiv(vocab, 4096)))


def counted_rows(mask):
    return mask.nonzero().squeeze(1)


def row_scale(grad_out, reduction, rows, count):
    """Per counted row, d(reduced loss)/d(per-row loss): the factor applied to saved gradients in backward."""
    g = grad_out.float()
    if reduction == "none":
        return g.index_select(0, rows).contiguous()
    if reduction == "mean":
        g = g / max(count, 1)
    return g.expand(count).contiguous()


def reduce_rows(loss_c, rows, n, reduction):
    """Per-row losses of the counted rows [M] -> the requested reduction over all N rows (0 where masked)."""
    if reduction == "none":
        out = torch.zeros(n, dtype=torch.float32, device=loss_c.device)
        return out.index_copy_(0, rows, loss_c)
    total = loss_c.sum()
    return total if reduction == "sum" else total / max(rows.numel(), 1)


def scatter_rows(grad_c, rows, n, dtype):
    out = torch.zeros((n, grad_c.shape[1]), dtype=dtype, device=grad_c.device)
    return out.index_copy_(0, rows, grad_c.to(dtype))
