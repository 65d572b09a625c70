"""Group-relative advantages with variable group sizes (ALGORITHM.md section 0).

A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps), std unbiased (N-1), per prompt group i whose size n_i is
the prompt's own rollout count. A group of one sample, or whose rewards are all equal, carries no signal
about which response is better and gets A = 0 (the unbiased std is undefined for n=1 and 0 for ties).

`equal_prompt_weights` rescales them so that every group weighs alike in the global token-mean loss
(allocation.prompt_weight=equal). The clipped loss is positively homogeneous in the advantage (min/max of
r * c * A and clip(r) * c * A, the dual clip c_d * c * A), so scaling a group's advantages by c > 0 is weighting its
loss by c; DynaMO's modulation then sees the advantages the loss uses.
"""

from __future__ import annotations

import torch


def group_advantages(rewards_N: torch.Tensor, group_sizes: list[int], eps: float = 1e-6) -> torch.Tensor:
    """rewards_N: [N] rewards laid out group after group (group i has group_sizes[i] entries) -> [N] advantages."""
    if sum(group_sizes) != rewards_N.numel():
        raise AssertionError(f"group sizes sum to {sum(group_sizes)} but there are {rewards_N.numel()} rewards")
    out = torch.zeros_like(rewards_N, dtype=torch.float32)
    start = 0
    for n in group_sizes:
        r = rewards_N[start : start + n].float()
        if n > 1 and not torch.all(r == r[0]):
            out[start : start + n] = (r - r.mean()) / (r.std(unbiased=True) + eps)
        start += n
    return out



def equal_prompt_weights(group_sizes: list[int]) -> torch.Tensor:
    """[N] per-sample factors mean(n) / n_i: a group of n_i samples weighs as a group of the mean size (the factors
    sum to N, so the loss keeps its scale); all ones when every group has the same size."""
    sizes = torch.tensor(group_sizes, dtype=torch.float32)
    return (sizes.mean() / sizes).repeat_interleave(sizes.long())
