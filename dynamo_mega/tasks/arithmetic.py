"""Synthetic verifiable arithmetic: prompts like ``3+7-2=`` whose answer is written ``\\boxed{8}``.

The task is small enough that a 0.8M-parameter Qwen2-shaped model learns it on two CPU cores, and its answers
go through the same math-verify reward as the real benchmarks. It comes with a character-level tokenizer built
locally with `tokenizers` and saved in Hugging Face format, so vLLM, the trainer and the evaluator all agree on
token ids without any download.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<eos>"
BOXED = "\\boxed{"
# Order fixes the ids: specials first so pad=0, eos=1 whatever characters are added later.
VOCAB = [PAD, EOS, *"0123456789", "+", "-", "=", BOXED, "}", ",", "?"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer with `\\boxed{` as one token (ids in `VOCAB` order)."""
    core = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(VOCAB)}, unk_token=PAD))
    # Split into `\boxed{` or any single character, keeping every piece as its own token.
    core.pre_tokenizer = pre_tokenizers.Split(pattern=_boxed_or_char_regex(), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=PAD)


def _boxed_or_char_regex():
    from tokenizers import Regex

    return Regex(r"\\boxed\{|.")


def save_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer()
    tok.save_pretrained(str(directory))
    return tok


SHOW_WORK = ("none", "bare", "running_totals", "column_digits")


def all_problems(num_operands: int, operand_max: int, operators: str = "+-") -> list[tuple[str, int]]:
    """Every expression `a op b op c ...` with operands in [0, operand_max] and ops from `operators`, with its value."""
    if not operators or set(operators) - set("+-"):
        raise ValueError(f"data.operators={operators!r}: use a non-empty combination of '+' and '-'")
    problems = []
    for operands in itertools.product(range(operand_max + 1), repeat=num_operands):
        for ops in itertools.product(operators, repeat=num_operands - 1):
            text = str(operands[0]) + "".join(o + str(v) for o, v in zip(ops, operands[1:]))
            problems.append((text, eval(text)))  # noqa: S307 - text is built above from digits and +/- only
    return problems


def parse_level(spec: str) -> tuple[int, int]:
    """'3x9' -> (3, 9): chains of 3 operands, each in [0, 9]."""
    parts = str(spec).split("x")
    if len(parts) != 2 or not all(x.isdigit() for x in parts) or int(parts[0]) < 2:
        raise ValueError(
            f"data.levels entry {spec!r}: write NxM for chains of N >= 2 operands in [0, M], e.g. 3x9 (a+b-c, single digits)"
        )
    return int(parts[0]), int(parts[1])


def make_splits(
    num_train: int,
    num_eval: int,
    *,
    num_operands: int,
    operand_max: int,
    seed: int,
    operators: str = "+-",
    reverse_answer: bool = False,
    levels: list[str] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out splits of records {id, prompt, answer, level}; ids are content hashes (stable).

    levels (e.g. ["3x9", "2x99"]) mixes difficulties: each NxM level is chains of N operands in [0, M] (less any
    problem an earlier level already has), in equal shares of each split as far as the level has distinct problems
    (2x9 has only 200: the other levels take the rest), the way real math data mixes problems a policy solves with
    problems beyond it; `level` labels each record. A level too large to list (over 200k problems) is drawn at
    random instead, as a prefix of one seeded stream, so a smaller num_train still takes a subset. Without levels,
    every problem has num_operands operands in [0, operand_max] (level "NxM" of those).
    reverse_answer: the answer is the value with its digits in reverse order (58+89= -> 741), i.e. written ones
    digit first the way column addition produces it, so each generated digit depends on one column and a carry
    already written. Only for non-negative values ("+")."""
    if reverse_answer and operators != "+":
        raise ValueError("data.reverse_answer=true needs data.operators='+' (reversed digits of a negative value are ambiguous)")
    if num_operands < 2:
        raise ValueError(f"data.num_operands={num_operands}: need at least 2 operands")
    shapes = [parse_level(x) for x in levels] if levels else [(num_operands, operand_max)]
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"data.levels={list(levels)} names a level twice")

    def record(text: str, value: int, label: str) -> dict:
        answer = str(value)[::-1] if reverse_answer else str(value)
        prompt = text + ("=?" if reverse_answer else "=")  # "=?" marks the reversed-answer task in the prompt
        pid = "arith-" + hashlib.sha1(prompt.encode()).hexdigest()[:12]
        return {"id": pid, "prompt": prompt, "answer": answer, "level": label}

    pools, taken = [], set()
    for k, (n_ops, top) in enumerate(shapes):
        # A problem of two levels (2x9 lies inside 2x99) belongs to the first one that lists it: ids stay unique.
        rng = random.Random(seed if len(shapes) == 1 else seed + 7919 * (k + 1))
        if (top + 1) ** n_ops * len(operators) ** (n_ops - 1) <= _ENUMERATE_UP_TO:
            problems = [(t, v) for t, v in all_problems(n_ops, top, operators) if t not in taken]
            rng.shuffle(problems)
        else:  # e.g. 3x99 has 4M problems: draw what the splits can use instead of listing them all
            problems = _draw_problems(n_ops, top, operators, num_train + num_eval, taken, rng)
        taken.update(t for t, _ in problems)
        pools.append([record(t, v, f"{n_ops}x{top}") for t, v in problems])
    names = [f"{n}x{m}" for n, m in shapes]
    too_many = ValueError(
        f"data.num_train + data.num_eval = {num_train + num_eval} exceeds the {sum(map(len, pools))} distinct problems "
        f"of levels {names} (N operands in [0, M]); lower them or raise data.operand_max / data.num_operands (or M)"
    )
    if len(pools) == 1:  # one level: train first, then held-out, from one shuffle (the split as it always was)
        if num_train + num_eval > len(pools[0]):
            raise too_many
        chosen = pools[0][: num_train + num_eval]
        return chosen[:num_train], chosen[num_train:]
    eval_n = _equal_shares(num_eval, [len(p) // 2 for p in pools])  # a level keeps at least half for training
    train_n = _equal_shares(num_train, [len(p) - e for p, e in zip(pools, eval_n)])
    if sum(eval_n) < num_eval or sum(train_n) < num_train:
        raise too_many
    train = [r for pool, e, n in zip(pools, eval_n, train_n) for r in pool[e : e + n]]
    held_out = [r for pool, e in zip(pools, eval_n) for r in pool[:e]]
    # interleave levels so that any prefix of either split (run.eval_prompts) is a mix
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(held_out)
    return train, held_out


_ENUMERATE_UP_TO = 200_000


def _draw_problems(n_ops: int, top: int, operators: str, count: int, taken: set, rng: random.Random) -> list[tuple[str, int]]:
    """`count` distinct random problems of a level too large to enumerate, none of them in `taken`."""
    out, seen = [], set(taken)
    while len(out) < count:
        values = [rng.randint(0, top) for _ in range(n_ops)]
        text = str(values[0]) + "".join(rng.choice(operators) + str(v) for v in values[1:])
        if text not in seen:
            seen.add(text)
            out.append((text, eval(text)))  # noqa: S307 - digits and +/- only, built above
    return out


def _equal_shares(total: int, caps: list[int]) -> list[int]:
    """Split `total` as equally as the caps allow (water-filling: a capped level's leftover goes to the others);
    the earlier levels get the odd units. Sums to min(total, sum(caps))."""
    shares = [0] * len(caps)
    left = min(total, sum(caps))
    while left > 0:
        open_levels = [i for i, c in enumerate(caps) if shares[i] < c]
        each, odd = divmod(left, len(open_levels))
        for k, i in enumerate(open_levels):
            add = min(each + (k < odd), caps[i] - shares[i])
            shares[i] += add
            left -= add
    return shares


def running_totals(expression: str) -> list[int]:
    """Partial results left to right: "9+9+6" -> [18, 24]."""
    numbers = [int(n) for n in re.findall(r"\d+", expression)]
    ops = re.findall(r"[+-]", expression)
    totals, acc = [], numbers[0]
    for op, value in zip(ops, numbers[1:], strict=True):
        acc = acc + value if op == "+" else acc - value
        totals.append(acc)
    return totals


def solution_text(prompt: str, answer: str, show_work: str) -> str:
    """The response a perfect policy writes (used by the supervised warm-up); the final answer is always boxed.

    - `none`: `\\boxed{24}`; `bare`: `24`.
    - `running_totals`: the total after each operation first, `18,\\boxed{24}` for `9+9+6=`.
    - `column_digits`: column addition as by hand, the sum's digits from the ones place up, then the answer:
      `741,\\boxed{147}` for `58+89=`. Each digit depends only on one column and a carry, a step a
      0.8M-parameter model can learn; writing the whole number at once needs every carry first.
    """
    if show_work not in SHOW_WORK:
        raise ValueError(f"data.show_work={show_work!r}: use one of {SHOW_WORK}")
    if show_work == "none":
        return f"{BOXED}{answer}}}"
    if show_work == "bare":  # the answer alone, no \\boxed{} (math-verify still extracts a plain number)
        return answer
    if show_work == "column_digits":
        if answer.startswith("-") or "-" in prompt:
            raise ValueError("data.show_work=column_digits needs data.operators='+' (sums are written by columns)")
        return f"{answer[::-1]},{BOXED}{answer}}}"
    totals = running_totals(prompt.rstrip("=?"))
    if str(totals[-1]) != answer:
        raise AssertionError(f"{prompt!r}: running total {totals[-1]} disagrees with answer {answer}")
    return "".join(f"{t}," for t in totals[:-1]) + f"{BOXED}{answer}}}"
