"""dynamo_mega: DynaMO RLVR trainer."""
