"""Parallel systems code: process groups, the Megatron policy, vocab-parallel log-probs, weight export."""
