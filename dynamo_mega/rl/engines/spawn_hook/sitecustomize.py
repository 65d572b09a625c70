"""Run by Python first thing in every process spawned for a dynamo_mega vLLM engine: the engine's environment puts
this folder on PYTHONPATH (rl/engines/vllm_engine.py), so the engine-core and worker processes are on the trainer's
lifeline from their first line, before vLLM's own start-up (whose handshake with a dead trainer would wait forever).
"""

from dynamo_mega.lifeline import arm_from_environment

arm_from_environment()
