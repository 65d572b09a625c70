"""The rollout side as one component: R engine replicas, their rewards, restarts and weight refits.

Replica r has a leader rank that runs one vLLM engine of tensor parallel size k = rollout.vllm_tensor_parallel and
scores what it generates: colocated, replica r is ranks r*k .. r*k+k-1 (R = world / k) and the engine runs on
their GPUs; disaggregated, the engine runs on GPUs of its own (rl/placement.py). Every
call below is collective over all ranks, which hold identical arguments (the allocation is computed on every
rank from identical statistics):

- `generate(prompts, counts, ...)`: the requests are split over the replicas by rl/rollout_plan.py (balanced by
  expected generated tokens), each leader generates (and, given answers, scores) its share, and every rank gets
  every sample back in request order. A replica whose engine died is restarted and refitted, and its share
  generated again; the other replicas keep what they made.
- `push(version)`: the policy's weights into every replica's engine. The driver (rank 0, replica 0's leader)
  takes the weight bridge's full stream; with R > 1 it broadcasts each bucket over the leaders' group, and every
  other leader loads it into its engine from a receiving thread while its main thread drives its own part of
  the stream (its TP gathers, its PP sends to the driver), so neither waits on the other. Afterwards every
  replica reports the version it holds; they must all equal `version` before anything is generated.
- `sleep()` / `close()`.

Why spawned engines and not vLLM's in-process external launcher: with the external launcher the engine lives
in the trainer process and its data-parallel replicas step in lockstep, so one replica's death is its trainer
rank's death and no replica can generate while another restarts; a spawned engine per replica dies alone.

Restarts: `rollout.max_engine_restarts` counts every replica's restarts in the run (identical on every rank).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dynamo_mega.parallel.weight_bridge import Bucket
from dynamo_mega.rl.engines.vllm_engine import Completion
from dynamo_mega.rl.placement import Placement, replica_placement
from dynamo_mega.rl.reward_plugins import Scores
from dynamo_mega.rl.rollout_plan import plan_requests
from dynamo_mega.weight_push import drain, feed_engine

# (response texts, answers, user-function kwargs aligned with the texts or None) -> Scores (rewards, successes);
# rl/reward_plugins.ConfiguredReward, may have close() and last_call_timeouts
Reward = Callable[[list[str], list[str], dict[str, list] | None], Scores]


class ReplicaFailed(RuntimeError):
    """A replica failed with an error other than its engine dying; raised on every rank."""


class EnginesDied(RuntimeError):
    """Raised on every rank by `generate(recover=False)` when replica engines died: generating ahead of training,
    the service cannot refit a restarted engine (the trainer is changing the weights), so the caller restarts them
    with its next `push` and generates again."""

    def __init__(self, replicas: list[int]):
        super().__init__(f"rollout replica(s) {replicas} died while generating ahead of training")
        self.replicas = replicas


@dataclass
class _Report:
    """One replica's outcome of one collective operation, as every rank sees it."""

    replica: int
    status: str  # ok | dead | error
    error: str = ""
    groups: list[list[Completion]] | None = None  # one per piece of the replica's plan
    generate_s: float = 0.0
    score_s: float = 0.0
    reward_timeouts: int = 0  # (response, answer) pairs the reward timed out on (scored wrong, never cached)
    version: int = -1  # policy version the engine holds afterwards
    refit_s: float = 0.0


class RolloutService:
    """Owns the replicas. Built on every rank; engine and scorer exist on leaders only."""

    def __init__(
        self,
        *,
        replica_size: int,
        start_engine: Callable[[int], object],
        make_reward: Callable[[], Reward] | None,
        decode: Callable[[list[list[int]]], list[str]],
        weights: Callable[[int], Iterator[Bucket]] | None,
        max_restarts: int,
        pp_size: int = 1,
        placement: Placement | None = None,
    ):
        """replica_size = k ranks per replica; start_engine(replica) -> engine (leaders only: VLLMEngine or a
        test double with generate / push / version / restart / sleep / close); make_reward() -> Reward (leaders;
        None: no scoring); decode: response token ids -> texts for the reward; weights(version) -> this rank's
        part of the weight bridge's stream (None: the engines keep the weights they started with, e.g.
        `dynamo-mega eval`); pp_size: the trainer's pipeline stages (the broadcast transport announces its
        weight group to every stage's carrier); placement: which rank leads each replica (rl/placement.py; None:
        colocated replicas of replica_size consecutive ranks)."""
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if placement is None:
            placement = replica_placement(self.world_size, self.world_size, replica_size, colocated=True)
        self.placement, self.k, self.num_replicas = placement, placement.engine_tp, placement.num_replicas
        self.leader_ranks = list(placement.leader_ranks)
        self.replica, self.is_leader = placement.replica_of(self.rank), self.rank in self.leader_ranks
        self._leaders_group = dist.new_group(self.leader_ranks) if self.num_replicas > 1 else None  # every rank calls
        # The reports go over a group of the service's own: with rollout.max_staleness=1 `generate` runs in a
        # background thread while the trainer's collectives run on the other groups (gloo: any backend's world).
        self._group = dist.new_group(backend="gloo") if self.world_size > 1 else None
        self._weights, self._pp_size, self.max_restarts, self._decode = weights, pp_size, max_restarts, decode
        self.version, self.restarts = 0, 0
        self._died_ahead: dict[int, str] = {}  # engines that died in a generate(recover=False): the next push restarts them
        self._metrics: dict[str, float] = {}
        self._local_error: Exception | None = None  # this leader's own error, re-raised as itself
        self.engine = self._reward = None
        started = None
        if self.is_leader:  # a leader that cannot start its engine must not leave the others waiting
            try:
                self.engine = start_engine(self.replica)
                self._reward = make_reward() if make_reward is not None else None
                started = _Report(self.replica, "ok")
            except Exception as exc:  # noqa: BLE001 - told to every rank by _exchange
                self._local_error = exc
                started = _Report(self.replica, "error", error=f"{type(exc).__name__}: {exc}")
        try:
            self._exchange(started)
        except BaseException:
            self.close()
            raise

    # ---- generation -------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        counts: list[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
        answers: list[str] | None = None,
        reward_kwargs: list[dict] | None = None,
        expected_lengths: list[float] | None = None,
        recover: bool = True,
    ) -> list[list[Completion]]:
        """counts[i] samples of prompts[i] (token ids), one list per prompt in order, on every rank. answers:
        each sample is scored against its own prompt's answer on the replica that made it (Completion.reward and
        .correct). reward_kwargs[i]: prompt i's keyword values for user reward functions (Prompt.reward_kwargs);
        None: math-verify only, whatever algo.reward says (benchmarks).
        expected_lengths: tokens per response of each prompt, for balancing (None: all equal). Request i is
        seeded seed + i wherever it runs; a group cut across replicas seeds its later pieces apart. recover=False:
        a replica's dead engine raises EnginesDied on every rank instead of being restarted and refitted here."""
        lengths = expected_lengths if expected_lengths is not None else [1.0] * len(prompts)
        plans = plan_requests([str(i) for i in range(len(prompts))], list(counts), lengths, self.num_replicas)
        pieces_R = [[(int(pid), n) for pid, n in plan] for plan in plans]
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop_token_ids=stop_token_ids)
        todo = set(range(self.num_replicas))
        done: dict[int, _Report] = {}
        while todo:
            busy = self.is_leader and self.replica in todo
            share = self._generate_share(pieces_R, prompts, seed, answers, reward_kwargs, sampling) if busy else None
            reports = self._exchange(share)
            dead = {rep.replica: rep.error for rep in reports if rep.status == "dead"}
            if dead and not recover:
                self._died_ahead = dead
                raise EnginesDied(sorted(dead))
            for rep in reports:
                if rep.status == "ok" and rep.replica in todo:
                    done[rep.replica] = rep
                    todo.discard(rep.replica)
            self._recover(reports)  # dead replicas restarted and refitted; their shares go round again
        self._record_generation(done, pieces_R, lengths)
        groups: list[list[Completion]] = [[] for _ in prompts]
        for r in range(self.num_replicas):  # a cut group's pieces join in replica order
            for (i, _), piece in zip(pieces_R[r], done[r].groups, strict=True):
                groups[i].extend(piece)
        for i, (group, n) in enumerate(zip(groups, counts, strict=True)):
            if len(group) != n:
                raise AssertionError(f"internal error: {len(group)} samples of request {i} came back, {n} asked")
        return groups

    def _generate_share(self, pieces_R, prompts, seed, answers, reward_kwargs, sampling) -> _Report:
        """The leader's share: generate, then score; a failure is reported (and told to every rank), not raised."""
        pieces = pieces_R[self.replica]
        rep = _Report(self.replica, "ok", groups=[])
        if not pieces:
            return rep
        try:
            t0 = time.perf_counter()
            rep.groups = self.engine.generate(
                [prompts[i] for i, _ in pieces],
                [n for _, n in pieces],
                **sampling,
                seed=None if seed is None else [_piece_seed(seed, i, pieces_R, self.replica) for i, _ in pieces],
            )
            rep.generate_s = time.perf_counter() - t0
            if answers is not None:
                t1 = time.perf_counter()
                samples = [(c, i) for (i, _), piece in zip(pieces, rep.groups, strict=True) for c in piece]
                kwargs = None  # benchmarks: math-verify's verdict only
                if reward_kwargs is not None:  # per-sample columns only when a user function reads them
                    uses = getattr(self._reward, "uses_columns", True)
                    kwargs = _columns([reward_kwargs[i] for _, i in samples]) if uses else {}
                texts = self._decode([c.token_ids for c, _ in samples])
                scores: Scores = self._reward(texts, [answers[i] for _, i in samples], kwargs)
                for (c, _), reward, correct in zip(samples, scores.rewards, scores.correct, strict=True):
                    c.reward, c.correct = reward, correct
                rep.score_s = time.perf_counter() - t1
                rep.reward_timeouts = int(getattr(self._reward, "last_call_timeouts", 0))
        except Exception as exc:  # noqa: BLE001 - told to every rank by _exchange
            return self._failure(exc)
        return rep

    def _record_generation(self, done: dict[int, _Report], pieces_R, lengths) -> None:
        """Per replica: requests, samples, generated tokens, generation and scoring time, expected load."""
        expected = [sum(n * lengths[i] for i, n in pieces) for pieces in pieces_R]
        m = self._metrics
        for r, rep in done.items():
            tokens = sum(len(c.token_ids) for piece in rep.groups for c in piece)
            for key, value in (
                ("requests", len(pieces_R[r])),
                ("samples", sum(n for _, n in pieces_R[r])),
                ("tokens", tokens),
                ("generate_s", rep.generate_s),
                ("score_s", rep.score_s),
                ("reward_timeouts", rep.reward_timeouts),
                ("expected_tokens", expected[r]),
            ):
                m[f"replica{r}/{key}"] = m.get(f"replica{r}/{key}", 0.0) + float(value)

    def take_metrics(self) -> dict[str, float]:
        """Everything recorded since the last call (a step may generate in several rounds), with the imbalance
        of the replicas (slowest / mean) by generation time, by generated tokens and by the plan's expected
        tokens. The same on every rank."""
        m, self._metrics = self._metrics, {}
        if not any(key.endswith("/generate_s") for key in m):  # refits only
            return m
        for key, name in (("generate_s", "time"), ("tokens", "tokens"), ("expected_tokens", "expected")):
            values = np.array([m.get(f"replica{r}/{key}", 0.0) for r in range(self.num_replicas)])
            m[f"rollout_imbalance_{name}"] = float(values.max() / values.mean()) if values.mean() > 0 else 1.0
        m["rollout_replicas"] = float(self.num_replicas)
        m["reward_timeouts"] = sum(m.get(f"replica{r}/reward_timeouts", 0.0) for r in range(self.num_replicas))
        return m

    # ---- weights ----------------------------------------------------------------------------------------------

    def push(self, version: int) -> None:
        """The policy's weights (version `version`) into every replica; returns once every replica holds them."""
        self.version = version
        if self._died_ahead:
            self._restart(self._died_ahead)
            self._died_ahead = {}
        self._push(set(range(self.num_replicas)))

    def _push(self, targets: set[int]) -> None:
        """Refit the replicas in `targets` (restarting any that die on the way) until all of them report
        self.version. Collective, with identical `targets` on every rank."""
        while targets:
            if self._weights is None:  # engines keep their initial weights (evaluation of a checkpoint)
                reports = self._exchange(_Report(self.replica, "ok", version=self.version) if self.is_leader else None)
            else:
                reports = self._exchange(self._refit(targets))
            refitted = self._recover(reports)  # dead ones: restarted and refitted by a nested push
            ok = {rep.replica for rep in reports if rep.status == "ok" and rep.replica in targets}
            for rep in reports:
                if rep.replica in ok and rep.version != self.version:
                    raise AssertionError(
                        f"internal error: replica {rep.replica} holds policy version {rep.version} after a push of {self.version}"
                    )
                if rep.replica in ok:
                    self._metrics[f"replica{rep.replica}/refit_s"] = rep.refit_s
            targets = targets - ok - refitted

    def _refit(self, targets: set[int]) -> _Report | None:
        """This rank's part of one refit pass; leaders return their replica's report."""
        buckets = self._weights(self.version)
        if self.num_replicas == 1:
            if not self.is_leader:
                drain(buckets)
                return None
            return self._load(lambda: feed_engine(self.engine, buckets, self.version, self._pp_size), 0 in targets, buckets)
        if self.rank == 0:
            fanned = _fan_out(buckets, self._leaders_group)
            return self._load(lambda: self.engine.push(fanned, self.version), 0 in targets, fanned)
        # Another leader receives the driver's buckets in a thread while this thread drives its own stream.
        box: list[_Report | None] = [None]
        receiver = None
        if self.is_leader:
            received = _receive(self._leaders_group, self.version)
            load = lambda: self.engine.push(received, self.version)  # noqa: E731

            def run():
                box[0] = self._load(load, self.replica in targets, received)

            receiver = threading.Thread(target=run, name="dynamo-mega-refit", daemon=True)
            receiver.start()
        drain(buckets)
        if receiver is not None:
            receiver.join()
        return box[0]

    def _load(self, load: Callable[[], None], targeted: bool, stream) -> _Report:
        if not targeted:  # another replica is being refitted: take part in the stream only
            drain(stream)
            return _Report(self.replica, "ok", version=self.engine.version)
        t0 = time.perf_counter()
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - told to every rank by _exchange
            drain(stream)
            return self._failure(exc)
        return _Report(self.replica, "ok", version=self.engine.version, refit_s=time.perf_counter() - t0)

    # ---- failures ---------------------------------------------------------------------------------------------

    def _failure(self, exc: Exception) -> _Report:
        from dynamo_mega.rl.engines.vllm_engine import is_engine_dead

        if is_engine_dead(exc):
            return _Report(self.replica, "dead", error=repr(exc))
        self._local_error = exc
        return _Report(self.replica, "error", error=f"{type(exc).__name__}: {exc}")

    def _exchange(self, mine: _Report | None) -> list[_Report]:
        """Every leader's report on every rank (non-leaders send None). A replica's error is raised everywhere."""
        if self.world_size == 1:
            reports = [mine]
        else:
            gathered: list[_Report | None] = [None] * self.world_size
            dist.all_gather_object(gathered, mine, group=self._group)
            reports = [rep for rep in gathered if rep is not None]
        for rep in reports:
            if rep.status == "error":
                local = self._local_error
                if rep.replica == self.replica and self.is_leader and local is not None:
                    self._local_error = None
                    raise local
                raise ReplicaFailed(f"rollout replica {rep.replica} failed: {rep.error}")
        return reports

    def _recover(self, reports: list[_Report]) -> set[int]:
        """Restart the replicas whose engine died (within the run's restart budget) and refit them; returns them."""
        dead = {rep.replica: rep.error for rep in reports if rep.status == "dead"}
        if not dead:
            return set()
        self._restart(dead)
        self._push(set(dead))
        return set(dead)

    def _restart(self, dead: dict[int, str]) -> None:
        """Restart the engines of the replicas in `dead` (replica -> why; identical on every rank), within the
        run's budget."""
        if self.restarts + len(dead) > self.max_restarts:
            raise RuntimeError(
                f"rollout replica(s) {sorted(dead)} died after {self.restarts} engine restarts in this run "
                f"(rollout.max_engine_restarts={self.max_restarts}); rerun to resume from the newest checkpoint"
            )
        self.restarts += len(dead)
        if self.is_leader and self.replica in dead:
            why = dead[self.replica]
            print(
                f"dynamo-mega: rollout replica {self.replica}'s engine died ({why}); "
                f"restarting it with policy version {self.version}",
                flush=True,
            )
            self.engine.restart()

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Colocated on GPU: give the engines' memory to the trainer until the next refit wakes them."""
        if self.engine is not None:
            self.engine.sleep()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        close = getattr(self._reward, "close", None)
        if callable(close):
            close()


def start_vllm_replicas(
    cfg, model_dir, *, max_len: int, tokenizer, weights=None, pp_size: int = 1, seed: int | None = None
) -> RolloutService:
    """The trainer's and `dynamo-mega eval`'s replicas from a Config: world / k VLLMEngines of TP = k
    (k = rollout.vllm_tensor_parallel) started from the HF folder `model_dir`, each leader scoring with algo.reward
    (math-verify and user functions, rl/reward_plugins.py).
    weights(version): the refit stream (None: the engines keep model_dir's weights); max_len: the engines'
    context; seed: the engines' sampling seed (default rollout.seed)."""
    from dynamo_mega.rl.engines.vllm_engine import VLLMEngine
    from dynamo_mega.rl.reward import MathVerifyReward
    from dynamo_mega.rl.reward_plugins import ConfiguredReward

    r, k, a = cfg.rollout, cfg.rollout.vllm_tensor_parallel, cfg.algo
    placement = placement_from_config(cfg)

    def start_engine(replica: int) -> VLLMEngine:
        return VLLMEngine(
            model_dir,
            dtype=r.vllm_dtype,
            seed=r.seed if seed is None else seed,
            max_model_len=max_len,
            kv_cache_gib=r.vllm_kv_cache_gib,
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            max_num_seqs=r.vllm_max_num_seqs,
            sleep_level=r.vllm_sleep_level,
            weight_transport=r.weight_transport,
            tensor_parallel=k,
            devices=placement.engine_gpus(dist.get_rank() if dist.is_initialized() else 0) if torch.cuda.is_available() else None,
        )

    return RolloutService(
        replica_size=k,
        start_engine=start_engine,
        make_reward=lambda: ConfiguredReward(
            [(term.fn, term.weight) for term in a.reward], MathVerifyReward(a.reward_workers, a.reward_timeout_s, a.wrong_reward)
        ),
        decode=lambda token_ids: tokenizer.batch_decode(token_ids, skip_special_tokens=True),
        weights=weights,
        max_restarts=r.max_engine_restarts,
        pp_size=pp_size,
        placement=placement,
    )


def placement_from_config(cfg) -> Placement:
    """The run's replica layout: this job's world and ranks per node (torchrun's), rollout.colocated and
    rollout.dedicated_gpus_per_node."""
    import os

    r = cfg.rollout
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return replica_placement(world, per_node, r.vllm_tensor_parallel, r.colocated, r.dedicated_gpus_per_node)


def _columns(rows: list[dict]) -> dict[str, list]:
    """Per-sample dicts -> one list per key, aligned with the samples (a key missing from a row: None there)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [row.get(key) for row in rows] for key in keys}


def _piece_seed(seed: int, i: int, pieces_R: list[list[tuple[int, int]]], replica: int) -> int:
    """Request i's seed on `replica`: seed + i, as one engine seeds it, for a whole group or a cut group's first
    piece; a later piece is offset by the samples of request i on lower replicas, so no two pieces repeat."""
    before = sum(n for plan in pieces_R[:replica] for j, n in plan if j == i)
    return seed + i + 1_000_003 * before


def _layout(b: Bucket) -> tuple:
    return list(b.names), [list(s) for s in b.shapes], list(b.offsets), str(b.dtype).removeprefix("torch."), b.numel


def _fan_out(buckets: Iterator[Bucket], group) -> Iterator[Bucket]:
    """The driver's stream, each bucket broadcast to the other leaders before it is yielded; then an end mark.
    Drained to the end even when the driver's own engine fails, so the other replicas still get every bucket."""
    for b in buckets:
        dist.broadcast_object_list([_layout(b)], src=0, group=group)
        dist.broadcast(b.flat.detach().contiguous(), src=0, group=group)
        yield b
    dist.broadcast_object_list([None], src=0, group=group)


def _receive(group, version: int) -> Iterator[Bucket]:
    """A leader's copy of the driver's fan-out, one bucket at a time (one bucket buffer alive)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is None:
            return
        names, shapes, offsets, dtype, numel = box[0]
        flat = torch.empty(numel, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(flat, src=0, group=group)
        yield Bucket(flat, names, [torch.Size(s) for s in shapes], offsets, version)
