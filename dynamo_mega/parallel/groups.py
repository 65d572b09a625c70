"""Process groups: init torch.distributed + Megatron parallel_state once, and hand out one ParallelGroups.

Only parallel/ and models/ touch megatron's parallel_state; everything else receives this object.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dynamo_mega.parallel import cpu_compat


@dataclass(frozen=True)
class ParallelGroups:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    device: torch.device
    pp_rank: int = 0
    pp_size: int = 1
    pp_group: dist.ProcessGroup | None = None  # None when pp_size == 1
    pp_last_rank: int = 0  # global rank of the last stage in this rank's pipeline
    # First and last stage of this pipeline (tied embeddings: the two copies' grads are summed over it);
    # None when pp_size == 1 or on a middle stage.
    embedding_group: dist.ProcessGroup | None = None

    @property
    def is_driver(self) -> bool:
        """Global rank 0: owns the rollout engine, the reward pool and the run directory."""
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def init_parallel(tp: int, pp: int = 1, seed: int = 0, timeout_s: int = 1800) -> ParallelGroups:
    """Join (or create, for a single process) the default group and build Megatron's TP/PP/DP groups.

    Works under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) and as a plain single process (world size 1 on
    an in-memory store). Backend: nccl with GPUs, gloo otherwise.
    """
    try:
        from megatron.core import parallel_state
    except ImportError as exc:
        raise ImportError(
            "megatron-core is not installed: run scripts/setup.sh, or "
            "`pip install --no-deps --ignore-requires-python megatron-core==0.19.2`"
        ) from exc

    on_gpu = torch.cuda.is_available()
    cpu_compat.apply_if_no_gpu()
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend, timeout = ("nccl" if on_gpu else "gloo"), datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ:  # torchrun / Slurm: env rendezvous
            dist.init_process_group(backend, timeout=timeout)
        else:
            # One process: an in-memory store, no port to race for and no RANK/MASTER_PORT written into the
            # environment, where child processes (vLLM, a test's next CLI run) would inherit them.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tensor_parallel x pipeline_parallel = {tp * pp}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if on_gpu:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu_compat.seed_model_parallel_rng(seed, tp_rank)
    return ParallelGroups(
        rank=dist.get_rank(),
        world_size=world,
        tp_rank=tp_rank,
        tp_size=tp,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=pp,
        pp_group=parallel_state.get_pipeline_model_parallel_group() if pp > 1 else None,
        pp_last_rank=parallel_state.get_pipeline_model_parallel_last_rank(),
        embedding_group=parallel_state.get_embedding_group() if pp > 1 and parallel_state.is_rank_in_embedding_group() else None,
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
