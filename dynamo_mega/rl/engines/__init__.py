"""Rollout engines behind one protocol (see dynamo_mega/rl/rollout.py)."""
