import itertools
import random

import pytest

from semalign_ds import pairing


def brute_force(scores, n_target, lam):
    n_source = len(scores)
    best = None
    for head in itertools.combinations(range(1, n_source), n_target - 1):
        pairs = list(head) + [n_source]
        value = pairing.total(scores, pairs, n_target, lam)
        if best is None or value > best[0] + 1e-12:
            best = (value, pairs)
    return best


@pytest.mark.parametrize("trial", range(40))
def test_dp_matches_brute_force(trial):
    rng = random.Random(trial)
    n_source = rng.randint(1, 9)
    n_target = rng.randint(1, n_source)
    scores = [rng.random() * rng.choice([1, 1e-3, 50]) for _ in range(n_source)]
    lam = rng.choice([0.0, 0.3, 1.0, 5.0])
    pairs = pairing.attribution_pairs(scores, n_target, lam)
    assert len(pairs) == n_target and pairs[-1] == n_source
    assert all(a < b for a, b in zip(pairs, pairs[1:])) and pairs[0] >= 1
    value, _ = brute_force(scores, n_target, lam)
    assert pairing.total(scores, pairs, n_target, lam) == pytest.approx(value, abs=1e-12)


def test_pure_attribution_takes_the_top_layers():
    scores = [0.1, 0.9, 0.2, 0.8, 0.05, 0.3]
    assert pairing.attribution_pairs(scores, 3, lam=0.0) == [2, 4, 6]


def test_large_lambda_is_the_uniform_rule_when_it_divides():
    scores = [random.Random(1).random() for _ in range(12)]
    assert pairing.attribution_pairs(scores, 4, lam=1e6) == pairing.uniform_pairs(12, 4) == [3, 6, 9, 12]


def test_uniform_rule():
    assert pairing.uniform_pairs(30, 10) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert pairing.uniform_pairs(5, 3) == [1, 3, 5]
    assert pairing.uniform_pairs(2, 2) == [1, 2]
    with pytest.raises(ValueError, match="more layers than its source"):
        pairing.uniform_pairs(3, 4)
