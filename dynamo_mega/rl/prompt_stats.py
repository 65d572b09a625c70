"""Per-prompt outcome statistics that drive DynaMO's rollout allocation (ALGORITHM.md section 1).

Statistics are keyed by a stable, unique prompt id (a string), never by a row number or a batch
position: the reference code lost track of which outcomes belonged to which prompt (defects 2 and 4)
and forgot everything on resume (defect 3). Here every sample carries its own id into `update`, and
the whole state round-trips through a JSON-serialisable `state_dict`.

Two views of the same history are kept, because the two allocation modes want different things:
- decayed counts (successes, rollouts, response lengths), multiplied by `decay` each time the prompt itself
  is visited again (just before that visit's outcomes are added), read through a Beta(prior_alpha,
  prior_beta) prior: the `optimal` and `probing` modes' estimates. History goes stale because the policy
  moved between two visits of the prompt, not because other prompts were trained on: a prompt returns once
  per epoch (55 steps in the quick start), and decaying on the global step clock erased its history
  (0.95^55 = 6%) before it was ever read;
- cumulative integer counts plus a snapshot of them taken by `refresh_priorities()` at each epoch
  boundary: the `reference` mode reproduces the paper's code, which reads stale per-epoch history.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

STATE_VERSION = 2  # 1: decay ran on the global step clock (still loaded, see load_state_dict)
_MAX_ROWS_IN_ERROR = 10


def validate_prompt_ids(ids: Sequence) -> None:
    """Raise ValueError naming the rows whose prompt id is missing, malformed or duplicated.

    ids_D: one id per dataset row. Valid ids are non-empty strings or integers (not bools); an
    integer and its decimal string count as the same id, because statistics are keyed by str(id).
    Dataset loaders call this once, so a bad dataset fails before any rollout is spent.
    """
    missing: list[int] = []
    first_row: dict[str, int] = {}
    duplicates: list[tuple[int, int, str]] = []
    for row, raw in enumerate(ids):
        key = _id_key(raw)
        if key is None:
            missing.append(row)
        elif key in first_row:
            duplicates.append((first_row[key], row, key))
        else:
            first_row[key] = row
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} row(s) have a missing or invalid prompt id (rows {_head(missing)})"
        )
    if duplicates:
        pairs = ", ".join(f"rows {a} and {b} share id {k!r}" for a, b, k in duplicates[:_MAX_ROWS_IN_ERROR])
        more = "" if len(duplicates) <= _MAX_ROWS_IN_ERROR else f", and {len(duplicates) - _MAX_ROWS_IN_ERROR} more"
        problems.append(f"{len(duplicates)} duplicate prompt id(s): {pairs}{more}")
    if problems:
        raise ValueError(
            "prompt ids must be present and unique, because rollout statistics are keyed by them: "
            + "; ".join(problems)
            + ". Give every row a stable unique id (e.g. a hash of the prompt text and answer)."
        )


def _id_key(raw: object) -> str | None:
    """str key of a valid id, None for a missing or invalid one (None, NaN, bool, empty, float)."""
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, (int, np.integer)):
        return str(int(raw))
    if isinstance(raw, str):
        return raw if raw.strip() else None
    return None  # floats (pandas turns missing ints into NaN floats), bytes, objects


def _head(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_IN_ERROR])
    return shown + (", ..." if len(rows) > _MAX_ROWS_IN_ERROR else "")


class PromptStats:
    """Outcome history per prompt id; see the module docstring for the two views it keeps.

    Arrays are indexed by a row per known prompt (`_row[id]`); an update touches only the prompts in
    the batch. `visits[row]` counts the update() calls that included the prompt, `last_step[row]` the
    last of them.
    """

    _FLOAT_FIELDS = ("successes", "rollouts", "length_sum", "length_count")
    _INT_FIELDS = ("last_step", "visits", "cum_successes", "cum_rollouts", "ref_successes", "ref_rollouts")

    def __init__(self, prior_alpha: float = 1.0, prior_beta: float = 1.0, decay: float = 1.0) -> None:
        if not (math.isfinite(prior_alpha) and math.isfinite(prior_beta)) or prior_alpha <= 0 or prior_beta <= 0:
            raise ValueError(
                f"prior_alpha and prior_beta must be finite and > 0 (got {prior_alpha}, {prior_beta}); "
                "they are pseudo-counts of successes and failures, e.g. 0.5 and 0.5"
            )
        if not (0.0 < decay <= 1.0):
            raise ValueError(
                f"decay must be in (0, 1] (got {decay}); it multiplies a prompt's history at each of its visits: "
                "1.0 keeps everything, 0.5 halves the weight of older visits"
            )
        self.prior_alpha = float(prior_alpha)
        self.prior_beta = float(prior_beta)
        self.decay = float(decay)
        self.step = 0  # number of update() calls so far
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._f = {name: np.zeros(0, dtype=np.float64) for name in self._FLOAT_FIELDS}
        self._i = {name: np.zeros(0, dtype=np.int64) for name in self._INT_FIELDS}

    def __len__(self) -> int:
        return len(self._ids)

    # ------------------------------------------------------------------ updates
    def update(self, prompt_ids: Sequence[str], correct: Sequence[float], response_lengths: Sequence[int]) -> None:
        """Add one step's outcomes; sample s of the batch is (prompt_ids[s], correct[s], response_lengths[s]).

        prompt_ids_S: the prompt id of each sample (repeated n_i times, any order);
        correct_S: success of each sample in [0, 1] (map rewards first, e.g. reward > 0);
        response_lengths_S: generated tokens of each sample, >= 0.
        Call it once per training step: each call is one visit of every prompt it names, and a visit first
        multiplies that prompt's earlier (decayed) history by `decay`.
        """
        ids = list(prompt_ids)
        correct_S = np.asarray(correct, dtype=np.float64).reshape(-1)
        lengths_S = np.asarray(response_lengths, dtype=np.float64).reshape(-1)
        if not (len(ids) == correct_S.size == lengths_S.size):
            raise ValueError(
                f"update() needs one prompt id, one correctness value and one length per sample; got "
                f"{len(ids)} ids, {correct_S.size} correctness values, {lengths_S.size} lengths"
            )
        _check_samples(ids, correct_S, lengths_S)
        self.step += 1
        rows_S = np.array([self._row_of(pid) for pid in ids], dtype=np.int64)
        touched = np.unique(rows_S)
        if self.decay < 1.0:
            for name in self._FLOAT_FIELDS:
                self._f[name][touched] *= self.decay
        self._i["visits"][touched] += 1
        self._i["last_step"][touched] = self.step
        np.add.at(self._f["successes"], rows_S, correct_S)
        np.add.at(self._f["rollouts"], rows_S, 1.0)
        np.add.at(self._f["length_sum"], rows_S, lengths_S)
        np.add.at(self._f["length_count"], rows_S, 1.0)
        # the reference mode reads integer counts, as the paper's code did: round fractional credit
        np.add.at(self._i["cum_successes"], rows_S, np.rint(correct_S).astype(np.int64))
        np.add.at(self._i["cum_rollouts"], rows_S, 1)

    def refresh_priorities(self) -> None:
        """Snapshot the cumulative counts for the `reference` mode; call once at each epoch start."""
        self._i["ref_successes"][:] = self._i["cum_successes"]
        self._i["ref_rollouts"][:] = self._i["cum_rollouts"]

    def _row_of(self, pid: str) -> int:
        row = self._row.get(pid)
        if row is None:
            row = len(self._ids)
            self._row[pid] = row
            self._ids.append(pid)
            if row >= self._f["successes"].size:
                self._grow(max(16, 2 * row))
        return row

    def _grow(self, capacity: int) -> None:
        for store in (self._f, self._i):
            for name, arr in store.items():
                bigger = np.zeros(capacity, dtype=arr.dtype)
                bigger[: arr.size] = arr
                store[name] = bigger

    # ------------------------------------------------------------------ reads
    def counts(self, prompt_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(successes_N, rollouts_N): decayed counts, zeros for unseen prompts (no prior)."""
        rows_N, known_N = self._lookup(prompt_ids)
        succ_N = np.zeros(len(rows_N))
        roll_N = np.zeros(len(rows_N))
        r = rows_N[known_N]
        succ_N[known_N] = self._f["successes"][r]
        roll_N[known_N] = self._f["rollouts"][r]
        return succ_N, roll_N

    def visits(self, prompt_ids: Sequence[str]) -> np.ndarray:
        """visits_N: update() calls that included each prompt (0 for unseen prompts)."""
        rows_N, known_N = self._lookup(prompt_ids)
        out_N = np.zeros(len(rows_N), dtype=np.int64)
        out_N[known_N] = self._i["visits"][rows_N[known_N]]
        return out_N

    def success_means(self, prompt_ids: Sequence[str]) -> np.ndarray:
        """p_N: posterior mean success rate a / (a + b) per prompt (the prior mean for unseen prompts)."""
        succ_N, roll_N = self.counts(prompt_ids)
        return (self.prior_alpha + succ_N) / (self.prior_alpha + self.prior_beta + roll_N)

    def variance_estimates(
        self,
        prompt_ids: Sequence[str],
        extra_successes: Sequence[float] | None = None,
        extra_rollouts: Sequence[float] | None = None,
    ) -> np.ndarray:
        """P_N: posterior mean of p(1-p) per prompt, under Beta(prior) updated with the decayed history.

        With a = prior_alpha + successes and b = prior_beta + failures, E[p(1-p)] = a*b / ((a+b)(a+b+1)):
        always in (0, 1/4], so unseen and always-right/always-wrong prompts get a small honest weight,
        and for long histories it approaches the unbiased k(G-k)/(G(G-1)) of ALGORITHM.md.
        extra_*_N: outcomes not yet in the history (in-step probes), counted without storing them.
        """
        succ_N, roll_N = self.counts(prompt_ids)
        if extra_successes is not None or extra_rollouts is not None:
            if extra_successes is None or extra_rollouts is None:
                raise ValueError("pass both extra_successes and extra_rollouts, or neither")
            succ_N = succ_N + np.asarray(extra_successes, dtype=np.float64)
            roll_N = roll_N + np.asarray(extra_rollouts, dtype=np.float64)
        a_N = self.prior_alpha + succ_N
        b_N = self.prior_beta + (roll_N - succ_N)
        return a_N * b_N / ((a_N + b_N) * (a_N + b_N + 1.0))

    def reference_counts(self, prompt_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(k_N, G_N): integer successes and rollouts as of the last refresh_priorities() call."""
        rows_N, known_N = self._lookup(prompt_ids)
        k_N = np.zeros(len(rows_N), dtype=np.int64)
        g_N = np.zeros(len(rows_N), dtype=np.int64)
        k_N[known_N] = self._i["ref_successes"][rows_N[known_N]]
        g_N[known_N] = self._i["ref_rollouts"][rows_N[known_N]]
        return k_N, g_N

    def expected_lengths(self, prompt_ids: Sequence[str], default: float = 1.0) -> np.ndarray:
        """L_N: mean response length per prompt; unseen prompts get the mean over seen prompts, else `default`."""
        rows_N, known_N = self._lookup(prompt_ids)
        n = len(self._ids)
        cnt = self._f["length_count"][:n]
        seen = cnt > 0
        fallback = float(self._f["length_sum"][:n][seen].sum() / cnt[seen].sum()) if seen.any() else float(default)
        out_N = np.full(len(rows_N), fallback)
        r = rows_N[known_N]
        ok = self._f["length_count"][r] > 0  # decay scales sum and count alike: the ratio needs no decay
        out_N[np.flatnonzero(known_N)[ok]] = self._f["length_sum"][r][ok] / self._f["length_count"][r][ok]
        return out_N

    def _lookup(self, prompt_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        rows_N = np.array([self._row.get(pid, -1) for pid in prompt_ids], dtype=np.int64)
        return rows_N, rows_N >= 0

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Plain-python, JSON-serialisable state (columns per field, one entry per known prompt)."""
        n = len(self._ids)
        state: dict = {
            "version": STATE_VERSION,
            "config": {"prior_alpha": self.prior_alpha, "prior_beta": self.prior_beta, "decay": self.decay},
            "step": self.step,
            "ids": list(self._ids),
        }
        for name in self._FLOAT_FIELDS:
            state[name] = [float(x) for x in self._f[name][:n]]
        for name in self._INT_FIELDS:
            state[name] = [int(x) for x in self._i[name][:n]]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Replace all history with `state`; prior and decay stay as constructed (the resumed run's config)."""
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(
                f"prompt statistics have state version {state.get('version')!r}, this code reads 1 and {STATE_VERSION}"
            )
        if state["version"] == 1:
            state = _upgrade_v1(state)
        ids = [str(x) for x in state["ids"]]
        validate_prompt_ids(ids)
        n = len(ids)
        for name in self._FLOAT_FIELDS + self._INT_FIELDS:
            if len(state[name]) != n:
                raise ValueError(f"prompt statistics state is corrupt: field {name!r} has {len(state[name])} "
                                 f"entries for {n} prompt ids")
        self.step = int(state["step"])
        self._ids = ids
        self._row = {pid: row for row, pid in enumerate(ids)}
        self._f = {name: np.array(state[name], dtype=np.float64).reshape(n) for name in self._FLOAT_FIELDS}
        self._i = {name: np.array(state[name], dtype=np.int64).reshape(n) for name in self._INT_FIELDS}


def _upgrade_v1(state: dict) -> dict:
    """Version-1 state (decay on the global step clock, applied lazily) as version 2: pending decay applied
    with the old rule, so the counts are what that run would have read; visits unknown, set to 1 if seen."""
    decay = float(state["config"]["decay"])
    factor = [decay ** (int(state["step"]) - int(last)) for last in state["last_step"]]
    out = dict(state, version=STATE_VERSION, visits=[1 if r > 0 else 0 for r in state["cum_rollouts"]])
    for name in PromptStats._FLOAT_FIELDS:
        out[name] = [float(v) * f for v, f in zip(state[name], factor, strict=True)]
    return out


def _check_samples(ids: list, correct_S: np.ndarray, lengths_S: np.ndarray) -> None:
    bad_ids = [s for s, pid in enumerate(ids) if not isinstance(pid, str) or not pid.strip()]
    if bad_ids:
        raise ValueError(
            f"prompt ids must be non-empty strings; samples {_head(bad_ids)} are not "
            "(convert ids with str() where the dataset is loaded)"
        )
    bad_c = np.flatnonzero(~np.isfinite(correct_S) | (correct_S < 0) | (correct_S > 1)).tolist()
    if bad_c:
        raise ValueError(
            f"correct values must lie in [0, 1]; samples {_head(bad_c)} do not (map rewards such as -1/0/1 "
            "to success first, e.g. correct = reward > 0)"
        )
    bad_l = np.flatnonzero(~np.isfinite(lengths_S) | (lengths_S < 0)).tolist()
    if bad_l:
        raise ValueError(f"response lengths must be finite and >= 0; samples {_head(bad_l)} are not")
