"""Dry runs and bad input for `dynamo-mega convert`.

Dry runs use the published config.json values of Qwen2.5-0.5B/7B/32B/72B and Qwen3-32B (tests/fixtures/
qwen_configs; the architecture fields transcribed from the Hugging Face Hub, not downloaded: nothing here can
reach it) with header-only safetensors files: tensor names and shapes come from transformers' model built
on the meta device, and the files hold no tensor data, so a dry run that read any data would fail.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _gloo import run_gloo

FIXTURES = Path(__file__).parent / "fixtures" / "qwen_configs"
TINY = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def _hf_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes transformers saves for `config` (meta device; no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight")
    return shapes


def _write_headers(folder: Path, config: dict, shapes: dict, dtype=torch.bfloat16, per_shard: int = 200) -> None:
    """An HF folder whose safetensors files hold headers only (sharded, with an index)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    names, weight_map = sorted(shapes), {}
    for i in range(0, len(names), per_shard):
        file, header, offset = f"model-{i // per_shard:05d}.safetensors", {}, 0
        for name in names[i : i + per_shard]:
            nbytes = dtype.itemsize * int(torch.tensor(shapes[name]).prod().item() if shapes[name] else 1)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        (folder / file).write_bytes(struct.pack("<Q", len(raw)) + raw)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _dry_runs(rank: int, world: int, root: str, cases: list) -> dict:
    from dynamo_mega.convert.run import hf_to_mcore

    out = {}
    for name, tp, pp in cases:
        try:
            out[(name, tp, pp)] = hf_to_mcore(Path(root) / name, Path(root) / "unused", tp=tp, pp=pp, dry_run=True)
        except ValueError as exc:
            out[(name, tp, pp)] = str(exc)
    return out


def _sum_over_ranks(shapes: dict, tp: int, pp: int, padded_rows: int, tied: bool) -> int:
    """Independent count of parameters summed over all TP x PP ranks: replicated norms count TP times, vocab
    tensors are padded, a tied embedding is also the last stage's output layer when PP > 1."""
    total = 0
    for name, shape in shapes.items():
        numel = int(torch.tensor(shape).prod().item())
        if "norm" in name:
            total += numel * tp
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            total += padded_rows * shape[1]
        else:
            total += numel
    if tied and pp > 1:
        total += padded_rows * shapes["model.embed_tokens.weight"][1]
    return total


def _one_spawn(rank: int, world: int, root: str, cases: list) -> dict:
    """Everything that needs megatron, in one process (its imports dominate): dry runs, interrupted run."""
    return {
        "dry_runs": _dry_runs(rank, world, root + "/published", cases),
        "interrupted": _interrupted_and_checked(rank, world, root + "/tiny"),
    }


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("checks")
    cases, shapes = [], {}
    for path in sorted(FIXTURES.glob("*.json")):
        config = json.loads(path.read_text())
        shapes[path.stem] = _hf_shapes(config)
        _write_headers(root / "published" / path.stem, config, shapes[path.stem])
        cases += [(path.stem, 8, 2), (path.stem, 8, 4)]
    cases += [("Qwen2.5-0.5B", 2, 4), ("Qwen2.5-7B", 4, 4)]  # the largest TP their 14 / 28 heads allow
    Qwen2ForCausalLM(Qwen2Config(**TINY)).save_pretrained(root / "tiny" / "hf")
    return shapes, run_gloo(_one_spawn, 1, str(root), cases)[0]


def test_dry_run_published_configs_at_tp8(spawned):
    shapes, out = spawned
    results = out["dry_runs"]
    for (name, tp, pp), summary in results.items():
        config = json.loads((FIXTURES / f"{name}.json").read_text())
        if config["num_attention_heads"] % tp:  # Qwen2.5-0.5B (14 heads) and 7B (28 heads) cannot use TP=8
            assert isinstance(summary, str) and f"num_attention_heads={config['num_attention_heads']}" in summary
            continue
        assert isinstance(summary, dict), (name, tp, pp, summary)
        assert summary["padded_vocab"] == config["vocab_size"]  # Qwen vocabs need no padding at TP=8
        assert len(summary["rank_bytes"]) == tp * pp
        want = _sum_over_ranks(shapes[name], tp, pp, summary["padded_vocab"], config["tie_word_embeddings"])
        assert sum(summary["rank_bytes"].values()) == want * 2, name  # bf16
        assert summary["source_bytes"] == sum(int(torch.tensor(s).prod()) for s in shapes[name].values()) * 2


def _plan_error(folder: Path, tp: int = 1, pp: int = 1) -> str:
    from dynamo_mega.convert.plan import plan_hf_to_mcore

    with pytest.raises(ValueError) as info:
        plan_hf_to_mcore(folder, tp, pp)
    return str(info.value)


def test_bad_tensors_are_named(tmp_path):
    shapes = _hf_shapes(TINY)
    missing = {k: v for k, v in shapes.items() if k != "model.layers.1.mlp.up_proj.weight"}
    _write_headers(tmp_path / "missing", TINY, missing)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in _plan_error(tmp_path / "missing")
    _write_headers(tmp_path / "extra", TINY, {**shapes, "model.layers.0.mlp.extra.weight": (4,)})
    assert "unexpected tensor model.layers.0.mlp.extra.weight" in _plan_error(tmp_path / "extra")
    _write_headers(tmp_path / "shape", TINY, {**shapes, "model.layers.0.self_attn.k_proj.weight": (16, 64)})
    want = "model.layers.0.self_attn.k_proj.weight has shape (16, 64), config.json implies (32, 64)"
    assert want in _plan_error(tmp_path / "shape")


def test_bad_settings_are_named(tmp_path):
    _write_headers(tmp_path / "ok", TINY, _hf_shapes(TINY))
    assert "num_attention_heads=4 is not divisible by TP=3" in _plan_error(tmp_path / "ok", tp=3)
    assert "num_key_value_heads (query groups)=2 is not divisible by TP=4" in _plan_error(tmp_path / "ok", tp=4)
    assert "num_hidden_layers=2 is not divisible by PP=3" in _plan_error(tmp_path / "ok", pp=3)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    assert "model_type 'llama' is not supported" in _plan_error(tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(TINY))
    assert "no model.safetensors or model.safetensors.index.json" in _plan_error(tmp_path / "empty")


def test_write_groups_keep_kinds_apart_and_fit_the_budget():
    from dynamo_mega.convert.write_groups import group_parts

    parts = [("embedding", None), *((f"layer{i}", i) for i in range(5)), ("final_norm", None), ("output", None)]
    sizes = {"embedding": 50, **{f"layer{i}": 10 for i in range(5)}, "final_norm": 1, "output": 50}
    layers = [[f"layer{i}" for i in group] for group in ((0, 1), (2, 3), (4,))]
    assert group_parts(parts, sizes, 25) == [["embedding"], *layers, ["final_norm"], ["output"]]
    assert group_parts(parts, sizes, 1000) == [["embedding"], [f"layer{i}" for i in range(5)], ["final_norm", "output"]]
    with pytest.raises(ValueError, match="must be positive"):
        group_parts(parts, sizes, 0)


def test_fc1_is_written_from_the_hf_blocks_the_mapping_would_concatenate(tmp_path):
    """hf-to-mcore hands megatron linear_fc1 as the HF (gate, up) tensors instead of the mapping's copy; the
    values must be the mapping's, and a factory's view of them must be read without a copy where it can."""
    from dynamo_mega.convert.mcore_files import RowBlocks, _real_view
    from dynamo_mega.convert.run import _mcore_tensors
    from dynamo_mega.models import qwen_mapping as qm
    from dynamo_mega.models.qwen import arch_from_hf_config

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    arch = arch_from_hf_config(tmp_path / "config.json")
    gen = torch.Generator().manual_seed(0)
    hf = {s: torch.randn(shape, generator=gen) for s, shape in qm.hf_layer_shapes(arch).items()}
    written = _mcore_tensors({qm.hf_layer_name(1, s): t for s, t in hf.items()}, 1, arch, arch.vocab_size)
    expected = qm.hf_layer_to_mcore(hf, arch)
    assert written.keys() == expected.keys()
    for name, tensor in written.items():
        assert torch.equal(tensor.materialize() if isinstance(tensor, RowBlocks) else tensor, expected[name]), name
    a, b = torch.randn(3, 4, generator=gen), torch.randn(5, 4, generator=gen)
    blocks, full, meta = RowBlocks((a, b)), torch.cat([a, b]), torch.empty(8, 4, device="meta")
    for view in (meta[0:3], meta[3:8], meta[2:6], meta[:, 1:3], meta.t()):
        want = full.as_strided(view.shape, view.stride(), view.storage_offset())
        assert torch.equal(_real_view(view, blocks, []), want)
    assert _real_view(meta[3:8], blocks, []).data_ptr() == b.data_ptr()  # a whole block: no copy


def _convert(capsys, *args: str) -> tuple[int, str]:
    """`dynamo-mega convert ARGS` in this process (the CLI's own entry function): exit code, stderr."""
    from dynamo_mega.cli import main

    code = main(["convert", *args, "--no-progress"])
    return code, capsys.readouterr().err


def test_cli_exits_nonzero_on_bad_input_and_leaves_no_output(tmp_path, capsys):
    _write_headers(tmp_path / "hf", TINY, _hf_shapes(TINY))  # headers only: the data is "truncated"
    code, err = _convert(capsys, "hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "out"), "--tp", "3")
    assert code == 2 and "num_attention_heads=4 is not divisible by TP=3" in err
    code, err = _convert(capsys, "hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert code == 2 and "is truncated" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "part00000__0_0.distcp").write_bytes(b"x")
    code, err = _convert(capsys, "hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "half"))
    assert code == 2 and "has no manifest.sha256.json: it may be half-written" in err
    code, err = _convert(capsys, "mcore-to-hf", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert code == 2 and "is not a megatron distributed checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "hf"]  # no output, no partial folders
    # the installed entry point turns the code into the process exit status
    cmd = [sys.executable, "-m", "dynamo_mega.cli", "convert", "hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "out")]
    proc = subprocess.run([*cmd, "--pp", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "num_hidden_layers=2 is not divisible by PP=4" in proc.stderr


def _interrupted_and_checked(rank: int, world: int, root: str) -> dict:
    """A conversion that fails after writing started leaves nothing; a good one verifies against its manifest;
    mcore-to-hf with a config of a different model names the first mismatching tensor."""
    from dynamo_mega.convert import mcore_files, run
    from dynamo_mega.convert.output_dir import verify_manifest

    root = Path(root)
    real_save, calls = mcore_files.save_group, []

    def failing_save(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full (simulated)")
        return real_save(*args)

    mcore_files.save_group = failing_save
    try:
        run.hf_to_mcore(root / "hf", root / "mcore", progress=False)
    except RuntimeError:
        pass
    mcore_files.save_group = real_save
    left_after_failure = sorted(p.name for p in root.iterdir())
    import logging

    records = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = records.append  # megatron's loggers propagate to the root
    logging.getLogger().addHandler(catcher)
    try:
        run.hf_to_mcore(root / "hf", root / "mcore", progress=False)
    finally:
        logging.getLogger().removeHandler(catcher)
    layout = sorted(p.name for p in (root / "mcore").iterdir())
    overwrite_warnings = [r.getMessage() for r in records if "Overwriting" in r.getMessage()]
    intact = verify_manifest(root / "mcore")
    victim = next((root / "mcore").glob("part00001*.distcp"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the file
    victim.write_bytes(bytes(data))
    corrupted = verify_manifest(root / "mcore")
    (root / "other").mkdir()
    (root / "other" / "config.json").write_text(json.dumps({**TINY, "num_hidden_layers": 3}))
    try:
        run.mcore_to_hf(root / "mcore", root / "back", hf_config=root / "other" / "config.json", progress=False)
        mismatch = "no error"
    except ValueError as exc:
        mismatch = str(exc)
    return {
        "left": left_after_failure, "intact": intact, "corrupted": corrupted, "mismatch": mismatch, "layout": layout,
        "overwrite_warnings": overwrite_warnings,
    }  # fmt: skip


def test_failed_conversion_leaves_nothing_and_manifest_catches_corruption(spawned):
    out = spawned[1]["interrupted"]
    assert out["left"] == ["hf"]
    assert out["intact"] == []
    assert len(out["corrupted"]) == 1 and out["corrupted"][0].startswith("part00001")
    assert "decoder.layers." in out["mismatch"] and "has shape (2," in out["mismatch"]
    # every write group saved into the output folder itself: its own data files, nothing else left behind, and
    # no "overwriting a corrupted checkpoint" warning from megatron for the groups after the first
    data = [name for name in out["layout"] if name.endswith(".distcp")]
    assert all(re.fullmatch(r"part\d{5}__0_\d+\.distcp", name) for name in data), data
    assert len({name[:9] for name in data}) >= 3  # embedding, layers, final norm + output layer: several saves
    assert sorted(set(out["layout"]) - set(data)) == [".metadata", "convert.json", "hf", "manifest.sha256.json", "metadata.json"]
    assert out["overwrite_warnings"] == []
