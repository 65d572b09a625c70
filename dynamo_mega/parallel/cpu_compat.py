"""The one place where megatron-core is made to run on machines without a GPU.

megatron-core assumes CUDA in a few spots that the CPU path (gloo, the quick start, CI) reaches. Each
redirection below names the spot it serves and is tested in tests/test_cpu_compat.py. They are applied only
when `torch.cuda.is_available()` is False, once per process, by `apply_if_no_gpu()`; GPU runs never see them.

1. `torch.cuda.current_device()` returns the string "cpu". Megatron passes it as `device=` or to `.to()`:
   rotary embedding's inv_freq (`.to(torch.cuda.current_device())`), parameter allocation in
   tensor_parallel/layers.py and the GPT model's buffers. "cpu" is valid in all of those places.
2. `torch.cuda.synchronize()` is a no-op (dist_checkpointing calls it around saves; nothing to wait for).
3. The model-parallel RNG tracker keeps CPU generator states instead of CUDA ones: Megatron forks it around
   dropout in attention and around weight init; `CudaRNGStatesTracker.add` calls torch.cuda.manual_seed.
4. The pipeline schedules (pipeline_parallel/schedules.py) allocate their token counter with
   `torch.zeros([], ..., device="cuda")`: that module alone sees `torch` through `_TorchWithCpuZeros`,
   which sends `zeros(device="cuda")` to the CPU and passes every other attribute through to torch.
The causal mask Megatron builds when `attention_mask=None` is hard-wired to device="cuda"; rather than patch
torch factories globally, the policy always passes its own mask (parallel/policy.py), so nothing is needed here.
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class CpuRNGStatesTracker:
    """Named CPU RNG states with Megatron's tracker interface (add / fork / get_states / set_states / reset)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _current_device_cpu() -> str:
    return "cpu"


class _TorchWithCpuZeros:
    """`torch` for megatron's schedules module: zeros(device="cuda") -> CPU, everything else unchanged."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def apply_if_no_gpu() -> bool:
    """Apply the redirections when there is no GPU. Returns True if they are (now or already) in effect."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = _current_device_cpu
    torch.cuda.synchronize = lambda device=None: None
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    schedules.torch = _TorchWithCpuZeros()
    _APPLIED = True
    return True


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """CPU counterpart of megatron's model_parallel_cuda_manual_seed: same names, same seed offsets."""
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + 100 + tp_rank)
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
