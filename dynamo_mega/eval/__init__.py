"""Benchmark evaluation: problem files -> chat prompts -> vLLM samples -> math-verify -> pass@1 / pass@k."""
