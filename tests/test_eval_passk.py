"""pass@k: the product-form unbiased estimator against brute-force enumeration of k-subsets and exact binomials."""

from __future__ import annotations

import itertools
import math

import pytest

from dynamo_mega.eval.passk import mean_pass_at_k, pass_at_k


def _brute_force(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_matches_exact_binomials():
    n, c, k = 1024, 3, 256  # C(1024, 256) has ~245 digits: no float can hold it, the product form can
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python ints: exact, then one rounding
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 is the mean accuracy
    assert mean_pass_at_k(4, [0, 4, 2], 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)
