"""Train-inference mismatch correction (rl/mismatch.py): token TIS weights, sequence masking (geometric mean and
largest token ratio, either way) and their metrics against hand-computed values; packed rows equal padded rows;
the loss weighs only the numerator (a masked sample's tokens stay in the token-mean denominator); the weights
commute with DynaMO's modulation; the config section; and the policy step with every correction on at 2 DP ranks x
2 micro-batches equals 1 process with 1 micro-batch (house rule 7), and so do 2 pipeline stages, with the modulation
unchanged by the correction; one RL step of the loop logs the correction's metrics."""

from __future__ import annotations

import math

import pytest
import torch
from _gloo import run_gloo
from _policy_batch import policy_batch, tiny_model_config
from _policy_sampler import run_tiny_train

from dynamo_mega.config import AlgoConfig, ConfigError, MismatchConfig, ModulationConfig, load_config
from dynamo_mega.rl.loss import policy_loss, reduce_loss_metrics
from dynamo_mega.rl.mismatch import mismatch_correction

L3, L2, L5 = math.log(3.0), math.log(2.0), math.log(5.0)
# d_t = p_t - q_t per sample; the last column of samples 0 and 2 is padding.
D_BS = torch.tensor([[L3, 0.0, -L2, 0.0], [0.1, -0.1, 0.0, 0.2], [-L5, 0.0, 0.0, 0.0]])
MASK_BS = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
P_BS = torch.tensor([[-1.0, -2.0, -0.5, -7.0], [-1.0, -1.5, -3.0, -0.2], [-0.3, -0.4, -9.0, -9.0]])
Q_BS = P_BS - D_BS + torch.tensor([[0.0, 0.0, 0.0, 40.0]] * 3) * ~MASK_BS  # wild values off the mask must not matter


def _k3(d: float) -> float:
    return math.exp(d) - 1.0 - d


def test_token_is_weights_and_metrics_by_hand():
    weight, m = mismatch_correction(P_BS, Q_BS, MASK_BS, token_is_cap=2.0)
    e = math.exp
    want = torch.tensor([[2.0, 1.0, 0.5, 0.0], [e(0.1), e(-0.1), 1.0, e(0.2)], [0.2, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(weight, want)
    assert float(m["tis_capped_sum"]) == 1.0  # only the ratio 3 exceeds C = 2
    kl = _k3(L3) + _k3(-L2) + _k3(0.1) + _k3(-0.1) + _k3(0.2) + _k3(-L5)
    assert float(m["mismatch_kl_sum"]) == pytest.approx(kl, rel=1e-6)
    assert "num_seqs" not in m


def test_geometric_mask_by_hand():
    # Mean d: sample 0 (ln 3 - ln 2) / 3 = ln(1.5) / 3 = 0.135; sample 1 0.05; sample 2 -ln(5) / 2 = -0.80.
    weight, m = mismatch_correction(P_BS, Q_BS, MASK_BS, geometric_tau=1.1)  # ln 1.1 = 0.095
    torch.testing.assert_close(weight, MASK_BS.float() * torch.tensor([[0.0], [1.0], [0.0]]))
    assert (float(m["num_seqs"]), float(m["seq_masked_seqsum"])) == (3.0, 2.0)
    weight, m = mismatch_correction(P_BS, Q_BS, MASK_BS, geometric_tau=2.0)  # ln 2 = 0.69: only sample 2 is out
    torch.testing.assert_close(weight, MASK_BS.float() * torch.tensor([[1.0], [1.0], [0.0]]))
    assert float(m["seq_masked_seqsum"]) == 1.0


def test_token_ratio_mask_is_two_sided():
    # Largest |d|: ln 3 (ratio 3), 0.2, ln 5 (ratio 1/5, i.e. 5 the other way).
    weight, m = mismatch_correction(P_BS, Q_BS, MASK_BS, token_ratio_max=4.0)
    torch.testing.assert_close(weight, MASK_BS.float() * torch.tensor([[1.0], [1.0], [0.0]]))
    weight, m = mismatch_correction(P_BS, Q_BS, MASK_BS, token_ratio_max=2.5)
    torch.testing.assert_close(weight, MASK_BS.float() * torch.tensor([[0.0], [1.0], [0.0]]))
    assert float(m["seq_masked_seqsum"]) == 2.0


def test_all_corrections_multiply_and_off_is_the_mask():
    weight, m = mismatch_correction(P_BS, Q_BS, MASK_BS, token_is_cap=2.0, geometric_tau=2.0, token_ratio_max=100.0)
    tis, _ = mismatch_correction(P_BS, Q_BS, MASK_BS, token_is_cap=2.0)
    torch.testing.assert_close(weight, tis * torch.tensor([[1.0], [1.0], [0.0]]))
    assert set(m) == {"mismatch_kl_sum", "tis_capped_sum", "num_seqs", "seq_masked_seqsum"}
    off, m = mismatch_correction(P_BS, Q_BS, MASK_BS)
    assert torch.equal(off, MASK_BS.float()) and set(m) == {"mismatch_kl_sum"}


def test_packed_rows_equal_padded_rows():
    """Samples 0 and 1 end to end in one row, sample 2 and row padding in another: same weights per token."""
    lengths = [3, 4, 2]
    rows = [[0, 1], [2]]
    width = 8
    p, q, mask = (torch.zeros(2, width) for _ in range(3))
    segments = torch.full((2, width), -1)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            n = lengths[i]
            p[r, at : at + n], q[r, at : at + n], mask[r, at : at + n] = P_BS[i, :n], Q_BS[i, :n], 1.0
            segments[r, at : at + n] = seg
            at += n
    kwargs = dict(token_is_cap=2.0, geometric_tau=1.1, token_ratio_max=4.0)
    packed, mp = mismatch_correction(p, q, mask, segments_BS=segments, **kwargs)
    padded, md = mismatch_correction(P_BS, Q_BS, MASK_BS, **kwargs)
    want = torch.cat([padded[0, :3], padded[1, :4], padded[2, :2]])
    torch.testing.assert_close(packed[mask != 0], want)
    for key in md:
        assert float(mp[key]) == pytest.approx(float(md[key]), rel=1e-6), key


def test_bad_thresholds_are_value_errors():
    for kwargs in ({"token_is_cap": 0.5}, {"geometric_tau": 1.0}, {"token_ratio_max": 0.9}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            mismatch_correction(P_BS, Q_BS, MASK_BS, **kwargs)


def _loss(adv, weight=None, n=10.0):
    logp = P_BS + 0.3 * torch.tensor([[1.0, -1.0, 2.0, 0.0]])  # ratios on both sides of the clip range
    return policy_loss(
        logp, P_BS, adv, MASK_BS, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, num_global_tokens=n, token_weight=weight
    )[0]


def test_masked_sample_stays_in_the_denominator():
    adv = torch.tensor([[1.0], [-2.0], [0.5]]).expand(3, 4) * MASK_BS
    weight, _ = mismatch_correction(P_BS, Q_BS, MASK_BS, geometric_tau=1.1)  # drops samples 0 and 2
    zeroed = adv * torch.tensor([[0.0], [1.0], [0.0]])
    # Same value as zero advantages on the masked samples with the SAME token count: the denominator did not shrink.
    assert float(_loss(adv, weight)) == pytest.approx(float(_loss(zeroed)), rel=1e-6)
    assert float(_loss(adv, weight)) != pytest.approx(float(_loss(zeroed, n=4.0)))


def test_weights_commute_with_advantage_modulation():
    """Every branch of the clipped loss (both clips, the dual clip) is linear in A, so a token weight c >= 0 on the
    loss equals c on the (modulated) advantage: TIS after DynaMO's A' = A * beta is one product, in any order."""
    adv = torch.tensor([[1.0], [-2.0], [0.5]]).expand(3, 4) * MASK_BS
    beta = torch.tensor([[1.2, 0.6, 1.0, 1.0], [0.7, 1.1, 0.9, 1.0], [1.0, 0.8, 1.0, 1.0]])  # stand-in factors
    weight, _ = mismatch_correction(P_BS, Q_BS, MASK_BS, token_is_cap=2.0, token_ratio_max=4.0)
    got = _loss(adv * beta, weight)
    assert float(got) == pytest.approx(float(_loss(adv * beta * weight)), rel=1e-6)
    assert float(got) != pytest.approx(float(_loss(adv * beta)))  # the weights do change the loss


def test_sequence_share_reduces_over_micro_batches():
    _, m0 = mismatch_correction(P_BS[:1], Q_BS[:1], MASK_BS[:1], geometric_tau=1.1)
    _, m1 = mismatch_correction(P_BS[1:], Q_BS[1:], MASK_BS[1:], geometric_tau=1.1)
    for m, mask in ((m0, MASK_BS[:1]), (m1, MASK_BS[1:])):
        m["num_tokens"] = mask.float().sum()
    out = reduce_loss_metrics([m0, m1])
    assert out["seq_masked"] == pytest.approx(2.0 / 3.0)
    assert out["num_tokens"] == 9.0 and "num_seqs" not in out


def test_config_section_defaults_off_and_checks():
    cfg = load_config(None, ["mismatch.token_is=true", "mismatch.mask_geometric=true"])
    assert cfg.mismatch.token_is and cfg.mismatch.token_is_cap == 2.0 and not cfg.mismatch.mask_token
    default = MismatchConfig()
    assert not (default.token_is or default.mask_geometric or default.mask_token)
    for override, needle in (("mismatch.token_is_cap=0.5", "token_is_cap"), ("mismatch.geometric_tau=1", "geometric_tau")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [override])


# ---- the policy step, several processes -------------------------------------------------------------------------

CFG = tiny_model_config()
N, S = 12, 14
ON = MismatchConfig(
    token_is=True, token_is_cap=1.5, mask_geometric=True, geometric_tau=1.15, mask_token=True, token_ratio_max=3.0
)


def _corrected_step(rank: int, world: int, micro_batch_size: int, mismatch, pp: int = 1) -> dict:
    """One policy step, modulation on (global scope), with the engine's log-probs = the behaviour ones minus seeded
    noise (the same in every process), this DP rank's stride of the batch in micro-batches of micro_batch_size, on
    pp pipeline stages."""
    import torch.distributed as dist

    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.parallel.train_step import old_logprobs, policy_step, split_micro_batches

    groups = init_parallel(1, pp, seed=0)
    model, arch = build_policy(CFG, groups, seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ids, targets, mask, adv, _ = policy_batch(N, S)
    whole = split_micro_batches(ids, targets, mask, adv, torch.zeros(N, S), N)[0]
    p = old_logprobs(model, [whole], groups, 1.0)[0][0]  # every stage gets the last stage's
    noise = 0.5 * torch.randn(N, S, generator=torch.Generator().manual_seed(11))
    rollout_logp = torch.zeros(N, S)
    rollout_logp[:, : p.shape[1]] = p - noise[:, : p.shape[1]]
    rollout_logp *= mask
    mine = slice(groups.dp_rank, None, groups.dp_size)
    micro = split_micro_batches(ids[mine], targets[mine], mask[mine], adv[mine], rollout_logp[mine], micro_batch_size)
    stats = policy_step(
        model,
        opt,
        None,
        micro,
        groups,
        algo=AlgoConfig(),
        temperature=1.0,
        grad_clip=1.0,
        modulation=ModulationConfig(scope="global"),
        mismatch=mismatch,
    )
    losses = [torch.zeros(()) for _ in range(groups.dp_size)]
    dist.all_gather(losses, torch.tensor(stats["loss"], dtype=torch.float32), group=groups.dp_group)
    return {"stats": stats, "loss_total": float(sum(losses)), "after": export_hf_state(model, arch, groups)}


def test_corrected_step_two_ranks_two_micro_batches_equal_one_process():
    ref = run_gloo(_corrected_step, 1, N, ON)[0]
    off = run_gloo(_corrected_step, 1, N, None)[0]
    s = ref["stats"]
    assert 0.0 < s["tis_capped"] < 1.0 and 0.0 < s["seq_masked"] < 1.0, s  # the corrections did act
    # The modulation (factors from current vs behaviour log-probs) is the same with the correction on or off,
    # and so are the metrics that do not involve the engine; the loss is not.
    for key in ("modulation_comp_mean", "modulation_stab_mean", "entropy", "approx_kl", "mismatch_kl", "num_tokens"):
        assert off["stats"][key] == pytest.approx(s[key], rel=1e-6), key
    assert "tis_capped" not in off["stats"] and "seq_masked" not in off["stats"]
    assert off["loss_total"] != pytest.approx(ref["loss_total"], rel=1e-3)
    for out in run_gloo(_corrected_step, 2, 3, ON):  # DP=2, 6 samples per rank in micro-batches of 3
        assert out["loss_total"] == pytest.approx(ref["loss_total"], rel=1e-5, abs=1e-7)
        # (modulation_comp_mean is a per-rank statistic, not reduced over DP: not compared)
        for key in ("grad_norm", "mismatch_kl", "tis_capped", "seq_masked", "num_tokens"):
            assert out["stats"][key] == pytest.approx(s[key], rel=1e-5, abs=1e-7), key
        for name, value in ref["after"].items():
            torch.testing.assert_close(out["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # Two pipeline stages (1F1B over micro-batches of 5, 5, 2): the loss and its weights live on the last stage.
    for out in run_gloo(_corrected_step, 2, 5, ON, 2):
        assert out["loss_total"] == pytest.approx(ref["loss_total"], rel=1e-5, abs=1e-7)
        for key in ("grad_norm", "mismatch_kl", "tis_capped", "seq_masked", "num_tokens"):
            assert out["stats"][key] == pytest.approx(s[key], rel=1e-5, abs=1e-7), key
        for name, value in ref["after"].items():
            torch.testing.assert_close(out["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---- the RL loop (train.train) with the correction on: config -> rl_step -> policy_step -> metrics.jsonl -----------


def test_rl_loop_logs_the_correction(tmp_path):
    """One RL step without warm-up, every correction on, rollouts from the policy itself (tests/_policy_sampler.py
    records the exact fp64 log-probs of what it samples: the mismatch is round-off)."""
    overrides = [
        *("run.steps=1 run.eval_every=0 run.eval_prompts=8 run.progress=false run.tensorboard=false".split()),
        *("run.log_samples=0 rollout.prompts_per_step=4 rollout.samples_per_prompt=4 allocation.mode=uniform".split()),
        *("allocation.n_low=4 allocation.n_high=4 warmup.enabled=false data.num_train=16 data.num_eval=8".split()),
        *("algo.reward_workers=1 mismatch.token_is=true mismatch.mask_geometric=true mismatch.mask_token=true".split()),
    ]
    (step,) = [r for r in run_tiny_train(tmp_path, overrides) if r["phase"] == "train"]
    # The engine holds the trainer's weights and samples the same distribution: nothing to cap or drop.
    assert step["tis_capped"] == 0.0 and step["seq_masked"] == 0.0
    assert 0.0 <= step["mismatch_kl"] < 1e-6 and step["logprob_mismatch"] < 1e-3


def test_mismatch_kl_keeps_small_mismatches():
    """k3 ~ d^2 / 2 for small d: 5e-9 at d = 1e-4, where exp(d) - 1 - d in fp32 rounds to 0 or worse."""
    d = 1e-4
    _, m = mismatch_correction(P_BS, P_BS - d * MASK_BS, MASK_BS)
    assert float(m["mismatch_kl_sum"]) / float(MASK_BS.sum()) == pytest.approx(d * d / 2, rel=1e-2)
