"""Prompt data (ids, splits, resumable sampler), math-verify rewards, group advantages, rollout alignment."""

from __future__ import annotations

import json

import pytest
import torch

from dynamo_mega.config import DataConfig
from dynamo_mega.data import EpochSampler, Prompt, load_splits, records_to_prompts
from dynamo_mega.rl.advantage import group_advantages
from dynamo_mega.rl.engines.vllm_engine import Completion
from dynamo_mega.rl.reward import MathVerifyReward
from dynamo_mega.rl.rollout import generate_rollouts, to_token_batch
from dynamo_mega.tasks import arithmetic


def test_synthetic_splits_are_disjoint_and_correct():
    train, held_out = load_splits(DataConfig(num_train=300, num_eval=100))
    assert len(train) == 300 and len(held_out) == 100
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    for p in train[:50]:
        assert p.prompt.endswith("=") and str(eval(p.prompt[:-1])) == p.answer  # noqa: S307
    again, _ = load_splits(DataConfig(num_train=300, num_eval=100))
    assert [p.id for p in again] == [p.id for p in train]  # stable ids and order


def test_too_many_synthetic_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct problems"):
        load_splits(DataConfig(num_train=5000, num_eval=500, num_operands=2))


def test_tokenizer_round_trip_and_ids(tmp_path):
    tok = arithmetic.save_tokenizer(tmp_path)
    text = "3+7-2=" + arithmetic.solution_text("3+7-2=", "8", show_work="running_totals")
    assert text == "3+7-2=10,\\boxed{8}"
    assert arithmetic.solution_text("58+89=", "147", show_work="column_digits") == "741,\\boxed{147}"
    assert arithmetic.solution_text("58+89=", "147", show_work="none") == "\\boxed{147}"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert ids.count(arithmetic.VOCAB.index(arithmetic.BOXED)) == 1  # \boxed{ is one token
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path)).encode(text, add_special_tokens=False) == ids


def test_missing_and_duplicate_ids_fail_loudly():
    rows = [{"id": "a", "prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    with pytest.raises(ValueError, match=r"^t: .*1 row\(s\) have a missing or invalid prompt id \(rows 1\)"):
        records_to_prompts(rows, prompt_key="prompt", answer_key="answer", id_key="id", source="t")
    rows[1]["id"] = "a"
    with pytest.raises(ValueError, match="^t: .*rows 0 and 1 share id 'a'"):
        records_to_prompts(rows, prompt_key="prompt", answer_key="answer", id_key="id", source="t")
    hashed = records_to_prompts(rows, prompt_key="prompt", answer_key="answer", id_key=None, source="t")
    assert hashed[0].id != hashed[1].id


def test_file_source_answers_normalised(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": 1, "problem": "p1", "answer": 27.0}, {"id": 2, "problem": "p2", "answer": ["$x$"]}]))
    train, _ = load_splits(DataConfig(source="file", train_path=str(path), prompt_key="problem"))
    assert [p.answer for p in train] == ["27", "$x$"]


def test_sampler_resumes_exactly():
    a = EpochSampler(10, seed=3)
    first = [a.next_batch(4) for _ in range(3)]
    state = a.state_dict()
    rest = [a.next_batch(4) for _ in range(3)]
    b = EpochSampler(10, seed=3)
    b.load_state_dict(state)
    assert [b.next_batch(4) for _ in range(3)] == rest
    assert sorted(sum(first, [])[:10]) == list(range(10))  # one epoch covers every prompt once


def test_math_verify_reward_pool():
    reward = MathVerifyReward(workers=2, timeout_s=10.0)
    try:
        got = reward([r"\boxed{8}", r"\boxed{9}", r"the answer is \boxed{\frac{1}{2}}", "", r"\boxed{0.5}"],
                     ["8", "8", "0.5", "3", "\\frac{1}{2}"])
        assert got == [1.0, 0.0, 1.0, 0.0, 1.0]
        assert reward.timeouts == 0
    finally:
        reward.close()


def test_group_advantages_variable_sizes():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    adv = group_advantages(rewards, [3, 3, 1])
    r = rewards[:3]
    torch.testing.assert_close(adv[:3], (r - r.mean()) / (r.std(unbiased=True) + 1e-6))
    assert torch.all(adv[3:6] == 0)  # all equal
    assert adv[6] == 0  # a group of one
    with pytest.raises(AssertionError):
        group_advantages(rewards, [3, 3])


class _EchoEngine:
    """Answers prompt i's group with a response quoting prompt i's own index: exposes any misalignment."""

    version = 5

    def generate(self, prompts, counts, **_):
        return [[Completion([2 + (i % 10)], [-0.1], True) for _ in range(n)] for i, n in enumerate(counts)]


def test_rollout_metadata_repeats_with_the_response_counts():
    tok = arithmetic.build_tokenizer()
    prompts = [Prompt(f"id{i}", f"{i}+0=", str(i)) for i in range(4)]
    counts = [2, 0, 3, 1]
    batch = generate_rollouts(_EchoEngine(), tok, prompts, counts, max_new_tokens=2, temperature=1.0, top_p=1.0, seed=0)
    assert batch.group_sizes == counts and len(batch) == 6
    assert batch.prompt_ids == ["id0", "id0", "id2", "id2", "id2", "id3"]
    assert batch.answers == ["0", "0", "2", "2", "2", "3"]
    texts = tok.batch_decode(batch.response_tokens)
    assert texts == batch.answers  # each response echoes its own prompt's answer
    assert batch.policy_version == 5


def test_token_batch_layout():
    tb = to_token_batch([[5, 6], [7]], [[8, 9, 1], [1]], [[-0.1, -0.2, -0.3], [-0.4]], pad_id=0)
    assert tb.input_ids_NS.tolist() == [[5, 6, 8, 9, 1], [7, 1, 0, 0, 0]]
    assert tb.targets_NS.tolist() == [[6, 8, 9, 1, 0], [1, 0, 0, 0, 0]]
    assert tb.loss_mask_NS.tolist() == [[False, True, True, True, False], [True, False, False, False, False]]
    assert tb.rollout_logp_NS[0, 1:4].tolist() == pytest.approx([-0.1, -0.2, -0.3])


def test_mini_batches_keep_prompt_groups_whole():
    from dynamo_mega.train import mini_batch_indices

    sizes = [2, 3, 1, 4, 2]
    parts = mini_batch_indices(sizes, 2)
    assert torch.cat(parts).tolist() == list(range(12))
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]  # prompts {0,1} and {2,3,4}
    with pytest.raises(ValueError, match="exceeds"):
        mini_batch_indices(sizes, 6)


def test_mixed_difficulty_splits():
    """Levels NxM (N operands in [0, M]) in equal shares as far as each level has problems (2x9: only 200),
    disjoint splits, every record labelled with its level and answered correctly."""
    from collections import Counter

    from dynamo_mega.tasks.arithmetic import make_splits

    levels = ["2x9", "3x9", "2x99"]
    train, held_out = make_splits(1500, 240, num_operands=3, operand_max=9, seed=7, levels=levels)
    assert Counter(r["level"] for r in held_out) == {"2x9": 80, "3x9": 80, "2x99": 80}
    assert Counter(r["level"] for r in train) == {"2x9": 120, "3x9": 690, "2x99": 690}
    assert not {r["id"] for r in train} & {r["id"] for r in held_out}
    for r in train[:50] + held_out[:50]:
        n_ops, top = map(int, r["level"].split("x"))
        numbers = [int(x) for x in r["prompt"].rstrip("=").replace("-", "+").split("+")]
        assert len(numbers) == n_ops and max(numbers) <= top
        assert eval(r["prompt"].rstrip("=")) == int(r["answer"])  # noqa: S307 - digits and +/- only
    assert len({r["level"] for r in held_out[:20]}) > 1  # interleaved: a prefix (run.eval_prompts) mixes levels
    # A level too large to list (3x99: 4M problems) is drawn; a smaller num_train keeps the same held-out set and
    # takes a subset of the larger split's train prompts (a warm-up on more prompts, RL on fewer).
    big_train, big_eval = make_splits(600, 60, num_operands=3, operand_max=9, seed=7, levels=["3x9", "3x99"])
    small_train, small_eval = make_splits(200, 60, num_operands=3, operand_max=9, seed=7, levels=["3x9", "3x99"])
    assert small_eval == big_eval and {r["id"] for r in small_train} <= {r["id"] for r in big_train}
    hard = [r for r in big_train if r["level"] == "3x99"]
    assert len(hard) == 300 and all(eval(r["prompt"].rstrip("=")) == int(r["answer"]) for r in hard)  # noqa: S307
    with pytest.raises(ValueError, match="distinct problems"):
        make_splits(1_000_000, 10, num_operands=2, operand_max=9, seed=7, levels=["2x9", "3x9"])
    with pytest.raises(ValueError, match="NxM"):
        make_splits(10, 10, num_operands=3, operand_max=9, seed=7, levels=["3"])


def test_mixed_difficulty_prompts_carry_their_level():
    train, held_out = load_splits(DataConfig(levels=["2x9", "3x9"], num_train=100, num_eval=40))
    assert {p.difficulty for p in held_out} == {"2x9", "3x9"} and all(p.difficulty for p in train)
    single, _ = load_splits(DataConfig(num_train=10, num_eval=5))
    assert {p.difficulty for p in single} == {"3x9"}


def test_file_rows_carry_their_difficulty_label(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": 1, "problem": "p1", "answer": "1", "level": 3.0}, {"id": 2, "problem": "p2", "answer": "2"}]))
    train, _ = load_splits(DataConfig(source="file", train_path=str(path), prompt_key="problem", difficulty_key="level"))
    assert [p.difficulty for p in train] == ["3.0", ""]
