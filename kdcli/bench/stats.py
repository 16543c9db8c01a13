"""Paired significance tests for the quality benchmark: one-sided paired t-tests and Holm's correction.

A claim "method A beats B" in the suite rests on paired runs: the same seed, data order and budget for
both, so the per-seed difference ``d_s = score_A(s) − score_B(s)`` removes the seed's shared noise. The
test is the one-sided paired t-test of H0: E[d] ≤ 0 against H1: E[d] > 0, with n − 1 degrees of freedom
for n seeds. All tests of one suite (every method against the baseline on every pair, plus the
method-against-method contrasts) are corrected together with Holm's step-down procedure, which controls
the family-wise error rate at α without assuming independence (Holm, Scand. J. Statist. 1979).

The Student t tail is computed exactly for integer degrees of freedom with the finite series of
Abramowitz & Stegun 26.7.3–26.7.4, so no SciPy is needed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

ALPHA = 0.05


def t_cdf_abs(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's T with integer ``df`` ≥ 1 and t ≥ 0 (A&S 26.7.3, 26.7.4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if math.isinf(t):
        return 1.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        # odd: (2/π)[θ + sinθ (cosθ + (2/3)cos³θ + … + (2·4⋯(df−3))/(1·3⋯(df−2)) cos^(df−2)θ)]
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            if k > 1:
                term *= c * c * (2 * k - 2) / (2 * k - 1)
            total += term
        return (2.0 / math.pi) * (theta + (s * total if df > 1 else 0.0))
    # even: sinθ [1 + (1/2)cos²θ + (1·3)/(2·4)cos⁴θ + … + (1·3⋯(df−3))/(2·4⋯(df−2)) cos^(df−2)θ]
    total, term = 1.0, 1.0
    for k in range(1, df // 2):
        term *= c * c * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_sf(t: float, df: int) -> float:
    """Upper tail P(T > t) of Student's T with integer ``df``."""
    a = t_cdf_abs(abs(t), df)
    return (1.0 - a) / 2.0 if t >= 0 else (1.0 + a) / 2.0


@dataclass(frozen=True)
class PairedTest:
    """One-sided paired t-test of mean(d) > 0 over ``n`` paired differences."""

    n: int
    mean: float
    sd: float
    t: float
    df: int
    p: float

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n else math.nan


def paired_test(diffs: list[float]) -> PairedTest:
    """The one-sided paired t-test of H1: E[d] > 0. Fewer than two pairs give p = nan (no test)."""
    d = [x for x in diffs if not math.isnan(x)]
    if len(d) < 2:
        return summary_test(len(d), d[0] if d else math.nan, math.nan)
    return summary_test(len(d), statistics.fmean(d), statistics.stdev(d))


def summary_test(n: int, mean: float, sd: float) -> PairedTest:
    """The same test from the differences' count, mean and standard deviation (all a paired t needs, so a
    suite's committed gain ± std can be re-tested exactly). All differences equal: sd = 0, so t is ±inf
    (p = 0 or 1) when the mean is non-zero and p = 1 when every difference is 0 (a tie is no evidence)."""
    if n < 2:
        return PairedTest(n, mean, math.nan, math.nan, 0, math.nan)
    if sd == 0.0:
        t = math.copysign(math.inf, mean) if mean else 0.0
        return PairedTest(n, mean, sd, t, n - 1, 0.0 if mean > 0 else 1.0)
    t = mean / (sd / math.sqrt(n))
    return PairedTest(n, mean, sd, t, n - 1, t_sf(t, n - 1))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order; nan entries stay nan and do not count as tests.

    Sorted ascending p_(1) ≤ … ≤ p_(m), the adjusted value is max_{j ≤ i} min(1, (m − j + 1) p_(j)); a test is
    rejected at level α when its adjusted p ≤ α, which is exactly Holm's step-down rule."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(test: PairedTest, p_holm: float, alpha: float = ALPHA) -> str:
    """Words for one test after correction: "yes" only when Holm's adjusted p is at most α."""
    if test.n == 0:
        return "n/a"
    if test.n == 1:
        return f"untested (1 seed, {'+' if test.mean > 0 else '−' if test.mean < 0 else '±'})"
    if not math.isnan(p_holm) and p_holm <= alpha:
        return "yes"
    if test.mean < 0:
        return "no, lower"
    return "no"
