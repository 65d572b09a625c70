"""Which parts of the model go into one megatron save when writing a distributed checkpoint.

Every `dist_checkpointing.save` has a fixed cost (megatron's translation and planning, torch's planning,
metadata, file creation: ~65 ms on this 2-core host), so one save per decoder layer costs seconds on a
small model. A write group is a run of consecutive parts of one kind (decoder layers, or the tensors
outside them) whose source bytes fit a budget; a part larger than the budget is a group of its own. The
host memory a conversion holds is one group, so the budget is the knob between memory and speed.
"""

from __future__ import annotations

DEFAULT_GROUP_BYTES = 1 << 30


def group_parts(parts: list[tuple[str, int | None]], part_bytes: dict[str, int], budget: int) -> list[list[str]]:
    """parts: (name, layer or None) in writing order -> groups of part names, order kept."""
    if budget <= 0:
        raise ValueError(f"write group size must be positive, got {budget}")
    groups: list[list[str]] = []
    group_bytes, group_kind = 0, None
    for name, layer in parts:
        kind = layer is not None
        full = groups and group_bytes + part_bytes[name] > budget
        if not groups or kind != group_kind or full:
            groups.append([])
            group_bytes, group_kind = 0, kind
        groups[-1].append(name)
        group_bytes += part_bytes[name]
    return groups
