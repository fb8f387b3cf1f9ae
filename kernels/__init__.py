"""Triton kernels fusing the vocabulary projection with the SemAlign losses (installed as semalign_ds.kernels).

    fisher_quadratic.fused_fisher_quadratic   backend="triton" of semalign_ds.losses.fisher_quadratic_loss
    linear_kl.fused_linear_kl                 backend="triton" of semalign_ds.losses.linear_kl_loss
    bench                                     python -m semalign_ds.kernels.bench --help

Nothing is imported here, so that importing the package needs no Triton. The kernels read the head weight as
given: under ZeRO-3 the caller gathers it first.
"""
