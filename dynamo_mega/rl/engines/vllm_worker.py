"""Methods added to every vLLM worker (vLLM's `worker_extension_cls`), called with `collective_rpc`.

Runs inside vLLM's worker processes: keep imports light and never import the trainer's Megatron code here.
"""

from __future__ import annotations


class PolicyWeightsExtension:
    """Weight loading for RL: vLLM's in-place reload, plus the tied-embedding fix-up it lacks.

    vLLM's layer-wise reload re-materialises each layer's parameters; a tied `lm_head` (Qwen2.5-0.5B/1.5B,
    Qwen3-0.6B, the tiny CPU model) has no tensor of its own in the checkpoint, so the reload puts its OLD
    tensor back and the tie silently breaks: sampling then uses stale output weights. Re-tying after every
    reload restores the invariant lm_head.weight is embed_tokens.weight (tests/test_vllm_engine.py checks it).
    """

    def load_policy_weights(self, weights_path: str, version: int) -> int:
        """Reload every weight from a safetensors directory (the whole model at once)."""
        self.model_runner.reload_weights(weights_path=weights_path)
        return self._finish(version)

    # Streaming path (the weight bridge): begin -> one call per bucket -> finish. vLLM's layer-wise reload
    # re-processes a layer (e.g. the CPU kernel prepack) as soon as all of its tensors have arrived, so no full
    # copy of the model is staged in the worker.
    def begin_policy_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())

    def load_policy_bucket(self, names: list[str], shapes: list[list[int]], offsets: list[int], dtype: str, raw: bytes) -> int:
        """Load HF-named tensors packed back to back in `raw` (one flat buffer of `dtype`, e.g. "bfloat16");
        returns how many were loaded."""
        import torch

        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype))
        return self._load_flat(names, shapes, offsets, flat)

    # Broadcast path (disaggregated engines, rl/engines/weight_group.py): the trainer announces each bucket by
    # RPC (names and layout, a few KB) and its bytes arrive over the weight group (NCCL on GPUs, gloo on CPU),
    # broadcast by the carrier of the pipeline stage that holds them.
    def join_weight_group(self, host: str, port: int, stages: int, workers: int, backend: str, timeout_s: float) -> int:
        """Join the trainer's weight group (one communicator per trainer stage); returns this worker's rank in
        it, stages + this worker's rank."""
        from dynamo_mega.rl.engines.weight_group import GroupAddress, open_receiver

        address = GroupAddress(host, port, stages, workers, backend, timeout_s)
        self._weight_group = None  # a new group replaces the old one: free it first
        self._weight_group = open_receiver(address, int(self.rank))
        return stages + int(self.rank)

    def receive_policy_bucket(
        self, names: list[str], shapes: list[list[int]], offsets: list[int], dtype: str, numel: int, stage: int
    ) -> int:
        """Receive one flat bucket broadcast by the carrier of trainer stage `stage` and load its tensors."""
        import torch

        from dynamo_mega.rl.engines.weight_group import broadcast

        communicators, _ = self._weight_group
        flat = torch.empty(numel, dtype=getattr(torch, dtype), device=getattr(self, "device", "cpu"))
        broadcast(communicators[stage], flat, src=0)  # rank 0 of a stage's communicator is its carrier
        return self._load_flat(names, shapes, offsets, flat)

    # CUDA IPC path (colocated GPU engines, rl/engines/cuda_ipc.py): the bucket stays in the trainer's GPU memory
    # and is mapped here by handle; the trainer keeps it alive until this call returns.
    def load_policy_bucket_ipc(self, names: list[str], shapes: list[list[int]], offsets: list[int], handle: bytes) -> int:
        from dynamo_mega.rl.engines.cuda_ipc import open_handle

        return self._load_flat(names, shapes, offsets, open_handle(handle, getattr(self, "device", None)))

    def _load_flat(self, names: list[str], shapes: list[list[int]], offsets: list[int], flat) -> int:
        """Load HF-named tensors laid out back to back in `flat` (views, no copies); returns how many."""
        views = ((n, flat[o : o + _numel(s)].view(s)) for n, s, o in zip(names, shapes, offsets))
        self.model_runner.get_model().load_weights(views)
        return len(names)

    def finish_policy_update(self, version: int) -> int:
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner
        finalize_layerwise_reload(runner.get_model(), runner.model_config)
        return self._finish(version)

    def _finish(self, version: int) -> int:
        runner = self.model_runner
        model = runner.get_model()
        config = runner.model_config.hf_config
        if getattr(config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
            head = model.lm_head
            head.weight = model.model.embed_tokens.weight
            # On CPU the head multiplies with a kernel prepacked from its weight at load time
            # (`cpu_linear`): prepack again from the re-tied weight.
            head.quant_method.process_weights_after_loading(head)
        self.policy_version = version
        return version

    def watch_trainer(self, trainer_pid: int, poll_s: float = 1.0) -> int:
        """Exit this worker's process once the trainer process is gone. A SIGKILLed trainer runs no cleanup, and
        vLLM's engine processes would otherwise live on as orphans holding cores (and GPU memory); with this
        worker gone, vLLM's engine core stops too. Returns this process id."""
        import os

        from dynamo_mega.lifeline import exit_with

        exit_with(trainer_pid, poll_s)
        return os.getpid()

    def get_policy_version(self) -> int:
        return getattr(self, "policy_version", 0)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
