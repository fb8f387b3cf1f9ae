"""Gradient x activation scores of a padded batch against a per-example float64 reference that uses the model's
own forward and autograd."""
import pytest
import torch
import torch.nn.functional as F

from semalign_ds import attribution, models
from tests.helpers import random_model


def reference_scores(model, ids, loss_positions):
    """One example alone: |sum over loss positions and channels of h^(l) * dL/dh^(l)| per layer l."""
    captured = []

    def keep(_module, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        h.retain_grad()
        captured.append(h)

    ad = models.Adapter(model)
    handles = [layer.register_forward_hook(keep) for layer in ad.layers]
    embeds = ad.embed_tokens(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits[0]
    loss = F.cross_entropy(logits[loss_positions], ids[0, 1:][loss_positions])
    loss.backward()
    for h in handles:
        h.remove()
    return torch.stack([(h.grad[0, loss_positions] * h[0, loss_positions]).sum().abs() for h in captured])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_scores_match_reference(arch):
    model = random_model(arch, layers=4, seed=7)
    gen = torch.Generator().manual_seed(8)
    lengths, starts = [13, 7, 10], [5, 2, 9]
    ids = torch.zeros(3, 13, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros(3, 13, dtype=torch.bool)
    for i, (n, s) in enumerate(zip(lengths, starts)):
        ids[i, :n] = torch.randint(1, 97, (n,), generator=gen)
        attn[i, :n] = 1
        loss[i, s - 1:n - 1] = True
    ad = models.Adapter(model)
    ours = attribution.batch_scores(ad, ids, attn, loss, ad.head.weight)
    for i, n in enumerate(lengths):
        positions = loss[i, :n - 1].nonzero().squeeze(1)
        ref = reference_scores(model, ids[i:i + 1, :n], positions)
        torch.testing.assert_close(ours[i], ref, rtol=1e-9, atol=1e-12)
    assert (ours > 0).all()
