"""GPU only (skipped with fewer than 4 GPUs): the weight group's broadcast over NCCL, one GPU per rank."""

from __future__ import annotations

import pytest
import torch
from test_weight_group import broadcast_to_engine_workers

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 4, reason="NCCL broadcast test needs 4 GPUs (one per rank)")


def test_nccl_broadcast_reaches_every_engine_worker(tmp_path):
    broadcast_to_engine_workers(tmp_path, "nccl")
