"""Paired statistics of a seeded comparison (cepo-compare): a bootstrap confidence interval of the mean
difference, and the exact two-sided sign and Wilcoxon signed-rank tests. Standard library only.

Each takes the per-seed differences d_s = metric(CEPO, seed s) - metric(baseline, seed s).
"""

from __future__ import annotations

import math
import random
import statistics

__all__ = ["bootstrap_ci", "sign_test", "wilcoxon_signed_rank", "paired_stats", "TIE"]

TIE = 1e-12  # |d| <= TIE counts as a tie (no difference)
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def bootstrap_ci(diffs: list[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of diffs: `resamples` means of n values drawn with
    replacement (random.Random(seed), so the interval is reproducible), sorted; the interval runs from the
    (1 - level) / 2 to the (1 + level) / 2 quantile (nearest rank)."""
    if not diffs:
        raise ValueError("diffs: expected at least one difference, got none")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a value in (0, 1), got {level}")
    rng, n = random.Random(seed), len(diffs)
    means = sorted(math.fsum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    lo = means[round((1.0 - level) / 2 * (resamples - 1))]
    hi = means[round((1.0 + level) / 2 * (resamples - 1))]
    return lo, hi


def sign_test(diffs: list[float]) -> float:
    """Exact two-sided sign test p-value: ties dropped, k = min(#positive, #negative) of n = the rest,
    p = min(1, 2 P(Binomial(n, 1/2) <= k)); 1.0 when every difference is a tie."""
    pos = sum(d > TIE for d in diffs)
    neg = sum(d < -TIE for d in diffs)
    n, k = pos + neg, min(pos, neg)
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def _ranks(values: list[float]) -> list[float]:
    """Ranks 1..n of values, tied values sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] - values[order[i]] <= TIE:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_signed_rank(diffs: list[float]) -> tuple[float, float]:
    """(W+, exact two-sided p) of the Wilcoxon signed-rank test: zero differences dropped, |d| ranked
    (ties share their mean rank), W+ = the sum of the ranks of the positive differences; its exact null
    distribution (every sign pattern equally likely, the tied ranks kept) by counting, p = min(1,
    2 min(P(W+ <= w), P(W+ >= w))). (0, 1.0) when every difference is zero."""
    d = [x for x in diffs if abs(x) > TIE]
    if not d:
        return 0.0, 1.0
    ranks = _ranks([abs(x) for x in d])
    twice = [round(2 * r) for r in ranks]  # mean ranks are multiples of 1/2: count in half-ranks
    counts = {0: 1}
    for r in twice:
        nxt = dict(counts)
        for s, c in counts.items():
            nxt[s + r] = nxt.get(s + r, 0) + c
        counts = nxt
    w2 = sum(r for r, x in zip(twice, d, strict=True) if x > 0)
    total = 2 ** len(d)
    below = sum(c for s, c in counts.items() if s <= w2) / total
    above = sum(c for s, c in counts.items() if s >= w2) / total
    return w2 / 2, min(1.0, 2.0 * min(below, above))


def paired_stats(diffs: list[float]) -> dict:
    """Mean, std, 95% bootstrap interval, wins / ties / losses, sign and Wilcoxon p-values of diffs."""
    lo, hi = bootstrap_ci(diffs)
    w, p_w = wilcoxon_signed_rank(diffs)
    return {
        "mean": statistics.fmean(diffs),
        "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        "ci95": [lo, hi],
        "ci_method": f"percentile bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}",
        "wins": sum(v > TIE for v in diffs),
        "ties": sum(abs(v) <= TIE for v in diffs),
        "losses": sum(v < -TIE for v in diffs),
        "sign_test_p": sign_test(diffs),
        "wilcoxon_w_plus": w,
        "wilcoxon_p": p_w,
    }
