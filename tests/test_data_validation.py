"""Data refused before anything starts or is written: null / empty / non-text prompts and answers, empty splits,
undecodable bytes and prompts too long for the model's context each raise ConfigError with one line naming the
file (or split), the line or row and the fix; data.drop_bad_rows drops and counts them instead."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_mega import data
from dynamo_mega.config import ConfigError, DataConfig

pytestmark = pytest.mark.reliability  # the failure probes of docs/operations.md: pytest -m reliability

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizers" / "qwen2.5-math-1.5b"
GOOD = {"id": "a", "problem": "What is 2+3?", "answer": "5"}


def _write(path: Path, rows: list) -> Path:
    """rows in path's format: .jsonl one per line, .json an array, .parquet a table."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        pytest.importorskip("pyarrow")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _cfg(train: Path, **kw) -> DataConfig:
    return DataConfig(source="file", train_path=str(train), prompt_key="problem", **kw)


def _one_line_error(cfg: DataConfig) -> str:
    with pytest.raises(ConfigError) as err:
        data.load_splits(cfg)
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("problem", None, "empty prompt (null) in field 'problem'"),
        ("problem", "  ", "empty prompt in field 'problem'"),
        ("problem", 42, "the prompt in field 'problem' is a int, not text"),
        ("problem", ["What is 1+1?"], "the prompt in field 'problem' is a list, not text"),
        ("answer", None, "empty answer (null) in field 'answer'"),
        ("answer", "", "empty answer ('') in field 'answer'"),
        ("answer", {"value": 5}, "the answer in field 'answer' is a dict"),
        ("answer", True, "the answer in field 'answer' is a bool"),
    ],
)
def test_bad_prompt_or_answer_names_file_line_and_fix(tmp_path, field, value, problem):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({"id": "b", "problem": "p", "answer": "1", field: value}) + "\n")
    message = _one_line_error(_cfg(path))
    assert message.startswith(f"data.train_path={path} line 3: {problem}"), message  # the blank line 2 counts
    assert message.endswith("fix the data or set data.drop_bad_rows=true"), message


@pytest.mark.parametrize(("suffix", "place"), [(".jsonl", "line 2"), (".json", "row 1"), (".parquet", "row 1")])
def test_every_format_names_the_row(tmp_path, suffix, place):
    path = _write(tmp_path / f"d{suffix}", [GOOD, {"id": "b", "problem": None, "answer": "1"}])
    assert _one_line_error(_cfg(path)).startswith(f"data.train_path={path} {place}: empty prompt (null)")


def test_eval_file_is_named_too(tmp_path):
    train = _write(tmp_path / "train.jsonl", [GOOD])
    held_out = _write(tmp_path / "eval.json", [{"id": "e", "problem": "q", "answer": [None]}])
    message = _one_line_error(_cfg(train, eval_path=str(held_out)))
    assert message.startswith(f"data.eval_path={held_out} row 0: empty answer ([None]) in field 'answer'"), message


@pytest.mark.parametrize(("name", "text"), [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]")])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_empty_split_is_refused(tmp_path, name, text, split):
    empty = tmp_path / name
    empty.write_text(text)
    good = _write(tmp_path / "good.jsonl", [GOOD])
    cfg = _cfg(empty) if split == "train" else _cfg(good, eval_path=str(empty))
    key = "train_path" if split == "train" else "eval_path"
    assert _one_line_error(cfg) == f"data.{key}={empty}: the file has no rows; point data.{key} at a file with {split} problems"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_undecodable_bytes_name_line_and_column(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    first = json.dumps(GOOD)
    second = '{"id": "b", "problem": "caf\xe9?", "answer": "1"}'  # written as latin-1: a lone 0xe9 byte
    body = f"{first}\n{second}\n" if suffix == ".jsonl" else f"[{first},\n{second}]\n"
    path.write_bytes(body.encode("latin-1"))
    column = second.index("\xe9") + 1
    assert _one_line_error(_cfg(path)) == (
        f"data.train_path={path} line 2: not UTF-8 (byte 0xe9 at column {column}); re-encode the file as UTF-8"
    )


def test_drop_bad_rows_drops_and_counts(tmp_path, capsys):
    rows = [
        GOOD,
        {"id": "b", "problem": None, "answer": "1"},
        {"id": "c", "problem": "q", "answer": {"v": 1}},
        {"id": "d", "problem": "What is 6*7?", "answer": 42},  # a number is a fine answer
        dict(GOOD, id="e"),  # an exact repeat of row a's prompt and answer
    ]
    splits = data.load_splits(_cfg(_write(tmp_path / "d.jsonl", rows), drop_bad_rows=True))
    train, held_out = splits
    assert [(p.id, p.answer) for p in train] == [("a", "5"), ("d", "42")] and held_out == []
    assert splits.dropped == {"train/dropped_bad_rows": 2, "train/dropped_repeated_rows": 1}
    assert "dropped 2 bad rows (first: line 2: empty prompt (null)" in capsys.readouterr().out


def test_drop_bad_rows_that_empties_a_split_is_still_an_error(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"id": "a", "problem": "", "answer": "1"}, {"id": "b", "problem": "q", "answer": None}])
    message = _one_line_error(_cfg(path, drop_bad_rows=True))
    assert message == (
        f"data.train_path={path}: data.drop_bad_rows dropped all 2 rows "
        "(first: line 1: empty prompt in field 'problem'); fix the data"
    )


def test_overlong_prompt_is_refused_by_id_or_dropped():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    prompts = [data.Prompt("short", "What is 2+3?", "5"), data.Prompt("long", "What is 2+3? " * 50, "5")]
    rendered = data.render_chat(prompts, tokenizer, "Box it.")
    n_long = len(tokenizer.encode(rendered[1].prompt, add_special_tokens=False))
    check = data.check_prompt_lengths
    assert check("train", rendered, tokenizer, n_long + 8, 8, drop_bad_rows=False) == rendered  # fits exactly
    with pytest.raises(ConfigError) as err:
        check("train", rendered, tokenizer, n_long + 7, 8, drop_bad_rows=False)
    assert str(err.value) == (
        f"train prompt 'long' has {n_long} tokens: with rollout.max_new_tokens=8 that exceeds the model's context of "
        f"{n_long + 7} tokens; shorten the prompt, use a model with a longer context, or set data.drop_bad_rows=true"
    )
    assert check("eval", rendered, tokenizer, n_long + 7, 8, drop_bad_rows=True) == rendered[:1]
    with pytest.raises(ConfigError, match="would drop every eval prompt"):
        check("eval", rendered, tokenizer, 16, 8, drop_bad_rows=True)


def test_cli_exits_2_naming_the_file_and_writes_nothing(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b'{"id": "a", "problem": "caf\xe9?", "answer": "1"}\n')  # latin-1
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "dynamo_mega.cli", "train", "configs/tiny_cpu.yaml", f"run.output_dir={run_dir}",
        f"model.hf_checkpoint={TOKENIZER}", "data.source=file", f"data.train_path={bad}", "data.prompt_key=problem",
        "warmup.enabled=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dynamo-mega: error:")]
    assert len(lines) == 1 and f"data.train_path={bad}" in lines[0] and "line 1: not UTF-8" in lines[0], proc.stderr[-2000:]
    assert not run_dir.exists()
