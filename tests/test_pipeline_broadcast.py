"""The broadcast weight transport at PP=2 (parallel/pipeline_broadcast.py): one sender per pipeline stage.

4 gloo processes: a PP=2 x DP=2 trainer whose DP-rank-0 pipeline (ranks 0 and 2) carries the weights, and two
stand-in engine workers (ranks 1 and 3) running the real worker extension's join/receive code
(rl/engines/vllm_worker.py), reached from the driver's real VLLMEngine methods through a stand-in for vLLM's
`collective_rpc` (messages over the default gloo world instead of vLLM's RPC). Checked: the workers' tensors
equal, bit for bit, the single-process iter_buckets stream of the same model; every stage-1 tensor came from
stage 1's sender, which broadcast exactly its stage's bytes while the driver broadcast only stage 0's; the
group is reused by the next push and rebuilt on every carrier after an engine restart; a failed push drained
with "skip" moves no byte.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from _gloo import run_gloo

from dynamo_mega.config import ModelConfig
from dynamo_mega.rl.engines.vllm_worker import PolicyWeightsExtension

CFG = dict(
    vocab_size=32,
    hidden_size=128,
    num_layers=4,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    max_position_embeddings=32,
    tie_word_embeddings=True,
)
BUCKET_BYTES = 48 << 10  # several buckets per stage, a boundary inside a layer
WORKERS = {1: 0, 3: 1}  # default-world rank -> engine worker index
PUSHES = ("new group", "same group", "after restart", "drained")


class _Worker(PolicyWeightsExtension):
    """The real worker extension's weight-group methods on a stand-in model runner that records what loads."""

    def __init__(self, rank: int):
        self.rank, self.loaded, self.stages = rank, [], {}
        model = SimpleNamespace(load_weights=lambda views: self.loaded[-1].update((n, t.clone()) for n, t in views))
        self.model_runner = SimpleNamespace(get_model=lambda: model)

    def begin_policy_update(self) -> None:  # vLLM's layer-wise reload set-up: nothing to set up here
        self.loaded.append({})

    def finish_policy_update(self, version: int) -> int:
        self.policy_version = version
        return version

    def receive_policy_bucket(self, names, shapes, offsets, dtype, numel, stage):
        self.stages.update((n, stage) for n in names)
        return super().receive_policy_bucket(names, shapes, offsets, dtype, numel, stage)


class _RPC:
    """vLLM's `collective_rpc`, played over the default gloo world: (method, args) to every worker, replies back."""

    def collective_rpc(self, method: str, args: tuple = ()):
        for rank in WORKERS:
            dist.send_object_list([(method, args)], dst=rank)
        replies = []
        for rank in WORKERS:
            box = [None]
            dist.recv_object_list(box, src=rank)
            replies.append(box[0])
        return replies


def _serve_rpc(worker) -> None:
    while True:
        box = [None]
        dist.recv_object_list(box, src=0)
        if box[0] is None:
            return
        method, args = box[0]
        dist.send_object_list([getattr(worker, method)(*args)], dst=0)


def _counting_broadcast(sent: list[int]):
    from dynamo_mega.rl.engines import weight_group

    real = weight_group.broadcast

    def counted(group, flat, src=0):
        sent.append(flat.numel() * flat.element_size())
        real(group, flat, src)

    return counted


def _member(rank: int, world: int) -> dict:
    from dynamo_mega.parallel import pipeline_broadcast
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.weight_bridge import iter_buckets
    from dynamo_mega.rl.engines import weight_group
    from dynamo_mega.rl.engines.vllm_engine import VLLMEngine
    from dynamo_mega.weight_push import feed_engine

    groups = init_parallel(1, 2, seed=0)
    if rank in WORKERS:
        worker = _Worker(WORKERS[rank])
        _serve_rpc(worker)
        return {"loaded": worker.loaded, "stages": worker.stages}
    assert groups.dp_rank == 0 and groups.pp_rank == rank // 2  # ranks 0 and 2 carry the weights
    model, arch = build_policy(ModelConfig(**CFG), groups, seed=3)
    sent: list[int] = []
    weight_group.broadcast = pipeline_broadcast.broadcast = _counting_broadcast(sent)
    carrier = None if rank == 0 else pipeline_broadcast.StageCarrier(pp_group=groups.pp_group, stage=1)
    engine = None
    if rank == 0:
        engine = object.__new__(VLLMEngine)  # the real methods, vLLM's RPC played by _RPC
        engine.weight_transport, engine.sleep_level, engine.asleep, engine.version = "broadcast", 0, False, 0
        engine._llm = _RPC()
    bytes_per_push = []
    for push in PUSHES:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # every push carries new weights (the reference adds the same)
        sent.clear()
        own = iter_buckets(model, arch, tp_size=1, bucket_bytes=BUCKET_BYTES, version=len(bytes_per_push) + 1)
        if rank == 0:
            stream = pipeline_broadcast.DriverStream(own, pp_group=groups.pp_group, pp_size=2)
            if push == "drained":  # the push failed before the engine took any bucket
                stream.drain()
            else:
                if push == "after restart":
                    engine._weight_group = None  # what VLLMEngine.restart leaves: its new workers need a new group
                feed_engine(engine, stream, len(bytes_per_push) + 1, pp_size=2)  # announces the group, then pushes
        else:
            for _ in carrier.stream(own):
                pass
        bytes_per_push.append((sum(sent), sum(b.nbytes for b in iter_buckets(model, arch, tp_size=1, bucket_bytes=BUCKET_BYTES))))
    if rank == 0:
        assert engine._llm.collective_rpc("get_policy_version") == [3, 3]
        for r in WORKERS:
            dist.send_object_list([None], dst=r)
    return {"bytes": bytes_per_push}


def _reference() -> list[dict[str, torch.Tensor]]:
    """The single-process stream of the same model after each push's update."""
    from dynamo_mega.parallel.groups import destroy_parallel, init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.weight_bridge import iter_buckets

    groups = init_parallel(1, seed=0)
    try:
        model, arch = build_policy(ModelConfig(**CFG), groups, seed=3)
        out = []
        for _ in PUSHES:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            stream = iter_buckets(model, arch, tp_size=1, bucket_bytes=BUCKET_BYTES)
            out.append({n: t.clone() for b in stream for n, t in b.tensors()})
        return out
    finally:
        destroy_parallel()


def test_each_stage_broadcasts_its_own_buckets_to_the_engine_workers():
    ranks = run_gloo(_member, 4)
    reference = _reference()
    for rank in WORKERS:
        loaded, stages = ranks[rank]["loaded"], ranks[rank]["stages"]
        assert len(loaded) == 3  # the drained push never reached the workers
        for got, want in zip(loaded, reference):
            assert got.keys() == want.keys()
            for name in want:
                assert torch.equal(got[name], want[name]), name
        for name, stage in stages.items():  # layers 0-1 and the embedding live on stage 0; layers 2-3 and the norm on 1
            on_stage_1 = name == "model.norm.weight" or name.startswith(("model.layers.2.", "model.layers.3."))
            assert stage == int(on_stage_1), name
    for carrier in (0, 2):
        pushes = ranks[carrier]["bytes"]
        for sent, stage_bytes in pushes[:3]:
            assert sent == stage_bytes > 0, (carrier, pushes)  # each sender broadcast its own stage, nothing more
        assert pushes[3][0] == 0  # drained: no byte moved
