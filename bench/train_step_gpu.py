"""Benchmark (GPU): the RL policy step on one GPU for Qwen2.5-0.5B and -1.5B shapes (random weights, bf16),
side by side with a plain Hugging Face transformers training step of the same model on the same batch.

ours:     the trainer's `policy_step` (Megatron GPTModel, local layer spec without Transformer Engine, fused
          vocab-parallel log-prob + entropy, DynaMO modulation, clipped loss, backward) and Megatron's
          distributed mixed-precision AdamW (bf16 params, fp32 master weights and grads).
baseline: transformers Qwen2ForCausalLM (sdpa attention), full-vocabulary log_softmax + gather, the same
          token-mean policy-gradient loss, fused torch AdamW directly on the bf16 parameters.
Reported: tokens/s, step-time ratio ours / baseline, peak GPU memory, and model-FLOPs utilisation against the
H100's 989 TFLOP/s dense bf16 peak, counting 6 x (parameters used in matmuls) per token plus causal attention
6 x layers x seq x hidden per token (fwd + bwd; the policy step's forward doubles as the old-log-prob pass).

    python bench/train_step_gpu.py          # writes bench/results/train_step_gpu.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16

SHAPES = {
    "qwen2.5-0.5B": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_attention_heads=14, num_query_groups=2,
                         ffn_hidden_size=4864, tie_word_embeddings=True),
    "qwen2.5-1.5B": dict(vocab_size=151936, hidden_size=1536, num_layers=28, num_attention_heads=12, num_query_groups=2,
                         ffn_hidden_size=8960, tie_word_embeddings=True),
}


def cuda_time(fn, reps: int) -> float:
    """Median seconds of fn() over reps, CUDA-synchronised, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def model_flops_per_token(shape: dict, seq: int) -> float:
    h, L, f, v = shape["hidden_size"], shape["num_layers"], shape["ffn_hidden_size"], shape["vocab_size"]
    head = h // shape["num_attention_heads"]
    kv = shape["num_query_groups"] * head
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f  # qkv, output projection, gate/up/down
    matmul_params = L * per_layer + h * v  # + the output layer (tied with the embedding, used once as a matmul)
    return 6 * matmul_params + 6 * L * seq * h  # causal attention scores + values, fwd + bwd


def batch(shape: dict, n: int, s: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (n, s), generator=g)
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[:, s // 4 :] = True  # a quarter prompt, the rest response
    return ids.to(device), mask.to(device), torch.randn(n, generator=g).to(device)


def run_ours(shape: dict, n: int, s: int, reps: int) -> dict:
    from dynamo_mega.config import AlgoConfig, ModelConfig, ModulationConfig, OptimConfig
    from dynamo_mega.optim import build_optimizer
    from dynamo_mega.parallel.groups import destroy_parallel, init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.train_step import policy_step, split_micro_batches

    groups = init_parallel(1, seed=0)
    cfg = ModelConfig(**shape, max_position_embeddings=s, params_dtype="bfloat16")
    model, _ = build_policy(cfg, groups, seed=0)
    optim = OptimConfig(lr=1e-6, weight_decay=0.01)
    opt, sched = build_optimizer(model, optim.lr, optim, total_steps=100)
    ids, mask, adv = batch(shape, n, s, groups.device)
    micro = split_micro_batches(ids, ids.roll(-1, 1), mask, adv, torch.zeros(n, s, device=groups.device), n)

    def step():
        policy_step(model, opt, sched, micro, groups, algo=AlgoConfig(), temperature=1.0, grad_clip=1.0,
                    modulation=ModulationConfig())

    torch.cuda.reset_peak_memory_stats()
    seconds = cuda_time(step, reps)
    destroy_parallel()
    return {"step_s": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def run_hf(shape: dict, n: int, s: int, reps: int) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h = shape["hidden_size"]
    config = Qwen2Config(
        vocab_size=shape["vocab_size"], hidden_size=h, num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_query_groups"],
        intermediate_size=shape["ffn_hidden_size"], tie_word_embeddings=shape["tie_word_embeddings"],
        max_position_embeddings=s, attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config).to("cuda", torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, fused=True)
    ids, mask, adv = batch(shape, n, s, "cuda")
    targets = ids.roll(-1, 1)

    def step():
        logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        loss = -(logp * adv[:, None] * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    seconds = cuda_time(step, reps)
    return {"step_s": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/train_step_gpu.py needs a CUDA GPU (the CPU step benchmark is bench/train_step.py)")
    n, s = args.seqs, args.seq_len
    rows = []
    for name in args.models:
        shape = SHAPES[name]
        ours = run_ours(shape, n, s, args.reps)
        torch.cuda.empty_cache()  # the model and optimizer died with run_ours' frame
        hf = run_hf(shape, n, s, args.reps)
        torch.cuda.empty_cache()
        tokens = n * s
        flops = model_flops_per_token(shape, s) * tokens
        row = {
            "model": name, "tokens": tokens,
            "ours_step_s": ours["step_s"], "hf_step_s": hf["step_s"], "ours_vs_hf_time": ours["step_s"] / hf["step_s"],
            "ours_tokens_per_s": tokens / ours["step_s"], "hf_tokens_per_s": tokens / hf["step_s"],
            "ours_mfu": flops / ours["step_s"] / PEAK_BF16_FLOPS, "hf_mfu": flops / hf["step_s"] / PEAK_BF16_FLOPS,
            "ours_peak_gib": ours["peak_gib"], "hf_peak_gib": hf["peak_gib"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "reps": args.reps, "rows": rows}
    (out_dir / "train_step_gpu.json").write_text(json.dumps(meta, indent=1))
    lines = [
        f"GPU: {meta['gpu']}, torch {meta['torch']}, {n} x {s} tokens per step, median of {args.reps} steps.",
        "",
        "| model | ours step (s) | HF step (s) | ours / HF time | ours tokens/s | ours MFU | HF MFU | ours peak GiB "
        "| HF peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ours_step_s']:.3f} | {r['hf_step_s']:.3f} | {r['ours_vs_hf_time']:.2f}x | "
            f"{r['ours_tokens_per_s']:.0f} | {r['ours_mfu']:.1%} | {r['hf_mfu']:.1%} | {r['ours_peak_gib']:.1f} | "
            f"{r['hf_peak_gib']:.1f} |"
        )
    (out_dir / "train_step_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
