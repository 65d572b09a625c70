"""Prompt datasets: records {id, prompt, answer} from the synthetic task or from jsonl/json/parquet files,
with stable unique prompt ids, and a resumable epoch sampler.

Ids matter: DynaMO keeps statistics per prompt id, so an id that silently defaults to a row number or collides
with another prompt misattributes history (a defect of the paper's reference code). Missing or duplicate ids
are therefore an error naming the rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynamo_mega.config import DataConfig
from dynamo_mega.rl.prompt_stats import validate_prompt_ids
from dynamo_mega.tasks import arithmetic


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str  # text given to the tokenizer (already rendered for this task)
    answer: str  # ground truth compared by the reward
    difficulty: str = ""  # optional label (synthetic: its level, e.g. 3x9; files: data.difficulty_key) for per-level metrics


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        return rows
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON array of objects")
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported data format {path.suffix!r}; use .jsonl, .json or .parquet")


def _answer_text(value) -> str:
    if isinstance(value, list):  # e.g. OlympiadBench final_answer: a one-element list
        value = value[0] if value else ""
    if isinstance(value, float) and value.is_integer():  # e.g. AMC23 stores 27.0
        value = int(value)
    return "" if value is None else str(value).strip()


def drop_bad_rows(rows: list[dict], *, prompt_key: str, answer_key: str, source: str) -> list[dict]:
    """Rows without an answer, and repeats of an earlier row with the same prompt AND answer, removed (counts
    printed). A prompt that appears with two different answers stays in, so that it still fails loudly."""
    kept, seen, empty, repeats = [], set(), 0, 0
    for row in rows:
        if prompt_key in row and not _answer_text(row.get(answer_key)):
            empty += 1
            continue
        key = (str(row.get(prompt_key)), _answer_text(row.get(answer_key)))
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        kept.append(row)
    if empty or repeats:
        print(f"dynamo-mega: {source}: dropped {empty} rows without an answer and {repeats} repeated rows", flush=True)
    return kept


def records_to_prompts(
    rows: list[dict], *, prompt_key: str, answer_key: str, id_key: str | None, source: str, difficulty_key: str | None = None
) -> list[Prompt]:
    """Convert raw rows; ids come from `id_key` or, when it is None, from a hash of the prompt text.
    Missing or duplicate ids fail the whole dataset (rl/prompt_stats.validate_prompt_ids names the rows)."""
    texts, answers, ids = [], [], []
    for row_no, row in enumerate(rows):
        if prompt_key not in row or answer_key not in row:
            raise ValueError(
                f"{source} row {row_no}: missing field {prompt_key!r} or {answer_key!r} (set data.prompt_key / data.answer_key)"
            )
        answer = _answer_text(row[answer_key])
        if not answer:
            raise ValueError(
                f"{source} row {row_no}: empty answer in field {answer_key!r}; fix the data or set data.drop_bad_rows=true"
            )
        texts.append(str(row[prompt_key]))
        answers.append(answer)
        ids.append("sha1-" + hashlib.sha1(texts[-1].encode()).hexdigest()[:16] if id_key is None else row.get(id_key))
    try:
        validate_prompt_ids(ids)
    except ValueError as exc:
        hint = "" if id_key is None else " Or set data.id_key=null to hash the prompt text."
        raise ValueError(f"{source}: {exc}{hint}") from None
    levels = ["" if difficulty_key is None or row.get(difficulty_key) is None else str(row[difficulty_key]) for row in rows]
    return [Prompt(str(pid), text, answer, level) for pid, text, answer, level in zip(ids, texts, answers, levels, strict=True)]


def load_splits(cfg: DataConfig) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval) prompts for the configured source."""
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
        return (
            records_to_prompts(train, source="synthetic train", **keys),
            records_to_prompts(held_out, source="synthetic eval", **keys),
        )
    keys = dict(prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, id_key=cfg.id_key, difficulty_key=cfg.difficulty_key)

    def read(path: str) -> list[Prompt]:
        rows = _read_rows(Path(path))
        if cfg.drop_bad_rows:
            rows = drop_bad_rows(rows, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, source=path)
        return records_to_prompts(rows, source=path, **keys)

    return read(cfg.train_path), read(cfg.eval_path) if cfg.eval_path else []


def render_chat(prompts: list[Prompt], tokenizer, system_prompt: str) -> list[Prompt]:
    """Each problem as the text the policy sees: an optional system turn and one user turn through the
    tokenizer's own chat template, ending with the assistant's generation prompt. Ids and answers unchanged."""
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": p.prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(Prompt(p.id, text, p.answer, p.difficulty))
    return out


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
