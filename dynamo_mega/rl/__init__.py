"""RL math for DynaMO: rollout allocation, prompt statistics, advantages, losses (pure functions)."""
