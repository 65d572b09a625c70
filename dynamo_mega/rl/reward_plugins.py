"""The configured reward (algo.reward): a weighted sum of math-verify and user reward functions (docs/rewards.md).

A user function has the signature TRL's GRPOTrainer reward functions already have,
`fn(completions: list[str], **kwargs) -> list[float]`: `completions` are the response texts, and every keyword
is a list aligned with them: `prompts` (the text the policy saw) and each column of the sample's dataset row
(`answer`, the problem text under its own column name, any other column). Functions are named
"package.module:function" (importable from the working directory or PYTHONPATH) or "path/to/file.py:function".

They run in MathVerifyReward's process pool, in chunks of `chunk_size` completions with the same deadlines as
math-verify's pairs: a chunk gets `timeout_s` (algo.reward_timeout_s), a late chunk is re-run one completion per
task, and a single completion that still runs past `timeout_s` is a hang. A function that raises, hangs, or
returns the wrong number of values or a non-finite / non-number value stops the step with RewardFunctionError
naming it: a sample is never silently scored wrong for the function's failure. User results are not cached (a
function may read any column, or be random); math-verify's are, as before.

Success (what DynaMO's prompt statistics, probing and held-out accuracy count) is math-verify's verdict when
`math_verify` is one of the terms, else a total reward > 0.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from dynamo_mega.rl.reward import GRACE_S, MathVerifyReward

MATH_VERIFY = "math_verify"  # the built-in term: 1.0 for a correct answer, algo.wrong_reward otherwise


class RewardFunctionError(ValueError):
    """A user reward function raised, hung or returned something other than one finite number per completion.
    A ValueError: the user's code is at fault, so `dynamo-mega train` ends with its one line and exit code 2."""


class Scores(NamedTuple):
    rewards: list[float]  # the weighted sum per completion (what the advantages see)
    correct: list[bool]  # success per completion (module docstring)


def load_reward_fn(spec: str) -> Callable:
    """The function named by `spec` ("package.module:function" or "path/to/file.py:function"); ValueError
    naming algo.reward when it cannot be imported or is not callable (config.py makes it a ConfigError)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"algo.reward: {spec!r} is not 'module:function' (e.g. examples.format_reward:format_reward) or {MATH_VERIFY}"
        )
    try:
        module = _import(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raises while importing is their error
        raise ValueError(
            f"algo.reward: cannot import {module_name!r} for {spec!r} ({type(exc).__name__}: {exc}); give a module "
            "importable from the working directory or PYTHONPATH, or a file as path/to/file.py:function"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"algo.reward: {module_name!r} has no function {attr!r} (from {spec!r}); check the name")
    return fn


def _import(module_name: str):
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}")
        name = "_dynamo_mega_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]  # one per file, any process
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # before exec: dataclasses and pickling in the module look themselves up here
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        return sys.modules[name]
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` would: the working directory's modules
        sys.path.append(os.getcwd())
    return importlib.import_module(module_name)


def check_reward_terms(terms) -> None:
    """Config validation of algo.reward (a list of RewardTerm): non-empty, finite weights, each function
    importable. ValueError naming algo.reward otherwise (config.py: ConfigError, exit 2)."""
    if not terms:
        raise ValueError(f"algo.reward is empty: list at least one term, e.g. [{{fn: {MATH_VERIFY}, weight: 1.0}}]")
    seen = set()
    for term in terms:
        if not math.isfinite(term.weight):
            raise ValueError(f"algo.reward: the weight of {term.fn!r} is {term.weight}; use a finite number")
        if term.fn in seen:
            raise ValueError(f"algo.reward: {term.fn!r} is listed twice; list it once with the summed weight")
        seen.add(term.fn)
        if term.fn != MATH_VERIFY:
            load_reward_fn(term.fn)


# ---- pool worker side --------------------------------------------------------------------------------------------

_FNS: dict[str, Callable] = {}  # in a worker: the functions imported so far, by spec


class _CallTimeout(BaseException):  # BaseException: a user's `except Exception` does not swallow it
    pass


def call_user_fn(task: tuple[str, list[str], dict[str, list]], timeout_s: float) -> tuple[str, object]:
    """Pool worker: task = (spec, completions, kwargs). ("ok", floats), ("timeout", None) when the call ran past
    timeout_s (a timer on this process's main thread), or ("error", message)."""
    spec, completions, kwargs = task
    armed = [True]  # a timer firing after the call returned (before it is cleared) must not raise out of here

    def on_alarm(signum, frame):
        if armed[0]:
            raise _CallTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        if spec not in _FNS:
            _FNS[spec] = load_reward_fn(spec)
        values = _FNS[spec](list(completions), **kwargs)
        armed[0] = False
    except _CallTimeout:
        return "timeout", None
    except Exception as exc:  # noqa: BLE001 - the user's function failed: reported, named, to the trainer
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return "error", f"raised {type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno})"
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return _checked(values, len(completions))


def _checked(values, n: int) -> tuple[str, object]:
    """("ok", n floats) or ("error", what is wrong with the returned value)."""
    if not isinstance(values, (list, tuple)):
        return "error", f"returned a {type(values).__name__}; return a list of {n} floats, one per completion"
    if len(values) != n:
        return "error", f"returned {len(values)} values for {n} completions; return one float per completion"
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            return "error", f"returned {v!r} for completion {i}; every value must be a finite number"
    return "ok", [float(v) for v in values]


# ---- trainer side ------------------------------------------------------------------------------------------------


class ConfiguredReward:
    """Callable: (completions, answers, kwargs) -> Scores. terms: [(fn, weight)] from algo.reward; scorer: the
    math-verify scorer whose pool (workers, timeout_s, chunk_size, startup_s) every term runs in."""

    def __init__(self, terms: list[tuple[str, float]], scorer: MathVerifyReward):
        self.terms = [(fn, float(weight)) for fn, weight in terms]
        for fn, _ in self.terms:  # a ValueError here, not a RewardFunctionError in a worker at the first step
            if fn != MATH_VERIFY:
                load_reward_fn(fn)
        self.math = scorer

    @property
    def uses_columns(self) -> bool:
        """Whether any term is a user function (math-verify alone needs no dataset columns per sample)."""
        return any(fn != MATH_VERIFY for fn, _ in self.terms)

    @property
    def last_call_timeouts(self) -> int:  # math-verify pairs scored wrong on a timeout (a user function's is an error)
        return self.math.last_call_timeouts

    def __call__(self, completions: list[str], answers: list[str], kwargs: dict[str, list] | None = None) -> Scores:
        """kwargs: the user functions' keyword arguments, each a list aligned with completions. None: math-verify
        only, whatever the terms (benchmarks: pass@k is math-verify's verdict)."""
        if kwargs is None:
            ok = self.math.correctness(completions, answers)
            return Scores([1.0 if c else self.math.wrong_reward for c in ok], ok)
        assert len(answers) == len(completions), f"internal error: {len(answers)} answers for {len(completions)} completions"
        for key, values in kwargs.items():
            assert len(values) == len(completions), (
                f"internal error: kwarg {key!r} has {len(values)} values for {len(completions)} completions"
            )
        self.math.start_failed = False  # a new call: a pool that failed to start may be tried again
        total = [0.0] * len(completions)
        verdict: list[bool] | None = None
        for fn, weight in self.terms:
            if fn == MATH_VERIFY:
                verdict = self.math.correctness(completions, answers)
                values = [1.0 if c else self.math.wrong_reward for c in verdict]
            else:
                values = self._user_rewards(fn, completions, kwargs)
            total = [t + weight * v for t, v in zip(total, values, strict=True)]
        correct = verdict if verdict is not None else [t > 0 for t in total]
        return Scores(total, correct)

    def _user_rewards(self, fn: str, completions: list[str], kwargs: dict[str, list]) -> list[float]:
        """fn's rewards, in chunks on the pool; a late chunk re-run one completion per task (module docstring)."""
        size, workers, timeout_s = self.math.chunk_size, self.math.workers, self.math.timeout_s
        spans = [(a, min(a + size, len(completions))) for a in range(0, len(completions), size)]
        out: list[float | None] = [None] * len(completions)
        deadline = math.ceil(len(spans) / workers) * timeout_s + GRACE_S
        late = self._collect(fn, completions, kwargs, spans, deadline, out)
        for i in range(0, len(late), workers):
            wave = [(a, a + 1) for a in late[i : i + workers]]
            hung = self._collect(fn, completions, kwargs, wave, timeout_s + GRACE_S, out)
            if hung:
                raise RewardFunctionError(
                    f"reward function {fn} (algo.reward) ran past algo.reward_timeout_s={timeout_s}s on a single "
                    f"completion ({len(hung)} of {len(wave)} tried one by one), so the step stops rather than score it; "
                    "this is the function's fault: make it faster (or bound its own work), or raise algo.reward_timeout_s"
                )
        assert all(v is not None for v in out), "internal error: a completion left unscored"
        return out

    def _collect(self, fn, completions, kwargs, spans, deadline_s, out) -> list[int]:
        """Run fn on each span [a, b) within deadline_s, writing its values into out; returns the index of every
        completion in a span that was late. A pool that did not start, or a function error, raises."""
        tasks = [(fn, completions[a:b], {k: v[a:b] for k, v in kwargs.items()}) for a, b in spans]
        results = self.math.run(tasks, deadline_s, work=call_user_fn)
        if self.math.start_failed:
            raise RuntimeError(
                f"the reward pool did not start within {self.math.startup_s}s ({self.math.workers} workers); "
                "lower algo.reward_workers or check the machine's load"
            )
        late = []
        for (a, b), result in zip(spans, results, strict=True):
            if result is None or result[0] == "timeout":
                late.extend(range(a, b))
            elif result[0] == "error":
                raise RewardFunctionError(
                    f"reward function {fn} (algo.reward) {result[1]}, on a batch of {b - a} completions; this is the "
                    "function's fault, not dynamo-mega's: fix it (call it on a few completions and dataset rows)"
                )
            else:
                out[a:b] = result[1]
        return late

    def close(self) -> None:
        self.math.close()
