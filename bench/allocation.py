"""Benchmark: how close each allocation mode gets to the variance-optimal rollout allocation.

Part 1 (proxy). A simulated run: a dataset of D prompts with TRUE pass rates p_i(t), visited in
shuffled epochs of N prompts per step, budget 16 N rollouts per step. Every mode allocates from the
ESTIMATES it would have in training (its own PromptStats, fed with the Bernoulli outcomes its own
allocation produced; `reference` reads the epoch-refreshed cumulative history, probing spends n_low
probes first). Scored with the true rates: V(n) = sum_i p_i (1 - p_i) / n_i, against V_uniform (equal
split) and V_oracle (the exact optimum computed from the true p_i), summed over steps:
    ratio_uniform = sum_t V_t / sum_t V_uniform_t,   ratio_oracle = sum_t V_t / sum_t V_oracle_t.
Scenarios: static mix (30% never solved, 20% always solved, rest Beta(2, 2)), static Beta(2, 2) (no
degenerate prompts), drifting (each p_i follows a logistic learning curve over the run). Bounds 8..24
(the paper's) and 2..64. Also a prior-strength sweep for the `optimal` mode.

Part 2 (does the proxy track real gradient variance?). A tiny softmax bandit policy in torch: prompt i is
a K-armed bandit whose correct arms have total probability p_i. For allocations of one static-mix batch
(uniform, reference, optimal, oracle) the Monte Carlo variance (trace of the covariance) of the batch
policy gradient is measured for three estimators: per-prompt-mean REINFORCE with a leave-one-out
baseline (the estimator the proxy is derived for), per-prompt-mean GRPO (mean/std-normalised
advantages), and GRPO with the trainer's global token-mean. Reported as ratios to uniform, next to
the proxy's ratio.

    python bench/allocation.py            # writes bench/results/allocation.{json,md}
    python bench/allocation.py --quick    # small sizes, smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dynamo_mega.rl.allocation import (
    allocate,
    allocate_with_probes,
    optimal_counts,
    uniform_counts,
)
from dynamo_mega.rl.prompt_stats import PromptStats

RESULTS = Path(__file__).resolve().parent / "results"
AVG_ROLLOUTS = 16
BOUNDS = ((8, 24), (2, 64))


@dataclass(frozen=True)
class ModeSpec:
    """One allocation configuration as the trainer would run it."""

    name: str
    mode: str  # uniform | reference | optimal
    prior: float = 0.5  # Beta(prior, prior)
    decay: float = 1.0
    probe: bool = False


MODES = (
    ModeSpec("uniform", "uniform"),
    ModeSpec("reference", "reference"),
    ModeSpec("optimal", "optimal"),
    ModeSpec("optimal_decay0.8", "optimal", decay=0.8),
    ModeSpec("probing", "optimal", probe=True),
    ModeSpec("probing_decay0.8", "optimal", decay=0.8, probe=True),
)
ESTIMATORS = ("reinforce_loo_prompt_mean", "grpo_prompt_mean", "grpo_token_mean")
PRIOR_SWEEP = tuple(
    ModeSpec(f"optimal_prior{a}_decay{dec}", "optimal", prior=a, decay=dec)
    for dec in (1.0, 0.8, 0.5)
    for a in (0.1, 0.25, 0.5, 1.0)
)


# ---------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    name: str
    pass_rate: Callable[[int], np.ndarray]  # step -> p_D (true pass rates of all D prompts)


def static_mix(rng: np.random.Generator, d: int) -> np.ndarray:
    """p_D: 30% never solved, 20% always solved, 50% Beta(2, 2), shuffled."""
    p = np.concatenate([np.zeros(int(0.3 * d)), np.ones(int(0.2 * d)), rng.beta(2, 2, d - int(0.3 * d) - int(0.2 * d))])
    return rng.permutation(p)


def drifting_curves(rng: np.random.Generator, d: int, steps: int) -> Callable[[int], np.ndarray]:
    """step -> p_D: p_i(t) = sigmoid(a_i + s_i t / steps): most prompts improve, at different speeds.

    Starting logits a ~ N(-2.5, 2) (many prompts start unsolved, a few start solved); slopes
    s ~ U(0, 8) (some never move, the fastest gain 8 logits over the run).
    """
    a_D = rng.normal(-2.5, 2.0, d)
    s_D = rng.uniform(0.0, 8.0, d)
    return lambda t: 1.0 / (1.0 + np.exp(-(a_D + s_D * t / steps)))


SCENARIOS = ("static_mix", "static_beta22", "drifting")


def scenarios(rng: np.random.Generator, d: int, steps: int) -> list[Scenario]:
    mix = static_mix(rng, d)
    beta = rng.beta(2, 2, d)
    return [
        Scenario("static_mix", lambda t: mix),
        Scenario("static_beta22", lambda t: beta),
        Scenario("drifting", drifting_curves(rng, d, steps)),
    ]


# ---------------------------------------------------------------------------- part 1: the proxy
def simulate(
    scn: Scenario, spec: ModeSpec, bounds: tuple[int, int], *, d: int, n: int, steps: int, seed: int
) -> dict:
    """Per-step V, V_uniform, V_oracle for one mode; batches are shared across modes (same seed)."""
    n_low, n_high = bounds
    budget = AVG_ROLLOUTS * n
    order_rng = np.random.default_rng(seed)  # the data sampler: identical for every mode
    draw_rng = np.random.default_rng(seed + 1)  # rollout outcomes: depend on the mode's own counts
    stats = PromptStats(prior_alpha=spec.prior, prior_beta=spec.prior, decay=spec.decay)
    ids_D = np.array([f"q{i}" for i in range(d)])
    perm, v, v_uni, v_opt = np.empty(0, dtype=np.int64), [], [], []
    for t in range(steps):
        if perm.size < n:  # epoch boundary: new shuffle, refresh the reference rule's priorities
            perm = order_rng.permutation(d)
            stats.refresh_priorities()
        rows, perm = perm[:n], perm[n:]
        ids = ids_D[rows].tolist()
        p_N = scn.pass_rate(t)[rows]
        var_N = p_N * (1.0 - p_N)
        if spec.probe:
            probes = draw_rng.random((n, n_low)) < p_N[:, None]
            counts = np.array(allocate_with_probes(ids, stats, probes.astype(float).tolist(),
                                                   budget=budget, n_low=n_low, n_high=n_high))
        else:
            counts = np.array(allocate(ids, stats, budget=budget, n_low=n_low, n_high=n_high, mode=spec.mode))
        correct = draw_rng.random(int(counts.sum())) < np.repeat(p_N, counts)
        sample_ids = np.repeat(np.array(ids), counts).tolist()
        stats.update(sample_ids, correct.astype(float), np.full(correct.size, 100))
        v.append(float(np.sum(var_N / counts)))
        v_uni.append(float(np.sum(var_N / uniform_counts(n, budget))))
        v_opt.append(float(np.sum(var_N / optimal_counts(var_N, budget=budget, n_low=n_low, n_high=n_high))))
    return {"v": v, "v_uniform": v_uni, "v_oracle": v_opt}


def summarise(runs: list[dict], steps_per_epoch: int) -> dict[str, float]:
    """Ratios of summed V over steps (all steps, the first epoch, the rest), pooled over seeds."""
    out: dict[str, float] = {}
    parts = (("all", slice(None)), ("epoch1", slice(0, steps_per_epoch)), ("later", slice(steps_per_epoch, None)))
    for part, sl in parts:
        v = sum(sum(r["v"][sl]) for r in runs)
        out[f"{part}_ratio_uniform"] = v / sum(sum(r["v_uniform"][sl]) for r in runs)
        out[f"{part}_ratio_oracle"] = v / sum(sum(r["v_oracle"][sl]) for r in runs)
    return out


def run_proxy(args: argparse.Namespace, specs: tuple[ModeSpec, ...], scenario_names: tuple[str, ...],
              seeds: int) -> list[dict]:
    """One summary row per (scenario, bounds, mode); every seed re-draws the scenario's prompts."""
    rows = []
    for scn_name in scenario_names:
        for bounds in BOUNDS:
            for spec in specs:
                runs = []
                for seed in range(seeds):
                    drawn = scenarios(np.random.default_rng(1000 + seed), args.prompts, args.steps)
                    scn = next(x for x in drawn if x.name == scn_name)
                    runs.append(simulate(scn, spec, bounds, d=args.prompts, n=args.batch, steps=args.steps, seed=seed))
                rows.append({**asdict(spec), "scenario": scn.name, "bounds": f"{bounds[0]}..{bounds[1]}",
                             **summarise(runs, args.prompts // args.batch)})
    return rows


# ---------------------------------------------------------------------------- part 2: real gradient variance
def bandit_policy(p_N: np.ndarray, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs_NK, correct_NK): K-armed softmax bandits whose correct arms hold probability p_i.

    Logits ~ N(0, 1); p_i in (0, 1): arm 0 is correct, its logit set so that softmax gives p_i;
    p_i = 0: no arm is correct; p_i = 1: every arm is.
    """
    z_NK = torch.randn(len(p_N), k, generator=gen, dtype=torch.float64)
    p = torch.as_tensor(p_N, dtype=torch.float64)
    inner = (p > 0) & (p < 1)
    rest = torch.logsumexp(z_NK[:, 1:], dim=1)
    z_NK[inner, 0] = torch.log(p[inner] / (1 - p[inner])) + rest[inner]
    correct_NK = torch.zeros(len(p_N), k, dtype=torch.float64)
    correct_NK[inner, 0] = 1.0
    correct_NK[p >= 1] = 1.0
    return torch.softmax(z_NK, dim=1), correct_NK


def _score_function_check() -> None:
    """The closed form used below, d log softmax(z)_a / dz = onehot(a) - softmax(z), against autograd."""
    z = torch.randn(8, dtype=torch.float64, requires_grad=True)
    torch.log_softmax(z, 0)[3].backward()
    expected = torch.nn.functional.one_hot(torch.tensor(3), 8).double() - torch.softmax(z.detach(), 0)
    assert torch.allclose(z.grad, expected), "score function closed form disagrees with autograd"


def group_gradient_variance(probs_K: torch.Tensor, correct_K: torch.Tensor, n: int, budget: int, reps: int,
                            gen: torch.Generator) -> dict[str, float]:
    """Trace of Cov (and squared norm of the mean) of one prompt's gradient block, by Monte Carlo.

    Each estimator already carries its batch weight: per-prompt mean (1/n, times 1/N later) or the
    global token-mean (1/budget, one token per response). Responses: actions a_Mn ~ probs.
    """
    k = probs_K.numel()
    a_Mn = torch.multinomial(probs_K, reps * n, replacement=True, generator=gen).view(reps, n)
    r_Mn = correct_K[a_Mn]
    mean_M1 = r_Mn.mean(1, keepdim=True)
    loo_Mn = (r_Mn.sum(1, keepdim=True) - r_Mn) / max(n - 1, 1)
    std_M1 = r_Mn.std(1, keepdim=True) if n > 1 else torch.zeros_like(mean_M1)
    grpo_Mn = (r_Mn - mean_M1) / (std_M1 + 1e-6)
    out = {}
    for name, adv_Mn, weight in (("reinforce_loo_prompt_mean", r_Mn - loo_Mn, 1.0 / n),
                                 ("grpo_prompt_mean", grpo_Mn, 1.0 / n),
                                 ("grpo_token_mean", grpo_Mn, 1.0 / budget)):
        g_MK = torch.zeros(reps, k, dtype=torch.float64).scatter_add_(1, a_Mn, adv_Mn)
        g_MK = weight * (g_MK - adv_Mn.sum(1, keepdim=True) * probs_K[None, :])
        var = float(g_MK.var(0).sum())
        out[name] = var
        # ||E g||^2 without the MC noise of the sample mean (E||mean||^2 = ||E g||^2 + tr Cov / reps)
        out[name + "_signal"] = float((g_MK.mean(0) ** 2).sum()) - var / reps
    return out


def run_gradient_check(args: argparse.Namespace, bounds: tuple[int, int]) -> list[dict]:
    """Proxy ratio vs Monte Carlo gradient-variance ratio, per allocation, on one static-mix batch."""
    _score_function_check()
    rng = np.random.default_rng(7)
    gen = torch.Generator().manual_seed(7)
    n_low, n_high = bounds
    n = args.mc_prompts
    budget = AVG_ROLLOUTS * n
    p_N = static_mix(rng, n)
    var_N = p_N * (1 - p_N)
    ids = [f"b{i}" for i in range(n)]
    stats = PromptStats(prior_alpha=0.5, prior_beta=0.5)
    hist = rng.random((n, AVG_ROLLOUTS)) < p_N[:, None]  # one earlier epoch of 16 rollouts each
    stats.update(np.repeat(ids, AVG_ROLLOUTS).tolist(), hist.ravel().astype(float), np.full(hist.size, 100))
    stats.refresh_priorities()
    allocations = {m: np.array(allocate(ids, stats, budget=budget, n_low=n_low, n_high=n_high, mode=m))
                   for m in ("uniform", "reference", "optimal")}
    allocations["oracle"] = optimal_counts(var_N, budget=budget, n_low=n_low, n_high=n_high)
    probs_NK, correct_NK = bandit_policy(p_N, args.arms, gen)
    rows = []
    for name, counts in allocations.items():
        total: dict[str, float] = {}
        for i in range(n):
            per = group_gradient_variance(probs_NK[i], correct_NK[i], int(counts[i]), budget, args.mc_reps, gen)
            for key, v in per.items():  # prompt-mean estimators average prompts: 1/N on the gradient
                total[key] = total.get(key, 0.0) + v / (n * n if "prompt_mean" in key else 1)
        row = {"bounds": f"{n_low}..{n_high}", "allocation": name, "proxy": float(np.sum(var_N / counts))}
        for key in ESTIMATORS:  # relative variance: noise per unit of squared signal, allocation-fair
            row[key] = total[key]
            row[key + "_rel"] = total[key] / total[key + "_signal"]
        rows.append(row)
    for row in rows:
        row["proxy_ratio"] = row["proxy"] / rows[0]["proxy"]
        for key in ESTIMATORS:
            row[key + "_ratio"] = row[key] / rows[0][key]
            row[key + "_rel_ratio"] = row[key + "_rel"] / rows[0][key + "_rel"]
    return rows


# ---------------------------------------------------------------------------- report
def _proxy_table(rows: list[dict], part: str) -> list[str]:
    cols = sorted({(r["scenario"], r["bounds"]) for r in rows}, key=lambda c: (SCENARIOS.index(c[0]), c[1] != "8..24"))
    head = "| mode | " + " | ".join(f"{s} {b}" for s, b in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name in dict.fromkeys(r["name"] for r in rows):
        cells = []
        for scn, bounds in cols:
            r = next(x for x in rows if x["name"] == name and x["scenario"] == scn and x["bounds"] == bounds)
            cells.append(f"{r[part + '_ratio_uniform']:.3f} / {r[part + '_ratio_oracle']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _mc_table(rows: list[dict]) -> list[str]:
    lines = ["| bounds | allocation | proxy V | REINFORCE-LOO prompt-mean | GRPO prompt-mean | GRPO token-mean |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        est = " | ".join(f"{r[k + '_ratio']:.3f} ({r[k + '_rel_ratio']:.3f})" for k in ESTIMATORS)
        lines.append(f"| {r['bounds']} | {r['allocation']} | {r['proxy_ratio']:.3f} | {est} |")
    return lines


def _target_lines(rows: list[dict]) -> list[str]:
    """One line per mode: where it meets the issue's targets (measured after the uninformed first epoch)."""
    limits = {"static_mix": 1.05, "drifting": 1.15}
    lines = []
    for name in dict.fromkeys(r["name"] for r in rows if r["mode"] == "optimal"):
        checks = []
        for r in rows:
            if r["name"] != name or r["scenario"] not in limits:
                continue
            ref = next(x for x in rows if x["name"] == "reference" and x["scenario"] == r["scenario"]
                       and x["bounds"] == r["bounds"])
            got = r["later_ratio_oracle"]
            ok = got <= limits[r["scenario"]] and got <= ref["later_ratio_oracle"]
            checks.append(f"{r['scenario']} {r['bounds']}: {got:.3f} {'ok' if ok else 'MISSED'}")
        lines.append(f"- {name}: " + "; ".join(checks))
    return lines


def write_report(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "allocation.json").write_text(json.dumps(result, indent=1) + "\n")
    cfg = result["config"]
    setup = (
        f"`python bench/allocation.py` ({result['seconds']:.0f} s). D={cfg['prompts']} prompts, {cfg['batch']} per "
        f"step, {cfg['steps']} steps ({cfg['steps'] * cfg['batch'] // cfg['prompts']} epochs), budget "
        f"{AVG_ROLLOUTS} x batch, {cfg['seeds']} seeds. Cells: V/V_uniform / V/V_oracle, V = sum_i p_i(1-p_i)/n_i "
        "with the TRUE p_i, summed over steps; lower is better, 1.000 in the second number is the oracle. "
        "Prior Beta(0.5, 0.5) unless named; decay multiplies a prompt's history at each of its own visits."
    )
    mc_title = (
        "## Does the proxy track the real gradient variance? (softmax bandit, static mix, "
        f"{cfg['mc_prompts']} prompts, {cfg['arms']} arms, {cfg['mc_reps']} MC draws per prompt)"
    )
    mc_note = (
        "Ratios to uniform of tr Cov(batch gradient); in brackets the relative variance tr Cov / ||E g||^2, the fair "
        "comparison when the allocation changes the expected gradient (token-mean weights prompt i by n_i)."
    )
    md = [
        "# Rollout allocation: gradient-variance proxy and Monte Carlo check",
        "",
        setup,
        "",
        "## Targets (issue 3): after epoch 1, V/V_oracle <= 1.05 on static_mix, <= 1.15 on drifting, <= reference",
        "",
        *_target_lines(result["proxy"]),
        "",
        "## All steps (epoch 1 included: every history-based mode is uniform there)",
        "",
        *_proxy_table(result["proxy"], "all"),
        "",
        "## After the first epoch",
        "",
        *_proxy_table(result["proxy"], "later"),
        "",
        "## Prior strength and decay of `optimal` (one seed; all steps)",
        "",
        *_proxy_table(result["sweep"], "all"),
        "",
        mc_title,
        "",
        mc_note,
        "",
        *_mc_table(result["gradient_check"]),
        "",
    ]
    (RESULTS / "allocation.md").write_text("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    args = ap.parse_args()
    sizes = (
        {"prompts": 256, "batch": 64, "steps": 8, "seeds": 1, "mc_prompts": 16, "arms": 8, "mc_reps": 500}
        if args.quick
        else {"prompts": 2048, "batch": 256, "steps": 64, "seeds": 2, "mc_prompts": 64, "arms": 8, "mc_reps": 4000}
    )
    cfg = argparse.Namespace(**sizes)
    start = time.perf_counter()
    proxy = run_proxy(cfg, MODES, SCENARIOS, cfg.seeds)
    sweep = run_proxy(cfg, PRIOR_SWEEP, ("static_mix", "drifting"), 1)
    grad = [row for bounds in BOUNDS for row in run_gradient_check(cfg, bounds)]
    result = {"config": sizes, "proxy": proxy, "sweep": sweep, "gradient_check": grad,
              "seconds": time.perf_counter() - start}
    write_report(result)
    print((RESULTS / "allocation.md").read_text())


if __name__ == "__main__":
    main()
