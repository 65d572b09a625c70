"""Pushing the trainer's weights into the rollout engine: the weight bridge's bucket stream at any TP/PP/DP,
handed to the engine by its transport (rollout.weight_transport), and the replacement of an engine that died.
Used by the RL loop (train.py) after every optimizer step and whenever a new engine needs the current weights."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch

from dynamo_mega.checkpoint import checkpoint_root
from dynamo_mega.guards import EngineRestarted, on_driver
from dynamo_mega.parallel.pipeline_broadcast import DriverStream, StageCarrier
from dynamo_mega.parallel.weight_bridge import iter_buckets, iter_pipeline_buckets

if TYPE_CHECKING:
    from dynamo_mega.train import Trainer


def push_weights(t: Trainer) -> None:
    """The trainer's current weights into the engine, tagged t.version: HF-named buckets from the weight bridge
    (one TP all-gather per bucket, collective over TP) streamed into the driver's engine, nothing on disk, by RPC,
    CUDA IPC or broadcast over the engine's weight group (rollout.weight_transport). At PP > 1 the later stages'
    buckets are sent point to point to the driver (rpc, ipc), or each stage's carrier broadcasts its own to the
    engine's workers (broadcast: parallel/pipeline_broadcast.py). Collective. If the engine dies during the push
    it is replaced and every rank takes part in a full push into the new one."""
    while True:
        buckets = _bucket_stream(t)
        if not t.groups.is_driver:
            for _ in buckets:  # TP peers take part in each bucket's all-gather; later stages send theirs
                pass
        try:
            on_driver(t.groups, functools.partial(_send_buckets, t, buckets))
            return
        except EngineRestarted:
            continue


def _bucket_stream(t: Trainer):
    g = t.groups
    buckets = iter_buckets(
        t.model,
        t.arch,
        tp_size=g.tp_size,
        tp_group=g.tp_group if g.tp_size > 1 else None,
        dp_rank=g.dp_rank,
        bucket_bytes=t.cfg.rollout.weight_bucket_mb << 20,
        version=t.version,
        dtype=getattr(torch, t.cfg.rollout.vllm_dtype),  # what the engine holds: one dtype, full-size buckets
        buffers=t.bucket_buffers,
    )
    if g.pp_size == 1:
        return buckets
    carries = g.tp_rank == 0 and g.dp_rank == 0
    if carries and t.cfg.rollout.weight_transport == "broadcast":  # one sender per stage
        if g.is_driver:
            return DriverStream(buckets, pp_group=g.pp_group, pp_size=g.pp_size)
        if t.stage_carrier is None:
            t.stage_carrier = StageCarrier(pp_group=g.pp_group, stage=g.pp_rank)
        return t.stage_carrier.stream(buckets)
    return iter_pipeline_buckets(buckets, pp_group=g.pp_group, pp_rank=g.pp_rank, pp_size=g.pp_size, carries=carries)


def _send_buckets(t: Trainer, buckets) -> None:
    """Driver: the bucket stream into the engine. On any failure the rest of the stream is drained first, so
    the TP/PP peers finish its collectives; a dead engine is then replaced (EngineRestarted)."""
    from dynamo_mega.rl.engines.vllm_engine import is_engine_dead

    try:
        if isinstance(buckets, DriverStream):
            announce_weight_group(t, buckets)
        t.engine.push(buckets, t.version)
    except Exception as exc:
        if isinstance(buckets, DriverStream):
            buckets.drain()
        else:
            for _ in buckets:
                pass
        if not is_engine_dead(exc):
            raise
        restart_engine(t, exc)
        raise EngineRestarted() from exc


def announce_weight_group(t: Trainer, stream: DriverStream) -> None:
    """Broadcast transport at PP > 1 (driver): when the engine has no weight group (first push, or restarted),
    a new one with every stage's carrier as a sender; its address goes to the carriers first, since they must
    join while the engine's workers do. Host: MASTER_ADDR, where torchrun's rank 0 (this process) runs, so the
    other nodes' carriers reach it."""
    address = None
    if not t.engine.has_weight_group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        address = t.engine.weight_group_address(backend, host, stages=t.groups.pp_size)
    stream.announce(address)
    if address is not None:
        t.engine.open_weight_group(address.backend, address=address)


def restart_engine(t: Trainer, exc: Exception) -> None:
    """Replace the dead engine (driver), or stop the run once rollout.max_engine_restarts is spent."""
    if t.engine.restarts >= t.cfg.rollout.max_engine_restarts:
        raise RuntimeError(
            f"the rollout engine died and was already restarted {t.engine.restarts} times "
            f"(rollout.max_engine_restarts); rerun to resume from the newest checkpoint in {checkpoint_root(t.cfg)}"
        ) from exc
    print(f"dynamo-mega: rollout engine died ({exc!r}); restarting it with policy version {t.version}", flush=True)
    t.engine.restart()
