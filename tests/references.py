"""Exact float64 references for the SemAlign losses, written independently of the implementations.

Fisher: the explicit quadratic form tau^2/2 * delta^T (diag(p*) - p* p*^T) delta, the Fisher matrix built per row.
KL: tau^2 * torch.nn.functional.kl_div on log-softmaxes.
"""
import torch
import torch.nn.functional as F


def fisher_reference(x, y, w, tau):
    """Per-row loss as the explicit quadratic form delta^T F delta, F = diag(p*) - p* p*^T built per row. F depends
    on the target only (a constant), so the value is delta^T F delta and the gradient 2 F delta: written so that
    autograd does not keep 37 V x V matrices alive. Gradient flows to x and to w through W x only."""
    z = x @ w.T
    with torch.no_grad():
        z_star = y @ w.T
        p = torch.softmax(z_star / tau, dim=-1)
    delta = (z - z_star) / tau
    rows = []
    for n in range(x.shape[0]):
        with torch.no_grad():
            fisher = torch.outer(p[n], -p[n])
            fisher.diagonal().add_(p[n])
            f_delta = fisher @ delta[n].detach()
        rows.append(2 * delta[n] @ f_delta - delta[n].detach() @ f_delta)
    return tau * tau / 2 * torch.stack(rows)


def kl_reference(x_t, w_t, x_s, w_s, tau):
    log_ps = torch.log_softmax(x_s @ w_s.T / tau, dim=-1)
    log_pt = torch.log_softmax(x_t @ w_t.T / tau, dim=-1)
    return tau * tau * F.kl_div(log_pt, log_ps, log_target=True, reduction="none").sum(-1)


def reduce(per_row, mask, reduction):
    per_row = per_row * mask
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.sum() / max(int(mask.sum()), 1)
