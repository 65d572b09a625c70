"""The rollout service's plan -> replicas -> samples path and its refits, on 2 gloo ranks with test-double engines
(the same code drives vLLM engines in tests/test_smoke_train.py):

- every request comes back to every rank in request order, with its own prompt's samples, scored against its own
  answer on the replica that made it; a whole group gets the seed one engine would give it (identical samples at
  R = 1 and R = 2), and the replicas' expected loads are balanced;
- a push refits every replica with the same bytes and version, while the non-driver leader's own part of the
  stream runs collectives of its own (as TP gathers do);
- a replica whose engine dies is restarted and refitted alone, and only its share is generated again;
- a replica that fails for another reason fails the call on every rank, naming the replica.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _gloo import run_gloo

from dynamo_mega.parallel.weight_bridge import Bucket
from dynamo_mega.rl.engines.vllm_engine import Completion

PROMPTS = [[3, 1], [4, 1, 5], [9], [2, 6, 5], [3, 5], [8, 9, 7, 9]]
COUNTS = [3, 1, 4, 0, 2, 5]
LENGTHS = [4.0, 2.0, 3.0, 1.0, 5.0, 2.0]
ANSWERS = [str(sum(p)) for p in PROMPTS]


class FakeEngine:
    """Response token ids [sum(prompt), seed, j]; each log-prob is the sum of the weights it holds, so two
    replicas agree exactly when their refits delivered the same bytes. `die_at`: generate calls that raise
    vLLM's EngineDeadError (the engine process died)."""

    def __init__(self, replica: int, die_at=(), fail_at=(), die_at_push=()):
        self.replica, self.die_at, self.fail_at, self.die_at_push = replica, set(die_at), set(fail_at), set(die_at_push)
        self.calls, self.version, self.weight_sum, self.loads, self.restarts, self.pushes = 0, 0, 0.0, 0, 0, 0

    def generate(self, prompts, counts, *, max_new_tokens, temperature, top_p, stop_token_ids, seed):
        from vllm.v1.engine.exceptions import EngineDeadError

        self.calls += 1
        if self.calls in self.die_at:
            raise EngineDeadError("engine core died")
        if self.calls in self.fail_at:
            raise RuntimeError("out of KV cache")
        return [
            [Completion([sum(p), s, j], [self.weight_sum] * 3, True) for j in range(n)]
            for p, n, s in zip(prompts, counts, seed, strict=True)
        ]

    def push(self, buckets, version):
        from vllm.v1.engine.exceptions import EngineDeadError

        self.pushes += 1
        total = 0.0
        for b in buckets:
            total += float(b.flat.double().sum())
            if self.pushes in self.die_at_push:  # dies after its first bucket: the stream must still be drained
                raise EngineDeadError("engine core died during a weight update")
        self.weight_sum, self.version, self.loads = total, version, self.loads + 1

    def restart(self):
        self.version, self.weight_sum, self.restarts = 0, 0.0, self.restarts + 1

    def sleep(self):
        pass

    def close(self):
        pass


def _weights(version: int):
    """Two buckets on the driver; every rank runs an all-reduce per bucket (what TP peers' gathers do)."""
    for i in range(2):
        if dist.is_initialized():
            dist.all_reduce(torch.ones(1))
        if not dist.is_initialized() or dist.get_rank() == 0:
            flat = torch.arange(6, dtype=torch.float32) * (version + 1) + i
            yield Bucket(flat, ["a", "b"], [torch.Size([2]), torch.Size([4])], [0, 2], version)


class _Reward:
    """Right when the response's first token is its prompt's token sum; reports one timed-out pair per call."""

    last_call_timeouts = 1

    def __call__(self, texts, answers, kwargs):
        from dynamo_mega.rl.reward_plugins import Scores

        correct = [t.split()[0] == a for t, a in zip(texts, answers, strict=True)]
        return Scores([1.0 if ok else 0.0 for ok in correct], correct)


def _service(engines: dict, replica_size: int = 1, placement=None):
    from dynamo_mega.rl.rollout_service import RolloutService

    return RolloutService(
        placement=placement,
        replica_size=replica_size,
        start_engine=lambda r: engines.setdefault(r, FakeEngine(r)),
        make_reward=_Reward,
        decode=lambda token_ids: [" ".join(map(str, t)) for t in token_ids],
        weights=_weights,
        max_restarts=1,
    )


def _generate(service, seed=100):
    groups = service.generate(
        PROMPTS, COUNTS, max_new_tokens=3, temperature=1.0, seed=seed, answers=ANSWERS, expected_lengths=LENGTHS
    )
    return [[(c.token_ids, c.logprobs[0], c.reward) for c in g] for g in groups]


def _service_worker(rank: int, world: int, die_at: tuple, fail_at: tuple, die_at_push: tuple = ()):
    engines = {}
    if rank == 1:  # replica 1's engine, as configured
        engines[1] = FakeEngine(1, die_at=die_at, fail_at=fail_at, die_at_push=die_at_push)
    service = _service(engines)
    service.push(1)
    out = {"versions": [e.version for e in engines.values()], "sums": [e.weight_sum for e in engines.values()]}
    try:
        out["groups"] = _generate(service)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    out["metrics"] = service.take_metrics()
    out.update(
        restarts=service.restarts,
        engine=[(e.replica, e.calls, e.loads, e.restarts, e.version) for e in engines.values()],
    )
    return out


def _reference():
    """One process, one replica: the same requests."""
    service = _service({})
    service.push(1)
    return _generate(service), service.take_metrics()


def test_two_replicas_return_every_sample_to_every_rank_aligned_and_balanced():
    ref, ref_metrics = _reference()
    outs = run_gloo(_service_worker, 2, (), ())
    assert outs[0]["groups"] == outs[1]["groups"]
    groups = outs[0]["groups"]
    assert [len(g) for g in groups] == COUNTS
    for i, g in enumerate(groups):
        assert all(tokens[0] == sum(PROMPTS[i]) for tokens, _, _ in g)  # each sample from its own prompt
        assert all(reward == 1.0 for _, _, reward in g)  # scored against its own answer
    # Both replicas were refitted with the same bytes and version: identical log-probs, equal to one replica's.
    assert outs[0]["versions"] == outs[1]["versions"] == [1] and outs[0]["sums"] == outs[1]["sums"]
    assert {lp for g in groups for _, lp, _ in g} == {ref[0][0][1]}
    # A whole group keeps the one-engine seed seed + i, so its samples equal the one-replica run's.
    m = outs[0]["metrics"]
    assert m == outs[1]["metrics"] and m["rollout_replicas"] == 2
    assert m["replica0/reward_timeouts"] == m["replica1/reward_timeouts"] == 1 and m["reward_timeouts"] == 2
    assert m["replica0/samples"] + m["replica1/samples"] == sum(COUNTS) == ref_metrics["replica0/samples"]
    cut = [i for i in range(len(PROMPTS)) if COUNTS[i] and groups[i] != ref[i]]
    assert len(cut) <= 1  # at most R - 1 groups are cut across replicas
    expected = [m["replica0/expected_tokens"], m["replica1/expected_tokens"]]
    assert max(expected) <= sum(expected) / 2 + max(LENGTHS)  # rl/rollout_plan.py's bound
    assert m["rollout_imbalance_expected"] == max(expected) / (sum(expected) / 2)


def test_a_dead_replica_alone_is_restarted_refitted_and_regenerated():
    outs = run_gloo(_service_worker, 2, (1,), ())
    assert outs[0]["groups"] == outs[1]["groups"] and [len(g) for g in outs[0]["groups"]] == COUNTS
    assert {lp for g in outs[0]["groups"] for _, lp, _ in g} == {outs[0]["sums"][0]}  # the restarted one refitted
    assert outs[0]["restarts"] == outs[1]["restarts"] == 1
    (r0,), (r1,) = outs[0]["engine"], outs[1]["engine"]
    assert r0 == (0, 1, 1, 0, 1)  # replica 0: generated once, loaded once, never restarted
    assert r1 == (1, 2, 2, 1, 1)  # replica 1: died, restarted, refitted (2nd load), generated again


def test_a_replica_that_dies_during_a_refit_alone_is_restarted_and_refitted():
    outs = run_gloo(_service_worker, 2, (), (), (1,))
    assert outs[0]["versions"] == outs[1]["versions"] == [1] and outs[0]["sums"] == outs[1]["sums"]
    assert outs[0]["restarts"] == outs[1]["restarts"] == 1
    (r0,), (r1,) = outs[0]["engine"], outs[1]["engine"]
    assert r0 == (0, 1, 1, 0, 1)  # replica 0: one load, no restart
    assert r1 == (1, 1, 1, 1, 1)  # replica 1: died mid-refit (no load), restarted, refitted, generated once


def test_a_replica_failure_fails_every_rank_naming_the_replica():
    outs = run_gloo(_service_worker, 2, (), (1,))
    assert outs[1]["error"] == "RuntimeError: out of KV cache"  # the leader raises its own error
    assert outs[0]["error"].startswith("ReplicaFailed: rollout replica 1 failed: RuntimeError: out of KV cache")


def test_restarts_beyond_the_budget_stop_the_run():
    outs = run_gloo(_service_worker, 2, (1, 2), ())
    for out in outs:
        assert "died after 1 engine restarts" in out["error"] and "max_engine_restarts=1" in out["error"]


def test_replica_size_must_divide_the_world():
    with pytest.raises(ValueError, match="must divide the 1 ranks"):
        _service({}, replica_size=2)


def _ahead_worker(rank: int, world: int, die_at: tuple):
    """Generation in a background thread (recover=False, as train.py's rollouts ahead) while this thread runs
    collectives on the default group, as the policy step does; then the next push and a synchronous generate."""
    from dynamo_mega.ahead import Ahead

    engines = {1: FakeEngine(1, die_at=die_at)} if rank == 1 else {}
    service = _service(engines)
    service.push(1)
    ahead = Ahead(
        lambda: service.generate(PROMPTS, COUNTS, max_new_tokens=3, temperature=1.0, seed=100, answers=ANSWERS, recover=False)
    )
    for _ in range(50):  # the trainer's collectives, concurrently on the other groups
        dist.all_reduce(torch.ones(8))
    out = {}
    try:
        out["ahead"] = [[(c.token_ids, c.logprobs[0]) for c in g] for g in ahead.result()]
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out["error"] = f"{type(exc).__name__}: {exc}"
        service.take_metrics()
    service.push(2)  # restarts and refits a dead replica
    out["after"] = _generate(service, seed=7)
    out.update(restarts=service.restarts, engine=[(e.replica, e.calls, e.restarts, e.version) for e in engines.values()])
    return out


def test_generation_ahead_runs_beside_the_trainers_collectives_and_leaves_a_dead_engine_to_the_next_push():
    fine = run_gloo(_ahead_worker, 2, ())
    assert fine[0]["ahead"] == fine[1]["ahead"] and [len(g) for g in fine[0]["ahead"]] == COUNTS
    died = run_gloo(_ahead_worker, 2, (1,))
    for out in died:
        assert out["error"] == "EnginesDied: rollout replica(s) [1] died while generating ahead of training"
        assert out["restarts"] == 1 and [len(g) for g in out["after"]] == COUNTS
    assert died[1]["engine"] == [(1, 2, 1, 2)]  # died, restarted by push(2) at version 2, generated once
