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


@pytest.mark.parametrize("arch, recompute", [("llama", False), ("gpt2", False), ("llama", True), ("gpt2", True)])
def test_batch_scores_match_reference(arch, recompute):
    """recompute: every layer runs again in the backward (counted), with the same scores."""
    model = random_model(arch, layers=4, seed=7)
    calls = []
    ad = models.Adapter(model)
    # a submodule's hook: a recompute runs the layer's forward again, inside its own hooks
    next(ad.layers[2].children()).register_forward_pre_hook(lambda *_: calls.append(2))
    gen = torch.Generator().manual_seed(8)
    lengths, starts = [13, 7, 10], [5, 2, 9]
    ids = torch.zeros(3, 13, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros(3, 13, dtype=torch.bool)
    for i, (n, s) in enumerate(zip(lengths, starts)):
        ids[i, :n] = torch.randint(1, 97, (n,), generator=gen)
        attn[i, :n] = 1
        loss[i, s - 1:n - 1] = True
    ours = attribution.batch_scores(ad, ids, attn, loss, ad.head.weight, recompute=recompute)
    assert len(calls) == (2 if recompute else 1)
    # the layers are as they were: not checkpointing, in eval mode
    assert not any(layer.gradient_checkpointing or layer.training for layer in ad.layers)
    for i, n in enumerate(lengths):
        positions = loss[i, :n - 1].nonzero().squeeze(1)
        ref = reference_scores(model, ids[i:i + 1, :n], positions)
        torch.testing.assert_close(ours[i], ref, rtol=1e-9, atol=1e-12)
    assert (ours > 0).all()


class _Examples:
    """Sequences of odd lengths, right-padded into batches as the tokenised transfer set does."""

    def __init__(self, lengths, starts, seed):
        gen = torch.Generator().manual_seed(seed)
        self.ids = [torch.randint(1, 97, (n,), generator=gen) for n in lengths]
        self.loss = [torch.arange(n) >= s - 1 for n, s in zip(lengths, starts)]
        for mask in self.loss:
            mask[-1] = False  # the last position predicts nothing

    def __len__(self):
        return len(self.ids)

    @property
    def lengths(self):
        return torch.tensor([len(x) for x in self.ids])

    def batch(self, indices, pad_id):
        length = max(len(self.ids[i]) for i in indices)
        ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        loss = torch.zeros((len(indices), length), dtype=torch.bool)
        for row, i in enumerate(indices):
            n = len(self.ids[i])
            ids[row, :n], attn[row, :n], loss[row, :n] = self.ids[i], 1, self.loss[i]
        return ids, attn, loss


@pytest.mark.parametrize("batch_size, recompute", [(1, False), (2, False), (5, False), (2, True)])
def test_phase_scores_do_not_depend_on_the_batch_size(batch_size, recompute):
    """attribution.phase over micro-batches of attribution_batch_size: the mean over examples of each example's
    own float64 reference, whatever the micro-batch, with or without attribution_recompute."""
    from types import SimpleNamespace
    model = random_model("llama", layers=4, seed=11)
    data = _Examples([13, 7, 10, 4, 11], [5, 2, 9, 2, 3], seed=12)
    logged = {}
    s = SimpleNamespace(cfg=SimpleNamespace(attribution_examples=None, attribution_batch_size=batch_size,
                                            attribution_recompute=recompute), data=data,
                        device="cpu", pad_id=0, rank=0, world=1, n_source=4, bar=lambda it, **kw: it,
                        monitor=SimpleNamespace(log=lambda tag, values, step: logged.update({tag: values})))
    ad = models.Adapter(model)
    ours = torch.tensor(attribution.phase(s, ad, None, ad.head.weight), dtype=torch.float64)
    refs = [reference_scores(model, data.ids[i][None], data.loss[i][:-1].nonzero().squeeze(1)) for i in range(5)]
    torch.testing.assert_close(ours, torch.stack(refs).mean(0), rtol=1e-9, atol=1e-12)
    assert logged["attribution"]["seconds"] > 0
