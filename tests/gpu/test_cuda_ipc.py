"""GPU only (skipped without CUDA): a bucket handed to another process as a CUDA IPC handle
(rl/engines/cuda_ipc.py) is read there without a copy, with the sender's values."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA GPU")


def _receiver(raw: bytes, out: str) -> None:
    from dynamo_mega.rl.engines.cuda_ipc import open_handle

    flat = open_handle(raw, "cuda:0")
    torch.save({"sum": float(flat.float().sum()), "first": flat[:4].cpu(), "device": str(flat.device)}, out)


def test_ipc_handle_opens_the_senders_gpu_memory(tmp_path):
    from dynamo_mega.rl.engines.cuda_ipc import export_handle

    flat = torch.arange(1 << 20, dtype=torch.bfloat16, device="cuda")
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_receiver, args=(export_handle(flat), str(tmp_path / "r.pt")))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    got = torch.load(tmp_path / "r.pt")
    assert got["device"] == "cuda:0"
    assert torch.equal(got["first"], flat[:4].cpu()) and got["sum"] == pytest.approx(float(flat.float().sum()))


def test_cpu_tensor_is_a_clear_error():
    from dynamo_mega.rl.engines.cuda_ipc import export_handle

    with pytest.raises(ValueError, match="CUDA IPC needs a CUDA tensor"):
        export_handle(torch.zeros(4))
