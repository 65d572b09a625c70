"""Where the rollout replicas run: which rank leads each engine, and on which of its node's GPUs.

- colocated (rollout.colocated=true, the default): the world is split into world / k replicas of k consecutive
  ranks; replica r's engine (vLLM TP = k) runs on those ranks' own GPUs, sharing them with training (sleep/wake).
- disaggregated (rollout.colocated=false): each node has `ranks_per_node` training GPUs (one torchrun rank each)
  plus `dedicated_gpus_per_node` GPUs that only generate, split into dedicated / k engines of TP = k. The engine of
  a node's j-th replica runs on GPUs ranks_per_node + j*k .. ranks_per_node + (j+1)*k - 1 and is led (started,
  fed its share, scored, refitted) by the node's local rank j. Training never waits for the engines' memory, and
  generation can run while training does (rollout.max_staleness=1, docs/async.md).

Without GPUs the same layout decides how many engine processes run and which rank leads each.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    leader_ranks: tuple[int, ...]  # replica r's leader rank: it starts the engine, feeds it and scores its samples
    engine_tp: int  # k: GPUs (ranks, when colocated) per engine
    ranks_per_node: int
    colocated: bool

    @property
    def num_replicas(self) -> int:
        return len(self.leader_ranks)

    def replica_of(self, rank: int) -> int:
        """The replica `rank` leads or (colocated) belongs to; -1 for a training-only rank of a disaggregated run."""
        if self.colocated:
            return rank // self.engine_tp
        return self.leader_ranks.index(rank) if rank in self.leader_ranks else -1

    def engine_gpus(self, rank: int) -> list[int]:
        """The local GPU indices of the engine `rank` leads (CUDA_VISIBLE_DEVICES of its processes)."""
        assert rank in self.leader_ranks, f"internal error: rank {rank} leads no rollout replica"
        local = rank % self.ranks_per_node
        first = local if self.colocated else self.ranks_per_node + local * self.engine_tp
        return list(range(first, first + self.engine_tp))

    def describe(self) -> str:
        k, r = self.engine_tp, self.num_replicas
        where = "on the training GPUs (colocated)" if self.colocated else "on GPUs of their own (disaggregated)"
        return f"{r} rollout replica{'' if r == 1 else 's'} of vLLM TP={k} {where}, led by ranks {list(self.leader_ranks)}"


def replica_placement(
    world: int, ranks_per_node: int, engine_tp: int, colocated: bool, dedicated_gpus_per_node: int = 0
) -> Placement:
    """The layout of the rollout replicas; ValueError names the setting that makes it impossible."""
    k = engine_tp
    if colocated:
        if world % k:
            raise ValueError(
                f"rollout.vllm_tensor_parallel={k} must divide the {world} ranks (each rollout replica is k ranks); "
                f"use one of {[d for d in range(1, world + 1) if world % d == 0]}"
            )
        if ranks_per_node % k:
            raise ValueError(
                f"rollout.vllm_tensor_parallel={k} must divide the {ranks_per_node} ranks per node: an engine's ranks "
                "share a node"
            )
        return Placement(tuple(range(0, world, k)), k, ranks_per_node, True)
    if dedicated_gpus_per_node < k or dedicated_gpus_per_node % k:
        raise ValueError(
            f"rollout.dedicated_gpus_per_node={dedicated_gpus_per_node} must be a positive multiple of "
            f"rollout.vllm_tensor_parallel={k} (each engine takes k of a node's rollout GPUs)"
        )
    per_node = dedicated_gpus_per_node // k
    if per_node > ranks_per_node or world % ranks_per_node:
        raise ValueError(
            f"rollout.dedicated_gpus_per_node={dedicated_gpus_per_node} makes {per_node} engines per node, each led by "
            f"one of the node's {ranks_per_node} training ranks: use at most {ranks_per_node * k}"
        )
    leaders = tuple(node + j for node in range(0, world, ranks_per_node) for j in range(per_node))
    return Placement(leaders, k, ranks_per_node, False)
