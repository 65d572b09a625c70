"""Prompt datasets: records {id, prompt, answer} from the synthetic task or from jsonl/json/parquet files,
with stable unique prompt ids, and a resumable epoch sampler.

Ids matter: DynaMO keeps statistics per prompt id, so an id that silently defaults to a row number or collides
with another prompt misattributes history (a defect of the paper's reference code). Missing or duplicate ids
are therefore an error naming the rows.

Data files are checked before anything starts or is written: an unreadable file (not UTF-8, not JSON), a row
whose prompt or answer is null, empty or of the wrong type, an empty split, and (`check_prompt_lengths`, once
the prompts are rendered) a prompt too long for the engine's context each raise `ConfigError` with one line
naming the file or split, the line or row, and the fix. With data.drop_bad_rows those rows are dropped and
counted instead (`Splits.dropped`); a split left empty is still an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynamo_mega.config import ConfigError, DataConfig
from dynamo_mega.rl.prompt_stats import validate_prompt_ids
from dynamo_mega.tasks import arithmetic


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str  # text given to the tokenizer (already rendered for this task)
    answer: str  # ground truth compared by the reward
    difficulty: str = ""  # optional label (synthetic: its level, e.g. 3x9; files: data.difficulty_key) for per-level metrics
    # The dataset row as read (every column): user reward functions get its columns as keyword arguments.
    columns: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def reward_kwargs(self) -> dict:
        """The keyword values a user reward function gets for this prompt's samples (rl/reward_plugins.py):
        the row's columns and `prompts`, the text the policy saw. A column named `prompts` or `completions` is
        left out: those names are the trainer's, as in TRL."""
        return {**{k: v for k, v in self.columns.items() if k not in ("prompts", "completions")}, "prompts": self.prompt}


@dataclass(frozen=True)
class Splits:
    """load_splits' result; unpacks as `train, held_out = load_splits(cfg)`."""

    train: list[Prompt]
    held_out: list[Prompt]
    # data.drop_bad_rows: rows dropped per split and reason, e.g. {"train/dropped_bad_rows": 2,
    # "train/dropped_repeated_rows": 1, "eval/...": 0}; empty without drop_bad_rows or for the synthetic task
    dropped: dict[str, int] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.train, self.held_out))


def _decode(data: bytes, source: str) -> str:
    """The file's text; undecodable bytes name their line and column (1-based, in bytes)."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{source} line {line}: not UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); re-encode the file as UTF-8"
        ) from None


def _read_rows(path: Path, source: str) -> tuple[list, list[str]]:
    """(rows, where each row is: 'line N' in a .jsonl file, 'row N' (0-based) in a .json array or .parquet)."""
    if not path.is_file():
        raise ConfigError(f"{source}: data file not found")
    if path.suffix == ".jsonl":
        rows, where = [], []
        for n, line in enumerate(_decode(path.read_bytes(), source).split("\n"), start=1):  # not splitlines: U+2028 is valid JSON
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{source} line {n}: not valid JSON ({exc.msg}); fix or remove the line") from None
                where.append(f"line {n}")
        return rows, where
    if path.suffix == ".json":
        try:
            rows = json.loads(_decode(path.read_bytes(), source)) if path.stat().st_size else []
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source} line {exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
        if not isinstance(rows, list):
            raise ConfigError(f"{source}: expected a JSON array of objects, got a {type(rows).__name__}")
        return rows, [f"row {i}" for i in range(len(rows))]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except pa.ArrowException as exc:
            raise ConfigError(f"{source}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        return rows, [f"row {i}" for i in range(len(rows))]
    raise ConfigError(f"{source}: unsupported data format {path.suffix!r}; use .jsonl, .json or .parquet")


def _answer_text(value) -> str | None:
    """The ground truth as text, or None when the value is not usable (null, empty, not text or a number)."""
    if isinstance(value, list):  # e.g. OlympiadBench final_answer: a one-element list
        value = value[0] if value else None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer():  # e.g. AMC23 stores 27.0
            value = int(value)
    return str(value).strip() or None


def _row_problem(row, prompt_key: str, answer_key: str) -> str | None:
    """Why this row cannot be trained on (a phrase for the error), or None when it can."""
    if not isinstance(row, dict):
        return f"not a JSON object (got {type(row).__name__})"
    prompt = row.get(prompt_key)
    if prompt is None:
        return f"empty prompt (null) in field {prompt_key!r}"
    if not isinstance(prompt, str):
        return f"the prompt in field {prompt_key!r} is a {type(prompt).__name__}, not text"
    if not prompt.strip():
        return f"empty prompt in field {prompt_key!r}"
    answer = row.get(answer_key)
    if _answer_text(answer) is not None:
        return None
    inner = (answer[0] if answer else None) if isinstance(answer, list) else answer  # a one-element list holds it
    if inner is None or (isinstance(inner, str) and not inner.strip()):
        return f"empty answer ({'null' if answer is None else repr(answer)}) in field {answer_key!r}"
    return f"the answer in field {answer_key!r} is a {type(answer).__name__} ({str(answer)[:40]!r}), not text or a number"


def drop_bad_rows(
    rows: list, *, prompt_key: str, answer_key: str, source: str, where: list[str] | None = None
) -> tuple[list, list[str], dict[str, int]]:
    """(kept rows, their places, counts {"bad_rows", "repeated_rows"}): rows with a null, empty or non-text prompt or
    answer, and repeats of an earlier row with the same prompt AND answer, removed (counts printed). Rows without
    the prompt field stay in (data.prompt_key is probably wrong), as does a prompt that appears with two different
    answers, so that both still fail loudly."""
    where = where if where is not None else [f"row {i}" for i in range(len(rows))]
    kept, kept_where, seen, counts, first = [], [], set(), {"bad_rows": 0, "repeated_rows": 0}, ""
    for row, place in zip(rows, where, strict=True):
        problem = _row_problem(row, prompt_key, answer_key)
        if problem is not None and (not isinstance(row, dict) or prompt_key in row):
            counts["bad_rows"] += 1
            first = first or f"{place}: {problem}"
            continue
        key = (str(row.get(prompt_key)), _answer_text(row.get(answer_key)))
        if key in seen:
            counts["repeated_rows"] += 1
            continue
        seen.add(key)
        kept.append(row)
        kept_where.append(place)
    if counts["bad_rows"] or counts["repeated_rows"]:
        detail = f" (first: {first})" if first else ""
        print(
            f"dynamo-mega: {source}: dropped {counts['bad_rows']} bad rows{detail} and {counts['repeated_rows']} repeated rows",
            flush=True,
        )
    return kept, kept_where, counts


def records_to_prompts(
    rows: list,
    *,
    prompt_key: str,
    answer_key: str,
    id_key: str | None,
    source: str,
    difficulty_key: str | None = None,
    where: list[str] | None = None,
) -> list[Prompt]:
    """Convert raw rows (`where`: each row's place for errors, default 'row N'); ids come from `id_key` or, when it
    is None, from a hash of the prompt text. A bad row, or missing or duplicate ids, fail the whole dataset
    (rl/prompt_stats.validate_prompt_ids names the rows)."""
    where = where if where is not None else [f"row {i}" for i in range(len(rows))]
    texts, answers, ids = [], [], []
    for row, place in zip(rows, where, strict=True):
        if isinstance(row, dict) and (prompt_key not in row or answer_key not in row):
            raise ConfigError(
                f"{source} {place}: missing field {prompt_key!r} or {answer_key!r} (set data.prompt_key / data.answer_key)"
            )
        problem = _row_problem(row, prompt_key, answer_key)
        if problem is not None:
            raise ConfigError(f"{source} {place}: {problem}; fix the data or set data.drop_bad_rows=true")
        texts.append(row[prompt_key])
        answers.append(_answer_text(row[answer_key]))
        ids.append("sha1-" + hashlib.sha1(texts[-1].encode()).hexdigest()[:16] if id_key is None else row.get(id_key))
    try:
        validate_prompt_ids(ids)
    except ValueError as exc:
        hint = "" if id_key is None else " Or set data.id_key=null to hash the prompt text."
        raise ConfigError(f"{source}: {exc}{hint}") from None
    levels = ["" if difficulty_key is None or row.get(difficulty_key) is None else str(row[difficulty_key]) for row in rows]
    return [
        Prompt(str(pid), text, answer, level, dict(row))
        for pid, text, answer, level, row in zip(ids, texts, answers, levels, rows, strict=True)
    ]


def load_splits(cfg: DataConfig) -> Splits:
    """(train, eval) prompts for the configured source; for files, rows checked (module docstring)."""
    if cfg.source == "synthetic_arithmetic":
        train, held_out = arithmetic.make_splits(
            cfg.num_train,
            cfg.num_eval,
            num_operands=cfg.num_operands,
            operand_max=cfg.operand_max,
            seed=cfg.seed,
            operators=cfg.operators,
            reverse_answer=cfg.reverse_answer,
            levels=list(cfg.levels),
        )
        keys = dict(prompt_key="prompt", answer_key="answer", id_key="id", difficulty_key="level")
        return Splits(
            records_to_prompts(train, source="synthetic train", **keys),
            records_to_prompts(held_out, source="synthetic eval", **keys),
        )
    keys = dict(prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, id_key=cfg.id_key, difficulty_key=cfg.difficulty_key)
    dropped: dict[str, int] = {}

    def read(split: str, key: str) -> list[Prompt]:
        source = f"data.{key}={getattr(cfg, key)}"
        rows, where = _read_rows(Path(getattr(cfg, key)), source)
        if not rows:
            raise ConfigError(f"{source}: the file has no rows; point data.{key} at a file with {split} problems")
        if cfg.drop_bad_rows:
            kept, kept_where, counts = drop_bad_rows(
                rows, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, source=source, where=where
            )
            dropped.update({f"{split}/dropped_{reason}": n for reason, n in counts.items()})
            if not kept:  # every row was bad (a repeat always leaves its first copy)
                first = next(f"{w}: {m}" for r, w in zip(rows, where) if (m := _row_problem(r, cfg.prompt_key, cfg.answer_key)))
                raise ConfigError(f"{source}: data.drop_bad_rows dropped all {len(rows)} rows (first: {first}); fix the data")
            rows, where = kept, kept_where
        return records_to_prompts(rows, source=source, where=where, **keys)

    train = read("train", "train_path")
    return Splits(train, read("eval", "eval_path") if cfg.eval_path else [], dropped)


def render_chat(prompts: list[Prompt], tokenizer, system_prompt: str) -> list[Prompt]:
    """Each problem as the text the policy sees: an optional system turn and one user turn through the
    tokenizer's own chat template, ending with the assistant's generation prompt. Ids and answers unchanged."""
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": p.prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(Prompt(p.id, text, p.answer, p.difficulty, p.columns))
    return out


def check_prompt_lengths(
    split: str, prompts: list[Prompt], tokenizer, max_context: int, max_new_tokens: int, drop_bad_rows: bool
) -> list[Prompt]:
    """`prompts` (rendered: the exact text the engine gets) whose tokens + max_new_tokens fit the engine's context of
    max_context tokens (vLLM max_model_len = the model's max_position_embeddings). A longer one is refused naming
    its split and id, or dropped (count printed) when drop_bad_rows; a split left empty is refused either way.
    One batched tokenizer call, tokenized as the rollout does (no special tokens added)."""
    if not prompts:
        return prompts
    budget = max_context - max_new_tokens
    lengths = [len(ids) for ids in tokenizer([p.prompt for p in prompts], add_special_tokens=False)["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if not too_long:
        return prompts
    first = too_long[0]
    what = (
        f"{split} prompt {prompts[first].id!r} has {lengths[first]} tokens: with rollout.max_new_tokens={max_new_tokens} "
        f"that exceeds the model's context of {max_context} tokens"
        + (f" (as do {len(too_long) - 1} more {split} prompts)" if len(too_long) > 1 else "")
    )
    if not drop_bad_rows:
        raise ConfigError(f"{what}; shorten the prompt, use a model with a longer context, or set data.drop_bad_rows=true")
    if len(too_long) == len(prompts):
        raise ConfigError(f"{what}; data.drop_bad_rows would drop every {split} prompt: shorten the prompts")
    print(f"dynamo-mega: {split}: dropped {len(too_long)} prompts too long for the context ({what})", flush=True)
    drop = set(too_long)
    return [p for i, p in enumerate(prompts) if i not in drop]


class EpochSampler:
    """Draws batches of prompts without replacement, reshuffling each epoch; the cursor is checkpointable.

    A batch never holds the same prompt twice, also when it crosses an epoch boundary: it takes the rest of
    epoch e, then the first prompts of epoch e+1's shuffle that it does not already hold; the prompts it
    skipped (the crossing batch's epoch-e part, `carry`) keep their places right after, so epoch e+1 still
    visits every prompt exactly once. The order is a pure function of (seed, epoch, position, carry): the
    permutation of epoch e depends only on (seed, e), so a resumed run draws exactly the same prompts.
    """

    def __init__(self, num_items: int, seed: int):
        if num_items == 0:
            raise ValueError("the training set is empty")
        self.num_items, self.seed = num_items, seed
        self.epoch, self.position = 0, 0
        # The epoch-(e-1) items of the batch that crossed into this epoch, and how many epoch-e items it took.
        self.carry: list[int] = []
        self.carry_take = 0

    def _perm(self) -> np.ndarray:
        """This epoch's order: its shuffle, with the carried items moved out of the first carry_take slots."""
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        if not self.carry:
            return perm
        carried = np.isin(perm, np.asarray(self.carry, dtype=perm.dtype))
        fresh = np.flatnonzero(~carried)[: self.carry_take]
        rest = np.setdiff1d(np.arange(self.num_items), fresh, assume_unique=True)  # ascending: keeps perm order
        return np.concatenate([perm[fresh], perm[rest]])

    def next_batch(self, batch_size: int) -> list[int]:
        """batch_size distinct item indices; batch_size must not exceed the number of items."""
        if not 1 <= batch_size <= self.num_items:
            raise ValueError(
                f"a batch of {batch_size} distinct prompts cannot be drawn from {self.num_items} training prompts; "
                "lower rollout.prompts_per_step (or warmup.batch_size) or add training data"
            )
        perm = self._perm()
        take = min(batch_size, self.num_items - self.position)
        out = [int(i) for i in perm[self.position : self.position + take]]
        self.position += take
        if self.position == self.num_items:
            self.epoch, self.position = self.epoch + 1, 0
            self.carry, self.carry_take = (list(out), batch_size - take) if take < batch_size else ([], 0)
            perm = self._perm()
            out.extend(int(i) for i in perm[: batch_size - take])
            self.position = batch_size - take
        assert len(set(out)) == len(out), f"internal error: EpochSampler drew a repeated prompt at epoch {self.epoch}"
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_items": self.num_items,
            "carry": list(self.carry),
            "carry_take": self.carry_take,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items:
            raise ValueError(
                f"checkpoint sampler saw {state['num_items']} prompts but the dataset has {self.num_items}; "
                "resume with the same data"
            )
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        # Checkpoints written before the carry existed crossed boundaries without it: resume as they would have.
        self.carry, self.carry_take = list(state.get("carry", [])), int(state.get("carry_take", 0))


# What a training run reads before it writes anything (train.setup): the splits, checked, and the tokenizer.


def load_data(cfg) -> tuple[list[Prompt], list[Prompt], object, dict[str, int]]:
    """(train, held-out, tokenizer, dropped-row counts): the splits checked row by row (load_splits) and, rendered with
    the tokenizer, against the engines' context. A bad row is a ConfigError naming file and row, or is dropped
    and counted with data.drop_bad_rows."""
    from dynamo_mega.models.qwen import arch_from_model_config

    splits = load_splits(cfg.data)
    tokenizer = load_tokenizer(cfg)
    train_set, eval_set = splits
    if cfg.data.source == "file" and cfg.data.prompt_format == "chat":
        train_set, eval_set = (render_chat(split, tokenizer, cfg.data.system_prompt) for split in (train_set, eval_set))
    max_len = arch_from_model_config(cfg.model).max_position_embeddings  # the engines' context (start_vllm_replicas)
    fit = dict(max_context=max_len, max_new_tokens=cfg.rollout.max_new_tokens, drop_bad_rows=cfg.data.drop_bad_rows)
    train_kept = check_prompt_lengths("train", train_set, tokenizer, **fit)
    eval_kept = check_prompt_lengths("eval", eval_set, tokenizer, **fit)
    dropped = dict(splits.dropped)
    if cfg.data.drop_bad_rows:
        dropped["train/dropped_too_long"] = len(train_set) - len(train_kept)
        dropped["eval/dropped_too_long"] = len(eval_set) - len(eval_kept)
    return train_kept, eval_kept, tokenizer, dropped


def load_tokenizer(cfg):
    """The checkpoint's own tokenizer, or the synthetic task's (built locally; setup's driver saves it in HF format)."""
    if cfg.model.hf_checkpoint is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_checkpoint)
        if tokenizer.pad_token_id is None:  # padding positions are masked out; any id will do
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return arithmetic.build_tokenizer()


def check_vocab(tokenizer, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={vocab_size}; raise model.vocab_size")
