"""Run by Python first thing in every process a dynamo_mega trainer spawns (vLLM's engine core and workers,
multiprocessing's spawned helpers such as megatron's checkpoint-writer Manager): `lifeline.arm_spawned_children`
puts this folder on the trainer's PYTHONPATH, so each child is on the trainer's lifeline from its first line,
before its own start-up (vLLM's handshake with a dead trainer would otherwise wait forever).
"""

from dynamo_mega.lifeline import arm_from_environment

arm_from_environment()
