"""Pairing: exactly one source layer per target layer, strictly increasing, the last with the last.

Layers are 1-based here, as in docs/method.md: target layer k (1..L_t) is paired with source layer l(k) (1..L_s), and
h^(l) is the residual stream after decoder layer l.
"""
from __future__ import annotations


def uniform_pairs(n_source: int, n_target: int) -> list[int]:
    """The paper's depth rule l(k) = max(1, floor(k * L_s / L_t)), the last forced to L_s."""
    _check(n_source, n_target)
    pairs = [max(1, (k * n_source) // n_target) for k in range(1, n_target + 1)]
    pairs[-1] = n_source
    return pairs


def attribution_pairs(scores, n_target: int, lam: float = 0.0) -> list[int]:
    """The strictly increasing l(1..L_t), l(L_t) = L_s, maximising
        sum_k s(l(k)) - lam * sum_k |l(k)/L_s - k/L_t|,
    with s the attribution scores scaled to a maximum of 1 (so that lam does not depend on their units);
    exact dynamic programming in O(L_t * L_s)."""
    n_source = len(scores)
    _check(n_source, n_target)
    top = max(abs(float(s)) for s in scores) or 1.0
    s = [float(v) / top for v in scores]

    def value(k, l):  # 1-based target layer k paired with 1-based source layer l
        return s[l - 1] - lam * abs(l / n_source - k / n_target)

    neg = float("-inf")
    # best[l]: best total for target layers 1..k with l(k) = l; choice[k][l]: l(k-1) on that best path
    best = [neg] + [value(1, l) for l in range(1, n_source + 1)]
    choice = [None]
    for k in range(2, n_target + 1):
        new, arg = [neg] * (n_source + 1), [0] * (n_source + 1)
        run_best, run_arg = neg, 0  # max of best[1..l-1]
        for l in range(1, n_source + 1):
            if best[l - 1] > run_best and l - 1 >= 1:
                run_best, run_arg = best[l - 1], l - 1
            if run_best > neg:
                new[l], arg[l] = run_best + value(k, l), run_arg
        best = new
        choice.append(arg)
    pairs = [n_source]
    for k in range(n_target - 1, 0, -1):
        pairs.append(choice[k][pairs[-1]])
    return pairs[::-1]


def total(scores, pairs, n_target, lam):
    """The objective attribution_pairs maximises, for a given pairing (used by tests)."""
    n_source = len(scores)
    top = max(abs(float(s)) for s in scores) or 1.0
    return sum(float(scores[l - 1]) / top - lam * abs(l / n_source - k / n_target)
               for k, l in enumerate(pairs, start=1))


def _check(n_source, n_target):
    if n_target < 1 or n_target > n_source:
        raise ValueError(f"the target has {n_target} layers and the source {n_source}: pairing needs "
                         f"1 <= L_t <= L_s (a target with more layers than its source cannot be paired)")


def make_plan(strategy, scores, n_source, n_target, lam):
    """The plan every later phase reuses: strategy, scores (attribution only) and the pairs."""
    if strategy == "attribution":
        pairs = attribution_pairs(scores, n_target, lam)
    else:
        pairs = uniform_pairs(n_source, n_target)
    return {"strategy": strategy, "lambda": lam, "source_layers": n_source, "target_layers": n_target,
            "scores": scores, "pairs": pairs}
