"""cepo-compare's paired statistics against values computed by hand (cepo_kernels.analysis.stats)."""

import itertools
import math

import pytest

from cepo_kernels.analysis import compare
from cepo_kernels.analysis.stats import bootstrap_ci, paired_stats, sign_test, wilcoxon_signed_rank


def test_sign_test_by_hand():
    # 8 wins, 2 losses: 2 (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 112 / 1024
    assert sign_test([1.0] * 8 + [-1.0] * 2) == pytest.approx(112 / 1024, abs=1e-15)
    assert sign_test([0.5] * 6) == pytest.approx(2 / 64, abs=1e-15)
    assert sign_test([1.0, -1.0, 0.0]) == 1.0  # the tie is dropped; k = 1 of n = 2 caps at 1
    assert sign_test([0.0, 0.0]) == 1.0


def test_wilcoxon_by_hand():
    # no ties: W+ = 15 of ranks 1..5 is the largest of 32 equally likely sums
    assert wilcoxon_signed_rank([1, 2, 3, 4, 5]) == (15.0, pytest.approx(2 / 32, abs=1e-15))
    # W+ = 13: subsets of {1..5} with sum >= 13 are those whose complement sums to <= 2: {}, {1}, {2}
    assert wilcoxon_signed_rank([1, -2, 3, 4, 5]) == (13.0, pytest.approx(6 / 32, abs=1e-15))
    # tied |d|: ranks 1.5, 1.5, 3; W+ = 6 only when all are positive (1 of 8)
    assert wilcoxon_signed_rank([0.1, 0.1, 0.2]) == (6.0, pytest.approx(2 / 8, abs=1e-15))
    # ranks 1.5, 1.5, 3 with W+ = 3: P(W+ <= 3) = P(W+ >= 3) = 5/8 -> p = 1
    assert wilcoxon_signed_rank([0.1, 0.1, -0.2]) == (3.0, 1.0)
    assert wilcoxon_signed_rank([0.0, 0.0, 0.3]) == (1.0, 1.0)  # zeros dropped: n = 1, p = 2 x 1/2
    assert wilcoxon_signed_rank([]) == (0.0, 1.0)


def test_wilcoxon_matches_enumeration_with_ties():
    d = [0.05, -0.05, 0.1, 0.05, -0.15, 0.2, 0.1]
    ranks = {0.05: 2.0, 0.1: 4.5, 0.15: 6.0, 0.2: 7.0}  # |d| sorted: .05 x3 (ranks 1-3), .1 x2 (4-5)
    r = [ranks[abs(x)] for x in d]
    w = sum(ri for ri, x in zip(r, d, strict=True) if x > 0)
    signs_all = itertools.product((0, 1), repeat=7)
    sums = [sum(ri for ri, s in zip(r, signs, strict=True) if s) for signs in signs_all]
    p = min(1.0, 2 * min(sum(s <= w for s in sums), sum(s >= w for s in sums)) / 2**7)
    assert wilcoxon_signed_rank(d) == (w, pytest.approx(p, abs=1e-15))


def test_bootstrap_interval():
    # resampled means of [0, 1] are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles of 10,000 draws are 0 and 1
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert bootstrap_ci([0.05] * 10) == pytest.approx((0.05, 0.05))
    d = [0.1, -0.05, 0.0, 0.2, 0.05, 0.05, -0.1, 0.15, 0.0, 0.1]
    lo, hi = bootstrap_ci(d)
    assert (lo, hi) == bootstrap_ci(d)  # a fixed seed
    mean, se = sum(d) / 10, math.sqrt(sum((x - sum(d) / 10) ** 2 for x in d) / 10 / 10)
    assert lo < mean < hi
    # the percentile interval of a mean is close to the normal one (mean +- 1.96 se) at n = 10
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(mean + 1.96 * se, abs=0.25 * se)
    with pytest.raises(ValueError, match="diffs: expected at least one"):
        bootstrap_ci([])


def test_summarize_pairs_by_seed():
    def run(acc, reward):
        return {"eval_accuracy_end": acc, "reward_end": reward, "eval_accuracy_start": 0.1,
                "credit_first_wrong_share": None, "credit_first_wrong_baseline": None}

    results = {"cepo": {s: run(0.3 + 0.01 * s, 0.5) for s in range(4)},
               "grpo": {s: run(0.2, 0.5 + 0.01 * s) for s in range(4)}}
    results["cepo"][4] = run(0.9, 0.9)  # no grpo run for seed 4: not paired
    out = compare.summarize(results, ["cepo", "grpo"], [0, 1, 2, 3, 4])
    acc = out["paired"]["cepo-grpo"]["eval_accuracy_end"]
    assert list(acc["per_seed"]) == ["0", "1", "2", "3"]
    assert acc["mean"] == pytest.approx(0.115) and (acc["wins"], acc["ties"], acc["losses"]) == (4, 0, 0)
    assert acc["sign_test_p"] == pytest.approx(2 / 16) and acc["wilcoxon_p"] == pytest.approx(2 / 16)
    rew = out["paired"]["cepo-grpo"]["reward_end"]
    assert (rew["wins"], rew["ties"], rew["losses"]) == (0, 1, 3)
    expected = paired_stats([rew["per_seed"][k] for k in ("0", "1", "2", "3")])
    assert rew == {**expected, "per_seed": rew["per_seed"]}
    assert rew["mean"] == pytest.approx(-0.015) and rew["ci95"] == pytest.approx([-0.025, -0.005])
    table = compare.table_markdown(out, results, ["cepo", "grpo"], [0, 1, 2, 3, 4], 5,
                                   machine={"cpu_count": 2, "run_wall_s": {"cepo-seed0": 10.0}})
    assert "| cepo-grpo | final held-out accuracy | +0.115 [" in table
    assert "| 4 / 0 / 0 | 0.125 | 0.125 |" in table
    assert "Wall time per cepo run (process, s): mean 10.0" in table


def test_credit_diagnostic_against_uniform():
    def run(share, base):
        return {"eval_accuracy_end": 0.5, "reward_end": 0.5, "eval_accuracy_start": 0.5,
                "credit_first_wrong_share": share, "credit_first_wrong_baseline": base}

    results = {"cepo": {s: run(0.6 + 0.01 * s, 0.4) for s in range(3)},
               "grpo": {s: run(None, 0.4) for s in range(3)}}
    out = compare.summarize(results, ["cepo", "grpo"], [0, 1, 2])
    gap = out["credit_vs_uniform"]["cepo"]
    assert gap["mean"] == pytest.approx(0.21) and (gap["wins"], gap["losses"]) == (3, 0)
    assert "grpo" not in out["credit_vs_uniform"]  # no teachers: A_hat = A
    assert out["per_algo"]["grpo"]["credit_first_wrong_baseline"]["mean"] == pytest.approx(0.4)
    table = compare.table_markdown(out, results, ["cepo", "grpo"], [0, 1, 2], 5)
    assert "| cepo | 0.610 ± 0.010 | 0.400 ± 0.000 | +0.210 [" in table
    assert "| grpo | - | 0.400 ± 0.000 | - | - | - | - | 0 |" in table


def test_against_the_untrained_model():
    def run(start, end):
        return {"eval_accuracy_end": end, "reward_end": 0.5, "eval_accuracy_start": start,
                "credit_first_wrong_share": None, "credit_first_wrong_baseline": None}

    # opsd: every seed below its step-0 accuracy (5 of 5: sign p = 2 / 32); cepo: +0.05, 0, +0.1, -0.05, 0
    starts = [0.15, 0.25, 0.2, 0.1, 0.4]
    gains = [0.05, 0, 0.1, -0.05, 0]
    results = {"cepo": {s: run(a, a + d) for s, (a, d) in enumerate(zip(starts, gains, strict=True))},
               "opsd": {s: run(a, 0.0) for s, a in enumerate(starts)}}
    out = compare.summarize(results, ["cepo", "opsd"], list(range(5)))
    down = out["vs_start"]["opsd"]
    assert [down["per_seed"][str(s)] for s in range(5)] == [-a for a in starts]
    assert down["mean"] == pytest.approx(-0.22) and (down["wins"], down["ties"], down["losses"]) == (0, 0, 5)
    assert down["sign_test_p"] == pytest.approx(2 / 32) and down["wilcoxon_p"] == pytest.approx(2 / 32)
    up = out["vs_start"]["cepo"]
    assert up["mean"] == pytest.approx(0.02) and (up["wins"], up["ties"], up["losses"]) == (2, 2, 1)
    table = compare.table_markdown(out, results, ["cepo", "opsd"], list(range(5)), 5)
    assert "| opsd | -0.220 [" in table and "| 0 / 0 / 5 | 0.062 | 0.062 | 0: -0.150," in table
