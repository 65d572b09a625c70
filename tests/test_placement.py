"""Rollout replica placement (rl/placement.py): colocated and disaggregated layouts, and the rollout service
running on a disaggregated layout (2 gloo ranks, one engine led by rank 0)."""

from __future__ import annotations

import pytest

from dynamo_mega.rl.placement import replica_placement
from tests._gloo import run_gloo


def test_colocated_replicas_are_k_consecutive_ranks_on_their_own_gpus():
    p = replica_placement(world=16, ranks_per_node=8, engine_tp=4, colocated=True)
    assert p.leader_ranks == (0, 4, 8, 12) and p.num_replicas == 4
    assert [p.replica_of(r) for r in (0, 3, 4, 15)] == [0, 0, 1, 3]
    assert p.engine_gpus(12) == [4, 5, 6, 7]  # node 1's second engine: local GPUs 4..7, shared with training


def test_disaggregated_engines_run_on_the_gpus_after_the_trainers():
    # 2 nodes x (8 training GPUs + 4 rollout GPUs), engines of TP 2: two per node, led by local ranks 0 and 1
    p = replica_placement(world=16, ranks_per_node=8, engine_tp=2, colocated=False, dedicated_gpus_per_node=4)
    assert p.leader_ranks == (0, 1, 8, 9)
    assert [p.engine_gpus(r) for r in p.leader_ranks] == [[8, 9], [10, 11], [8, 9], [10, 11]]
    assert [p.replica_of(r) for r in (0, 1, 2, 8, 9, 15)] == [0, 1, -1, 2, 3, -1]
    assert "disaggregated" in p.describe() and "led by ranks [0, 1, 8, 9]" in p.describe()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(world=4, ranks_per_node=4, engine_tp=3, colocated=True), "must divide the 4 ranks"),
        (dict(world=8, ranks_per_node=8, engine_tp=2, colocated=False, dedicated_gpus_per_node=3), "positive multiple"),
        (dict(world=2, ranks_per_node=2, engine_tp=1, colocated=False, dedicated_gpus_per_node=4), "use at most 2"),
    ],
)
def test_impossible_layouts_name_the_setting(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        replica_placement(**kwargs)


def _disaggregated_worker(rank: int, world: int):
    from tests.test_rollout_service import COUNTS, _generate, _service

    engines = {}
    service = _service(engines, placement=replica_placement(world, world, 1, colocated=False, dedicated_gpus_per_node=1))
    service.push(1)
    groups = _generate(service)
    assert [len(g) for g in groups] == COUNTS
    versions = [e.version for e in engines.values()]
    return {"replicas": service.num_replicas, "leader": service.is_leader, "engines": list(engines), "groups": groups,
            "versions": versions}


def test_one_engine_on_its_own_gpu_serves_two_training_ranks():
    """Colocated, 2 ranks make 2 replicas; disaggregated with one rollout GPU per node, one engine (led by rank 0)
    generates every sample and both ranks get them all; rank 1 starts no engine and still takes part in refits."""
    outs = run_gloo(_disaggregated_worker, 2)
    assert [o["replicas"] for o in outs] == [1, 1] and [o["leader"] for o in outs] == [True, False]
    assert outs[0]["engines"] == [0] and outs[1]["engines"] == []
    assert outs[0]["versions"] == [1] and outs[0]["groups"] == outs[1]["groups"]
