"""User reward functions (algo.reward, rl/reward_plugins.py) in the math-verify pool:

- a function that cannot be imported is a one-line ConfigError naming algo.reward and the function;
- math-verify + a weighted user function sum as configured, success stays math-verify's verdict, and with the
  default terms the rewards are math-verify's exactly;
- every keyword argument (the dataset's columns, `prompts`) reaches the function aligned with its completions,
  across chunks;
- a function that raises, hangs (also past its own timer) or returns the wrong length or a non-number stops the
  call with RewardFunctionError naming it, never a silent 0; the pool works again afterwards;
- the rollout service's scoring path (fake engine, generate_rollouts) hands each prompt's row to the function.
"""

from __future__ import annotations

import textwrap
import time

import pytest

from dynamo_mega.config import ConfigError, load_config
from dynamo_mega.data import Prompt, records_to_prompts, render_chat
from dynamo_mega.rl.reward import MathVerifyReward
from dynamo_mega.rl.reward_plugins import MATH_VERIFY, ConfiguredReward, RewardFunctionError

FORMAT = "examples/format_reward.py:format_reward"  # relative to the repository root, the tests' working directory
TIMEOUT_S = 1.0

PLUGINS = '''
import time


def echo_columns(completions, prompts, answer, bonus, **kwargs):
    """bonus + 10 * (completion == answer) + 100 * (prompt starts with 'Q:'): each value checks one alignment."""
    return [b + 10.0 * (c == a) + 100.0 * p.startswith("Q:") for c, p, a, b in zip(completions, prompts, answer, bonus)]


def raises(completions, **kwargs):
    raise ValueError("no reward for you")


def sleeps(completions, **kwargs):
    time.sleep(60)
    return [0.0] * len(completions)


def stuck(completions, **kwargs):
    while True:  # swallows its timer, as a C extension stuck in a loop would: the trainer must kill the worker
        try:
            time.sleep(60)
        except BaseException:
            pass


def short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def not_numbers(completions, **kwargs):
    return ["1.0"] * len(completions)


def not_finite(completions, **kwargs):
    return [float("nan")] * len(completions)
'''


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plugins") / "user_rewards.py"
    path.write_text(textwrap.dedent(PLUGINS))
    return str(path)


@pytest.fixture(scope="module")
def scorer():
    """One pool for the module (each start costs seconds); chunks of 2, so kwargs are sliced across chunks."""
    r = MathVerifyReward(workers=2, timeout_s=TIMEOUT_S, chunk_size=2, startup_s=60.0)
    yield r
    r.close()


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("examples/no_such_file.py:f", "cannot import 'examples/no_such_file.py'"),
        ("examples/format_reward.py:no_such_function", "has no function 'no_such_function'"),
        ("format_reward", "is not 'module:function'"),
    ],
)
def test_a_function_that_cannot_be_imported_is_a_config_error(spec, says):
    with pytest.raises(ConfigError) as exc:
        load_config("configs/tiny_cpu.yaml", [f"algo.reward=[{{fn: {MATH_VERIFY}}}, {{fn: '{spec}', weight: 0.1}}]"])
    message = str(exc.value)
    assert message.startswith("algo.reward") and says in message and "\n" not in message


def test_a_module_that_fails_on_import_is_a_config_error(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import no_such_dependency_xyz\n")
    with pytest.raises(ConfigError, match="ModuleNotFoundError: No module named 'no_such_dependency_xyz'"):
        load_config("configs/tiny_cpu.yaml", [f"algo.reward=[{{fn: '{bad}:f'}}]"])


def test_the_default_is_math_verify_alone_and_a_list_parses():
    assert [(t.fn, t.weight) for t in load_config("configs/tiny_cpu.yaml").algo.reward] == [(MATH_VERIFY, 1.0)]
    cfg = load_config("configs/tiny_cpu.yaml", [f"algo.reward=[{{fn: {MATH_VERIFY}}}, {{fn: {FORMAT}, weight: 0.1}}]"])
    assert [(t.fn, t.weight) for t in cfg.algo.reward] == [(MATH_VERIFY, 1.0), (FORMAT, 0.1)]
    with pytest.raises(ConfigError, match="algo.reward is empty"):
        load_config("configs/tiny_cpu.yaml", ["algo.reward=[]"])


COMPLETIONS = ["so \\boxed{8}", "\\boxed{7}", "8, I think", "\\boxed{8} or \\boxed{9}"]
ANSWERS = ["8", "8", "8", "8"]


def test_math_verify_plus_a_weighted_format_reward(scorer):
    only_math = ConfiguredReward([(MATH_VERIFY, 1.0)], scorer)(COMPLETIONS, ANSWERS, {"prompts": ["q"] * 4})
    correct = scorer.correctness(COMPLETIONS, ANSWERS)
    assert only_math.correct == correct and only_math.rewards == [1.0 if ok else 0.0 for ok in correct]
    assert correct[:2] == [True, False]

    both = ConfiguredReward([(MATH_VERIFY, 1.0), (FORMAT, 0.1)], scorer)
    scores = both(COMPLETIONS, ANSWERS, {"prompts": ["q"] * 4})
    fmt = [1.0, 1.0, 0.0, 0.0]  # exactly one \boxed{...}
    assert scores.rewards == pytest.approx([float(ok) + 0.1 * f for ok, f in zip(correct, fmt)])
    assert scores.correct == correct  # a formatted wrong answer (0.1) is still a failure for the statistics

    alone = ConfiguredReward([(FORMAT, 2.0)], scorer)(COMPLETIONS, ANSWERS, {"prompts": ["q"] * 4})
    assert alone.rewards == [2.0, 2.0, 0.0, 0.0] and alone.correct == [True, True, False, False]  # total > 0

    benchmark = both(COMPLETIONS, ANSWERS, None)  # no kwargs: math-verify only (pass@k)
    assert benchmark.rewards == only_math.rewards and benchmark.correct == correct

    # Math-verify alone reads no dataset columns: the rollout service passes {} (no per-sample columns gathered),
    # and the term's weight still applies.
    doubled = ConfiguredReward([(MATH_VERIFY, 2.0)], scorer)
    assert not doubled.uses_columns and both.uses_columns
    assert doubled(COMPLETIONS, ANSWERS, {}).rewards == [2.0 * r for r in only_math.rewards]


class _ChatTemplate:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<user>" + messages[-1]["content"]


def test_kwargs_carry_the_dataset_columns_aligned_with_completions(scorer, plugins):
    rows = [{"id": f"p{i}", "question": f"{i}+1", "answer": str(i + 1), "bonus": 0.5 * i, "prompts": "dropped"} for i in range(3)]
    prompts = records_to_prompts(rows, prompt_key="question", answer_key="answer", id_key="id", source="test")
    assert render_chat(prompts, _ChatTemplate(), "")[2].columns == rows[2]  # the row survives the chat template
    rendered = [Prompt(p.id, ("Q: " if i != 1 else "") + p.prompt, p.answer, columns=p.columns) for i, p in enumerate(prompts)]
    kwargs_P = [p.reward_kwargs() for p in rendered]
    assert kwargs_P[0] == {"id": "p0", "question": "0+1", "answer": "1", "bonus": 0.0, "prompts": "Q: 0+1"}
    # Five samples over three prompts (1, 3 and 1 samples), in chunks of 2: every value must stay with its sample.
    owner_S = [0, 1, 1, 1, 2]
    completions = ["1", "2", "x", "2", "9"]
    kwargs = {key: [kwargs_P[i][key] for i in owner_S] for key in kwargs_P[0]}
    answers = [rendered[i].answer for i in owner_S]
    scores = ConfiguredReward([(f"{plugins}:echo_columns", 1.0)], scorer)(completions, answers, kwargs)
    expected = [0.0 + 10 + 100, 0.5 + 10, 0.5, 0.5 + 10, 1.0 + 100]
    assert scores.rewards == expected


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("raises", "raised ValueError: no reward for you (at "),
        ("short", "returned 1 values for 2 completions"),
        ("not_numbers", "returned '1.0' for completion 0"),
        ("not_finite", "returned nan for completion 0"),
    ],
)
def test_a_failing_function_is_named_never_scored_zero(scorer, plugins, name, says):
    spec = f"{plugins}:{name}"
    with pytest.raises(RewardFunctionError) as exc:
        ConfiguredReward([(MATH_VERIFY, 1.0), (spec, 1.0)], scorer)(COMPLETIONS, ANSWERS, {"prompts": ["q"] * 4})
    message = str(exc.value)
    assert f"reward function {spec} (algo.reward)" in message and says in message and "function's fault" in message


@pytest.mark.parametrize("name", ["sleeps", "stuck"])
def test_a_hanging_function_fails_the_call_within_its_deadlines(scorer, plugins, name):
    spec = f"{plugins}:{name}"
    reward = ConfiguredReward([(spec, 1.0)], scorer)
    scorer.correctness(["\\boxed{1}"], ["1"])  # the pool is up: the deadlines below exclude its start-up
    t0 = time.monotonic()
    with pytest.raises(RewardFunctionError) as exc:
        reward(COMPLETIONS, ANSWERS, {"prompts": ["q"] * 4})
    elapsed = time.monotonic() - t0
    assert f"reward function {spec} (algo.reward) ran past algo.reward_timeout_s={TIMEOUT_S}s" in str(exc.value)
    # chunks of 2 on 2 workers: one wave of chunks, then one wave of single completions (+ a pool restart when stuck)
    assert elapsed < 2 * (TIMEOUT_S + 0.5) + (scorer.startup_s if name == "stuck" else 0.0)
    fine = ConfiguredReward([(FORMAT, 1.0)], scorer)(COMPLETIONS, ANSWERS, {"prompts": ["q"] * 4})
    assert fine.rewards == [1.0, 1.0, 0.0, 0.0]  # the pool scores again after the failure


class _Tokenizer:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]

    def get_vocab(self):
        return {}


class _Engine:
    """Sample j of a prompt: token ids [j]; decoded below to a boxed answer (right for even j) or to no box."""

    version = 4

    def generate(self, prompts, counts, *, max_new_tokens, temperature, top_p, stop_token_ids, seed):
        from dynamo_mega.rl.engines.vllm_engine import Completion

        return [[Completion([j], [0.0], True) for j in range(n)] for n in counts]

    def sleep(self):
        pass

    def close(self):
        pass


def test_the_rollout_service_scores_with_the_configured_reward(scorer, plugins):
    from dynamo_mega.rl.rollout import generate_rollouts
    from dynamo_mega.rl.rollout_service import RolloutService

    prompts = [Prompt(f"p{i}", f"Q: {i}+{i}=", str(2 * i), columns={"answer": str(2 * i), "bonus": float(i)}) for i in range(3)]
    answer_of = {}

    def decode(token_ids_S):  # the sample's prompt is known from its position: groups of counts[i], in order
        return [
            f"\\boxed{{{answer_of[s] if ids[0] % 2 == 0 else -1}}}" if ids[0] < 2 else "none" for s, ids in enumerate(token_ids_S)
        ]

    counts = [2, 3, 1]
    answer_of.update({s: p.answer for s, p in enumerate(p for p, n in zip(prompts, counts) for _ in range(n))})
    terms = [(MATH_VERIFY, 1.0), (f"{plugins}:echo_columns", 0.01)]
    service = RolloutService(
        replica_size=1,
        start_engine=lambda replica: _Engine(),
        make_reward=lambda: ConfiguredReward(terms, scorer),
        decode=decode,
        weights=None,
        max_restarts=0,
    )
    batch = generate_rollouts(
        service, _Tokenizer(), prompts, counts, max_new_tokens=1, temperature=1.0, top_p=1.0, seed=0, score=True
    )
    texts = decode([[j] for n in counts for j in range(n)])
    correct = [True, False, True, False, False, True]
    assert batch.correct == correct
    bonus = [0.0, 0.0, 1.0, 1.0, 1.0, 2.0]  # each sample's own prompt's column
    assert texts[0] == "\\boxed{0}" and texts[4] == "none"
    assert batch.rewards == pytest.approx([float(ok) + 0.01 * (b + 100.0) for ok, b in zip(correct, bonus)])

    bad = RolloutService(
        replica_size=1,
        start_engine=lambda replica: _Engine(),
        make_reward=lambda: ConfiguredReward([(f"{plugins}:raises", 1.0)], scorer),
        decode=decode,
        weights=None,
        max_restarts=0,
    )
    with pytest.raises(RewardFunctionError, match="raises \\(algo.reward\\) raised ValueError"):
        generate_rollouts(bad, _Tokenizer(), prompts, counts, max_new_tokens=1, temperature=1.0, top_p=1.0, seed=0, score=True)
