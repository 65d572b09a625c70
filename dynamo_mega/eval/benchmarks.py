"""The six math benchmarks shipped in data/benchmarks/ (provenance in data/benchmarks/MANIFEST.md).

Each file stores its problem and its ground truth under different fields and in different forms; this module
turns every row into one `Problem` whose `answer` is a string math-verify can parse:
- AIME24/AIME25: strings, some zero-padded ("025") -> the integer's decimal string ("25").
- AMC23: JSON floats (27.0) -> "27" (all are whole numbers; a non-integer would be kept as written).
- MATH-500: the `answer` string as is.
- Minerva (Qwen format): no answer field; the ground truth is the LAST \\boxed{...} of `solution`.
- OlympiadBench: `final_answer[0]`, with the $...$ math delimiters stripped (as Qwen's parser does).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "benchmarks"


@dataclass(frozen=True)
class Problem:
    benchmark: str
    id: str
    question: str
    answer: str  # ground truth, normalised for math-verify


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces matched; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None  # unbalanced braces


def _integer_string(value) -> str:
    return str(int(str(value).strip()))


def _float_answer(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _minerva_answer(row: dict) -> str | None:
    return last_boxed(row["solution"])


def _olympiad_answer(row: dict) -> str:
    return row["final_answer"][0].strip().strip("$").strip()


@dataclass(frozen=True)
class BenchmarkSpec:
    file: str  # relative to the data directory
    question_key: str
    answer_of: Callable[[dict], str | None]  # row -> normalised ground truth
    id_key: str | None  # None: the row index


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "aime24": BenchmarkSpec("aime24/test.jsonl", "problem", lambda r: _integer_string(r["answer"]), "id"),
    "aime25": BenchmarkSpec("aime25/test.jsonl", "question", lambda r: _integer_string(r["answer"]), None),
    "amc23": BenchmarkSpec("amc23/test.jsonl", "problem", lambda r: _float_answer(r["answer"]), "id"),
    "math500": BenchmarkSpec("math500/test.jsonl", "problem", lambda r: str(r["answer"]).strip(), "unique_id"),
    "minerva_math": BenchmarkSpec("minerva_math/test.jsonl", "problem", _minerva_answer, "idx"),
    "olympiadbench": BenchmarkSpec("olympiadbench/test.jsonl", "question", _olympiad_answer, "id"),
}


def load_benchmark(name: str, data_dir: str | Path | None = None, limit: int = 0) -> list[Problem]:
    """Rows of benchmark `name` as Problems, in file order; `limit` > 0 keeps the first `limit` rows."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    path = Path(data_dir or DEFAULT_DATA_DIR) / spec.file
    if not path.is_file():
        raise ValueError(f"{name}: {path} not found; point eval.data_dir at the folder holding data/benchmarks/")
    problems = []
    for row_no, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        answer = spec.answer_of(row)
        if not answer:
            raise ValueError(f"{path} row {row_no}: no ground-truth answer could be extracted")
        pid = row_no if spec.id_key is None else row[spec.id_key]
        problems.append(Problem(name, f"{name}/{pid}", str(row[spec.question_key]), answer))
        if limit and len(problems) == limit:
            break
    return problems
