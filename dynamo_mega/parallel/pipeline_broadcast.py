"""The broadcast weight transport at PP > 1: one sender per pipeline stage. Each stage's carrier (TP rank 0 of
DP rank 0 of the stage) broadcasts its own buckets to the engine's workers over its communicator of the engine's
weight group (rl/engines/weight_group.py); only each bucket's layout (names, shapes, offsets: a few KB) travels
to the driver, point to point over the carriers' pipeline group, and from there to the workers by vLLM's RPC.
A later stage's bytes never pass through the driver. (The rpc and ipc transports hand every byte to the driver's
engine, so they still forward the later stages' buckets: weight_bridge.iter_pipeline_buckets.)

One push, over the carriers' pipeline group (the driver is stage 0):
1. the driver broadcasts the weight group's address when the engine needs a new group (the first push, or the
   engine was restarted), else None; on an address every carrier joins the new group as its stage's sender;
2. the driver streams its own buckets, then each later stage's in stage order: the stage's carrier sends a
   bucket's layout; the driver answers "go" (the workers are about to receive it: the carrier broadcasts the
   bytes) or "skip" (the push failed: the carrier only drives its stream, so its TP peers finish their gathers);
   None ends a stage.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dynamo_mega.parallel.weight_bridge import Bucket
from dynamo_mega.rl.engines.weight_group import GroupAddress, broadcast, open_carrier

_GO, _SKIP = "go", "skip"


@dataclass(frozen=True)
class RemoteBucket:
    """A later stage's bucket as the driver sees it: the layout only; its carrier broadcasts the flat
    [numel] bytes of `dtype` to the engine's workers."""

    names: list[str]
    shapes: list[torch.Size]
    offsets: list[int]  # element offset of each tensor in the flat bucket
    version: int
    dtype: torch.dtype
    numel: int
    stage: int  # the pipeline stage whose carrier sends the bytes (> 0)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class DriverStream:
    """The driver's side of one push: `announce` first, then iterate (the driver's own Buckets, then every later
    stage's RemoteBuckets); after a failure, `drain` completes the protocol without moving a byte. One-shot."""

    def __init__(self, own: Iterator[Bucket], *, pp_group, pp_size: int):
        self._own, self._group, self._pp_size = own, pp_group, pp_size
        self._announced = False
        self._skip = False
        self._items = self._iterate()

    def announce(self, address: GroupAddress | None) -> None:
        """Tell every carrier the new weight group's address (they join it now), or None: keep the current one."""
        assert not self._announced, "announce once per push"
        dist.broadcast_object_list([address], src=dist.get_global_rank(self._group, 0), group=self._group)
        self._announced = True

    def __iter__(self):
        return self._items

    def drain(self) -> None:
        """After a failed push: the rest of the protocol, every later-stage bucket answered "skip"."""
        if not self._announced:
            self.announce(None)
        self._skip = True
        for _ in self._items:
            pass

    def _iterate(self) -> Iterator[Bucket | RemoteBucket]:
        assert self._announced, "announce() before the buckets"
        for bucket in self._own:  # drained to the end even when skipping: the TP peers gather with it
            if not self._skip:
                yield bucket
        for stage in range(1, self._pp_size):
            src = dist.get_global_rank(self._group, stage)
            while True:
                box = [None]
                dist.recv_object_list(box, src=src, group=self._group)
                if box[0] is None:
                    break
                skip = self._skip  # read once: the verdict sent is the one acted on
                dist.send_object_list([_SKIP if skip else _GO], dst=src, group=self._group)
                if not skip:
                    yield RemoteBucket(*box[0], stage=stage)


class StageCarrier:
    """A later stage's carrier: its communicator of the engine's weight group, kept between pushes."""

    def __init__(self, *, pp_group, stage: int):
        assert stage > 0, "the driver (stage 0) sends through its engine"
        self.stage = stage
        self._group = pp_group
        self._driver = dist.get_global_rank(pp_group, 0)
        self._communicator = None  # (communicator, store) once a group was announced

    def stream(self, stage_buckets: Iterator[Bucket]) -> Iterator[Bucket]:
        """One push of this stage's buckets (collective with the driver and the engine's workers); yields each
        bucket after its bytes were broadcast (or skipped)."""
        box = [None]
        dist.broadcast_object_list(box, src=self._driver, group=self._group)
        if box[0] is not None:
            self._communicator = None  # free the old group first
            try:
                self._communicator = open_carrier(box[0], self.stage)
            except Exception as exc:  # noqa: BLE001 - the driver fails to open it too and stops the run with its error
                print(f"dynamo-mega: stage {self.stage} could not join the weight group ({exc!r})", file=sys.stderr)
        for b in stage_buckets:
            layout = (b.names, b.shapes, b.offsets, b.version, b.dtype, b.numel)
            dist.send_object_list([layout], dst=self._driver, group=self._group)
            verdict = [None]
            dist.recv_object_list(verdict, src=self._driver, group=self._group)
            if verdict[0] == _GO:
                self._send(b)
            yield b
        dist.send_object_list([None], dst=self._driver, group=self._group)  # end of this stage

    def _send(self, b: Bucket) -> None:
        if self._communicator is None:
            raise RuntimeError(f"stage {self.stage}: the driver asked for a weight broadcast, but no weight group is open")
        try:
            broadcast(self._communicator[0], b.flat.detach().contiguous(), src=0)
        except Exception as exc:  # noqa: BLE001 - the engine died mid-push: the driver restarts it, a new group follows
            print(f"dynamo-mega: stage {self.stage} weight broadcast failed ({exc!r}); waiting for a new group", file=sys.stderr)
            self._communicator = None
