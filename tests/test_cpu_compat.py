"""One test per CUDA redirection in dynamo_mega/parallel/cpu_compat.py (applied only without a GPU)."""

from __future__ import annotations

import pytest
import torch

from dynamo_mega.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the redirections apply only without a GPU")


@pytest.fixture(scope="module", autouse=True)
def applied():
    assert cpu_compat.apply_if_no_gpu() is True
    assert cpu_compat.apply_if_no_gpu() is True  # idempotent


def test_current_device_is_cpu_and_rotary_embedding_runs():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    assert torch.cuda.current_device() == "cpu"
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=False)
    emb = rope(8)  # inv_freq is moved with .to(torch.cuda.current_device()) inside
    assert emb.device.type == "cpu" and emb.shape[0] == 8


def test_synchronize_is_a_noop():
    assert torch.cuda.synchronize() is None


def test_rng_tracker_forks_cpu_states():
    from megatron.core import tensor_parallel

    cpu_compat.seed_model_parallel_rng(123, tp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    torch.manual_seed(5)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the default stream is untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the forked stream advances
    cpu_compat.seed_model_parallel_rng(123, tp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)  # same seed, same stream
    with pytest.raises(Exception, match="already exists"):
        tracker.add("model-parallel-rng", 999)


def test_rng_tracker_differs_per_tp_rank():
    from megatron.core import tensor_parallel

    draws = []
    for rank in (0, 1):
        cpu_compat.seed_model_parallel_rng(7, tp_rank=rank)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            draws.append(torch.rand(3))
    assert not torch.equal(draws[0], draws[1])


def test_not_applied_when_a_gpu_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.apply_if_no_gpu() is False


def test_pipeline_schedules_allocate_their_token_counter_on_cpu():
    from megatron.core.pipeline_parallel import schedules

    counter = schedules.torch.zeros([], dtype=torch.int, device="cuda")  # what the 1F1B schedule allocates
    assert counter.device.type == "cpu" and counter.dtype == torch.int
    assert schedules.torch.zeros(2, device="cpu").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor and schedules.torch.autograd is torch.autograd  # the rest is torch
    assert torch.zeros(1).device.type == "cpu"  # torch itself is not patched
