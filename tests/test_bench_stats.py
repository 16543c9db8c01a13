"""The suite's statistics: Student t tails (exact series) and Holm's step-down correction."""

from __future__ import annotations

import math

import pytest

from kdcli.bench.stats import holm, paired_test, t_sf, verdict

# one-sided 5 % and 1 % critical values of Student's t (standard tables)
CRITICAL = [(1, 6.3138, 0.05), (2, 2.9200, 0.05), (4, 2.1318, 0.05), (5, 2.0150, 0.05), (9, 1.8331, 0.05),
            (4, 3.7469, 0.01), (7, 2.9980, 0.01)]


@pytest.mark.parametrize(("df", "t", "p"), CRITICAL)
def test_t_tail_matches_tables(df: int, t: float, p: float):
    assert t_sf(t, df) == pytest.approx(p, abs=5e-5)
    assert t_sf(-t, df) == pytest.approx(1 - p, abs=5e-5)


@pytest.mark.parametrize("df", [1, 2, 3, 6, 11])
def test_t_tail_equals_the_integrated_density(df: int):
    def pdf(x: float) -> float:
        c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    for t in (0.2, 1.3, 3.1):
        n, h = 4000, t / 4000  # Simpson's rule on [0, t]
        area = (pdf(0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))) * h / 3
        assert t_sf(t, df) == pytest.approx(0.5 - area, abs=1e-10)
    assert t_sf(0.0, df) == 0.5


def test_paired_test_values():
    r = paired_test([0.01, 0.02, 0.03])  # mean 0.02, sd 0.01, t = 0.02 / (0.01/√3) = 2√3
    assert (r.n, r.df) == (3, 2) and r.t == pytest.approx(2 * math.sqrt(3))
    assert r.p == pytest.approx(t_sf(2 * math.sqrt(3), 2))
    assert paired_test([0.01, 0.01]).p == 0.0 and paired_test([0.0, 0.0]).p == 1.0
    assert math.isnan(paired_test([0.5]).p) and paired_test([]).n == 0
    assert verdict(paired_test([0.5]), math.nan).startswith("untested (1 seed")


def test_holm_step_down():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005, 3·0.01, 2·0.03, max(0.06, 1·0.04)
    assert holm([0.01, 0.04, 0.03, math.nan, 0.005])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([0.01, math.nan])[1]) and holm([0.01, math.nan])[0] == 0.01
    assert holm([0.6, 0.7]) == [1.0, 1.0]
