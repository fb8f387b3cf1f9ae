"""Semantic bases and the alignment map (docs/method.md, section 3).

The semantic basis of a model is S = pinv(W) in R^{d x V} with unit columns: column i is token i's direction in
latent space. Decomposing a unit source state u on the source basis by cosine and recomposing on the target basis
with the same coefficients is a = S_t S_s^T u = M u, so M (d_t x d_s) is computed once and no V-sized coefficient
vector is ever formed per token.
"""
from __future__ import annotations

import os

import torch


def semantic_basis(weight: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """S = pinv(W) with unit-length columns; weight: [V, d] LM head (padding rows already trimmed).

    A token whose head row is zero (padding embeddings are often initialised so) has no direction: its column
    is left at zero instead of normalising rounding noise to unit length."""
    basis = torch.linalg.pinv(weight.to(dtype))
    norms = basis.norm(dim=0, keepdim=True)
    empty = norms <= norms.max() * 1e-6
    return torch.where(empty, torch.zeros((), dtype=dtype), basis / norms.clamp(min=torch.finfo(dtype).tiny))


def alignment_map(weight_t: torch.Tensor, weight_s: torch.Tensor, dtype=torch.float64,
                  kind="semantic") -> torch.Tensor:
    """M in R^{d_t x d_s}, in float32: the semantic-basis map S_t S_s^T (kind "semantic", the paper), or the
    least-squares logit-matching map pinv(W_t) W_s (kind "least_squares": W_t M u is the target-space state whose
    logits are closest to the source's logit lens W_s u, exact when the pair shares its head)."""
    if weight_t.shape[0] != weight_s.shape[0]:
        raise ValueError(f"vocabularies differ: target head {weight_t.shape[0]} rows, source {weight_s.shape[0]}")
    if kind == "least_squares":
        return (torch.linalg.pinv(weight_t.to(dtype)) @ weight_s.to(dtype)).float()
    if kind != "semantic":
        raise ValueError(f"unknown alignment map {kind!r}: semantic or least_squares")
    s_t = semantic_basis(weight_t, dtype)
    s_s = semantic_basis(weight_s, dtype)
    return (s_t @ s_s.T).float()


def source_direction(h: torch.Tensor, final_norm=None) -> torch.Tensor:
    """u = n_s(h) / ||n_s(h)|| (logit-lens normalised when final_norm is given), in float32."""
    if final_norm is not None:
        h = final_norm(h)
    h = h.float()
    return h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def align(m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """a = M u for a batch of unit source states u [N, d_s] -> [N, d_t]."""
    return u @ m.T


def phase(s, head_t, head_s):
    """The alignment map of the run: alignment.safetensors when intact, else computed by rank 0 and saved."""
    from semalign_ds import distributed, rundir
    path = s.rd.path("alignment.safetensors")
    if s.main and not rundir.intact(path):  # every rank's load_tensors below checks it again
        if os.path.exists(path):
            print(f"{path} is damaged or has no checksum: recomputing it", flush=True)
        dtype = torch.float64 if s.cfg.basis_dtype == "float64" else torch.float32
        rundir.save_tensors(path, {"M": alignment_map(head_t.detach(), head_s, dtype, s.cfg.alignment_map)})
    distributed.barrier()
    return rundir.load_tensors(path)["M"].to(s.device)
