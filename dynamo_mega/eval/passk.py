"""pass@k from n samples per problem with c correct: the unbiased estimator 1 - C(n-c, k) / C(n, k).

Binomials of n ~ 64..1024 overflow floats and lose precision as ratios of huge integers, so the ratio is taken
as the product prod_{i=n-c+1}^{n} (1 - k / i), which equals C(n-c, k) / C(n, k) and stays in [0, 1].
"""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples, drawn without replacement from n with c correct, is correct."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c ({c}) <= n ({n})")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} must be in [1, n={n}]; draw at least k samples per problem")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(n: int, correct_counts: list[int], k: int) -> float:
    """pass@k averaged over problems, each with n samples of which correct_counts[i] are correct."""
    if not correct_counts:
        raise ValueError("mean_pass_at_k: no problems")
    return float(np.mean([pass_at_k(n, c, k) for c in correct_counts]))
