"""A policy as a Hugging Face model folder (config.json + model.safetensors [+ tokenizer]): what every rollout engine
starts and restarts from (RUN_DIR/hf_init), and a warmed-up start that other runs share (warmup.save_hf_dir).
Written to a sibling folder, made durable and renamed into place, so a folder is complete or absent, also after a
crash of the machine (the converter's output folders do the same: convert/output_dir.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dynamo_mega.durable import fsync_path, fsync_tree


def write_hf_folder(directory: Path, hf_state: dict[str, torch.Tensor], config: dict, tokenizer=None) -> None:
    from safetensors.torch import save_file

    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text(json.dumps(config, indent=1))
    save_file(hf_state, str(partial / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(partial))
    fsync_tree(partial)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    fsync_path(directory.parent)
