"""Ground truth of the six benchmarks, as extracted per the manifest, checked with math-verify in the reward's
process pool: every gold answer verifies against itself written as a model would (\\boxed{...}), and known-wrong
answers do not. Then the scoring/report plumbing of evaluate_benchmarks with a scripted engine (known right and
wrong responses -> known pass@k), and the Qwen chat-template prompts with the real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamo_mega.config import EvalConfig
from dynamo_mega.eval.benchmarks import BENCHMARKS, last_boxed, load_benchmark
from dynamo_mega.eval.passk import mean_pass_at_k
from dynamo_mega.eval.runner import evaluate_benchmarks, render_prompts
from dynamo_mega.rl.engines.vllm_engine import Completion
from dynamo_mega.rl.reward import MathVerifyReward
from dynamo_mega.rl.rollout import stop_token_ids

QWEN_DIR = str(Path(__file__).resolve().parents[1] / "data" / "tokenizers" / "qwen2.5-math-1.5b")

EXPECTED_ROWS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva_math": 272, "olympiadbench": 675}


@pytest.fixture(scope="module")
def reward():
    r = MathVerifyReward(workers=2, timeout_s=30.0)
    yield r
    r.close()


def _as_response(answer: str, phrasing: int = 0) -> str:
    lead = ("Let me think step by step. ... So the final answer is", "Therefore the answer is")[phrasing]
    return f"{lead} \\boxed{{{answer}}}."


def _verified(reward, answers_written: list[str], golds: list[str]) -> list[bool]:
    """math-verify's per-call alarm (5 s) can fire on a trivial string when the 2 CPU cores are oversubscribed;
    a false result is re-checked once with another phrasing (the reward caches by exact text), so a real mismatch
    still fails twice."""
    ok = reward.correctness([_as_response(a) for a in answers_written], golds)
    again = [i for i, good in enumerate(ok) if not good]
    retried = reward.correctness([_as_response(answers_written[i], 1) for i in again], [golds[i] for i in again])
    for i, good in zip(again, retried):
        ok[i] = good
    return ok


def test_extraction_follows_the_manifest():
    assert {name: len(load_benchmark(name)) for name in BENCHMARKS} == EXPECTED_ROWS
    aime24 = {p.id: p.answer for p in load_benchmark("aime24")}
    assert all(a == str(int(a)) for a in aime24.values())  # zero padding removed ("025" -> "25")
    assert load_benchmark("amc23")[0].answer == "27"  # JSON float 27.0
    assert load_benchmark("aime25", limit=3)[0].answer == "70"
    olympiad = load_benchmark("olympiadbench")
    assert olympiad[1].answer == "\\frac{1}{2 n+2}"  # "$\\frac{1}{2 n+2}$" without the $ delimiters
    assert not any(p.answer.startswith("$") or p.answer.endswith("$") for p in olympiad)
    assert load_benchmark("minerva_math")[0].answer == "1.6"  # last \boxed{} of the solution, unit outside
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} cm") == "\\frac{a}{b^{2}}"
    assert last_boxed("no box") is None and last_boxed("\\boxed{unbalanced") is None
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("gsm8k")


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_gold_answer_verifies_against_itself(reward, name):
    problems = load_benchmark(name)
    ok = _verified(reward, [p.answer for p in problems], [p.answer for p in problems])
    failed = [(p.id, p.answer) for p, good in zip(problems, ok) if not good]
    assert not failed, f"{len(failed)} gold answers of {name} do not verify against themselves: {failed[:5]}"


def _wrong_answer(problems, i: int) -> str:
    """The next problem's answer whose text differs from problem i's (also ignoring an 'x=' prefix)."""
    own = problems[i].answer.removeprefix("x=")
    for j in range(1, len(problems)):
        other = problems[(i + j) % len(problems)].answer
        if other.removeprefix("x=") != own:
            return other
    raise AssertionError("all answers equal")


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_known_wrong_answers_do_not_verify(reward, name):
    problems = load_benchmark(name, limit=24)  # math-verify on long mismatched expressions is slow: a slice
    wrong = [_wrong_answer(problems, i) for i in range(len(problems))]
    ok = reward.correctness([_as_response(w) for w in wrong], [p.answer for p in problems])
    passed = [(p.id, p.answer, w) for p, w, good in zip(problems, wrong, ok) if good]
    assert not passed, f"wrong answers accepted on {name}: {passed[:5]}"
    if name in ("aime24", "aime25", "amc23"):  # integer answers: off by one must fail on every row
        everything = load_benchmark(name)
        off_by_one = [str(int(p.answer) + 1) for p in everything]
        assert not any(reward.correctness([_as_response(w) for w in off_by_one], [p.answer for p in everything]))


class ScriptedEngine:
    """Answers problem i correctly in the first `correct[i]` of its samples, wrongly after."""

    version = 0

    def __init__(self, tokenizer, answers: list[str], correct: list[int]):
        self.tokenizer, self.answers, self.correct = tokenizer, answers, correct

    def generate(self, prompts, counts, *, max_new_tokens, temperature, top_p=1.0, stop_token_ids=None, seed=None):
        assert len(prompts) == len(self.answers)
        groups = []
        for answer, right, n in zip(self.answers, self.correct, counts):
            texts = [f"\\boxed{{{answer}}}" if j < right else "\\boxed{-123456789}" for j in range(n)]
            groups.append([Completion(self.tokenizer.encode(t), [0.0] * 3, True) for t in texts])
        return groups


def _service(engine, reward, tokenizer):
    """One replica around the scripted engine, scoring with the real math-verify pool."""
    from dynamo_mega.rl.reward_plugins import MATH_VERIFY, ConfiguredReward
    from dynamo_mega.rl.rollout_service import RolloutService

    return RolloutService(
        replica_size=1,
        start_engine=lambda replica: engine,
        make_reward=lambda: ConfiguredReward([(MATH_VERIFY, 1.0)], reward),
        decode=lambda token_ids: tokenizer.batch_decode(token_ids, skip_special_tokens=True),
        weights=None,
        max_restarts=0,
    )


def test_evaluate_benchmarks_reports_scripted_accuracy(reward, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    cfg = EvalConfig(benchmarks=["amc23"], samples=4, k=[1, 2, 4], temperature=1.0, max_problems=3)
    problems = load_benchmark("amc23", limit=3)
    correct = [0, 1, 4]
    engine = ScriptedEngine(tokenizer, [p.answer for p in problems], correct)
    metrics = evaluate_benchmarks(_service(engine, reward, tokenizer), tokenizer, cfg, step=7, output_dir=tmp_path)
    for k in (1, 2, 4):
        assert metrics[f"amc23/pass@{k}"] == pytest.approx(mean_pass_at_k(4, correct, k))
    assert metrics["amc23/pass@1"] == pytest.approx(5 / 12) and metrics["mean/pass@4"] == pytest.approx(2 / 3)
    report = json.loads((tmp_path / "step_000007.json").read_text())
    assert report["benchmarks"][0]["correct_counts"] == correct
    assert "| amc23 | 3 | 0.4167 |" in (tmp_path / "step_000007.md").read_text()
    assert len((tmp_path / "step_000007_samples.jsonl").read_text().splitlines()) == 12


def test_prompts_use_the_qwen_math_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    (problem,) = load_benchmark("aime25", limit=1)
    (ids,) = render_prompts(tokenizer, [problem], "Please reason step by step, and put your final answer within \\boxed{}.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nPlease reason step by step")
    assert "<|im_start|>user\nFind the sum of all integer bases" in text and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)


def test_prompts_longer_than_the_engine_context_fail_before_generating(reward, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    cfg = EvalConfig(benchmarks=["aime25"], max_problems=2)
    engine = ScriptedEngine(tokenizer, ["70", "588"], [1, 1])
    with pytest.raises(ValueError, match="max_model_len=64"):
        evaluate_benchmarks(_service(engine, reward, tokenizer), tokenizer, cfg, step=0, output_dir=tmp_path, max_model_len=64)
