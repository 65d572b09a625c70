"""CUDA IPC handles for colocated engines: a vLLM worker on the same GPU maps the trainer's bucket memory
directly instead of receiving a copy through host memory (rollout.weight_transport=ipc).

The handle is torch's own CUDA-tensor reduction (what torch.multiprocessing sends between processes),
pickled to bytes so that it travels through vLLM's RPC unchanged. The sender must keep the tensor alive and
unmodified until every receiver has finished with it (VLLMEngine.ipc_buckets waits for the RPC to return).

Imported inside vLLM's worker processes too: torch only.
"""

from __future__ import annotations

import pickle

import torch


def export_handle(flat: torch.Tensor) -> bytes:
    """Bytes that let another process on the same GPU open `flat` (a CUDA tensor) without a copy."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not flat.is_cuda:
        raise ValueError("CUDA IPC needs a CUDA tensor; on CPU use rollout.weight_transport=rpc or broadcast")
    rebuild, args = reduce_tensor(flat.detach())
    return pickle.dumps((rebuild, args))


def open_handle(raw: bytes, device: torch.device | str | None = None) -> torch.Tensor:
    """The sender's tensor, mapped into this process (no copy). `device`: this process's GPU, which must be the
    sender's physical GPU (colocated)."""
    rebuild, args = pickle.loads(raw)
    if device is not None:
        with torch.cuda.device(device):
            return rebuild(*args)
    return rebuild(*args)
