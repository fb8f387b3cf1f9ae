"""The adapter runs a model layer by layer exactly as the model's own forward does."""
import pytest
import torch

from semalign_ds import models
from semalign_ds.config import ConfigError
from tests.helpers import random_model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_layer_by_layer_matches_forward(arch):
    model = random_model(arch, layers=3, seed=1)
    ad = models.Adapter(model)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (3, 11), generator=gen)
    attn = torch.ones_like(ids)
    ref = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    # the layer-by-layer path that frontier training uses
    h = ad.embed(ids)
    ctx = ad.context(h, attn)
    ours = [h]
    for i in range(ad.num_layers):
        h = ad.layer(i, h, ctx)
        ours.append(h)
    hooked = ad.hidden_states(ids, attn)
    assert len(ours) == len(hooked) == ad.num_layers + 1
    for l in range(ad.num_layers):  # the model's own last hidden state is after its final norm
        torch.testing.assert_close(ours[l], ref.hidden_states[l], rtol=1e-10, atol=1e-10)
    for a, b in zip(ours, hooked):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    final = ad.norm(ours[-1]) @ ad.head.weight.T
    torch.testing.assert_close(final, ref.logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_right_padding_leaves_real_positions_unchanged(arch):
    """Sequences of different lengths in one right-padded batch give the states they give alone."""
    model = random_model(arch, layers=2, seed=3)
    ad = models.Adapter(model)
    gen = torch.Generator().manual_seed(4)
    lengths = [9, 4, 7]
    ids = torch.zeros(3, 9, dtype=torch.long)
    attn = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 97, (n,), generator=gen)
        attn[i, :n] = 1
    batched = ad.hidden_states(ids, attn)[-1]
    for i, n in enumerate(lengths):
        alone = ad.hidden_states(ids[i:i + 1, :n], attn[i:i + 1, :n])[-1]
        torch.testing.assert_close(batched[i, :n], alone[0], rtol=1e-10, atol=1e-10)


def test_prune_keeps_the_named_layers():
    model = random_model("llama", layers=5, seed=5)
    pruned = models.prune_layers(model, [0, 2, 4])
    assert pruned.config.num_hidden_layers == 3
    full, small = models.Adapter(model), models.Adapter(pruned)
    for new, old in zip(range(3), [0, 2, 4]):
        for (n1, p1), (n2, p2) in zip(small.layers[new].named_parameters(), full.layers[old].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    assert len(full.layers) == 5  # the source is untouched
    with pytest.raises(ConfigError, match="only 5 layers"):
        models.prune_layers(model, [0, 5])


def test_unknown_architecture_is_named():
    class Fake:
        config = type("C", (), {"model_type": "mamba"})()
    with pytest.raises(models.UnsupportedArchitecture, match="'mamba'.*supported: llama"):
        models.Adapter(Fake())
