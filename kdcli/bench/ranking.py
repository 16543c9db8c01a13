"""The statistics of a quality suite: mean and spread over seeds, paired gains over the baseline and
between methods (Holm-corrected), ranks, and Kendall's tau-b between two suites' rankings."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .plan import BASELINE, METRICS, Budget
from .stats import holm, paired_test, verdict


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def aggregate(runs: list[dict[str, Any]], teacher_metrics: dict[str, dict[str, Any]],
              plans: dict[str, tuple[str, list[str], Budget]]) -> list[dict[str, Any]]:
    """One row per pair and method: mean ± std over seeds, paired gain over the baseline with its one-sided
    paired t-test, rank. The verdicts come from :func:`correct`, once every test of the suite is known."""
    rows: list[dict[str, Any]] = []
    for pair_name, (task, names, budget) in plans.items():
        a, b = METRICS[task]
        pruns = [r for r in runs if r["pair"] == pair_name]
        base = {r["seed"]: r[a] for r in pruns if r["method"] == BASELINE}
        prow: list[dict[str, Any]] = []
        for name in names:
            mine = [r for r in pruns if r["method"] == name]
            if not mine:
                continue
            ok = [r for r in mine if r["status"] == "ok"]
            ma, sa = _mean_std([r[a] for r in ok])
            mb, sb = _mean_std([r[b] for r in ok])
            gains = [r[a] - base[r["seed"]] for r in ok if r["seed"] in base and not math.isnan(base[r["seed"]])]
            g, gs = _mean_std(gains) if name != BASELINE else (0.0, 0.0)
            test = paired_test(gains)
            first = mine[0]
            prow.append({
                "pair": pair_name, "task": task, "teacher": first["teacher"], "student": first["student"],
                "method": name, "seeds": len(ok), "failed": len(mine) - len(ok), "metric": a,
                "mean": ma, "std": sa, f"{b}_mean": mb, f"{b}_std": sb, "gain": g, "gain_std": gs,
                "t": test.t, "df": test.df, "p": test.p, "_test": test,
                "run_s": _mean_std([r["run_s"] for r in ok])[0], "train_s": _mean_std([r["train_s"] for r in ok])[0],
                "peak_mem_mb": _mean_std([r["peak_mem_mb"] for r in ok])[0],
                "loss_ratio": _mean_std([r["loss_ratio"] for r in ok])[0],
                "mem_kind": first["mem_kind"], "epochs": budget.epochs, "steps": budget.steps,
                "teacher_score": float(teacher_metrics.get(pair_name, {}).get(a, math.nan)),
            })
        scored = [r["mean"] for r in prow if not math.isnan(r["mean"])]
        for r in prow:  # competition ranking: equal scores share a rank (1, 2, 2, 4)
            r["rank"] = "" if math.isnan(r["mean"]) else 1 + sum(m > r["mean"] for m in scored)
        rows.extend(sorted(prow, key=lambda r: (r["rank"] == "", r["rank"] or 0, r["method"] != BASELINE)))
    return rows


# The seeds' claims that the suite tests head to head (paired by seed, same pair): ACAM-KD against the
# methods its paper compares with, CanKD against CWD/MGD, SAMKD against MGD/FreeKD/DMKD.
CONTRASTS: tuple[tuple[str, str], ...] = (
    ("acam", "maskd"), ("acam", "fgd"), ("acam", "freekd"),
    ("cankd", "cwd"), ("cankd", "mgd"),
    ("samkd", "mgd"), ("samkd", "freekd"), ("samkd", "dmkd"),
)


def contrasts(runs: list[dict[str, Any]], plans: dict[str, tuple[str, list[str], Budget]],
              which: tuple[tuple[str, str], ...] | None = None) -> list[dict[str, Any]]:
    """Method-against-method paired tests (same pair, same seed) for the pairs of ``which`` (default
    :data:`CONTRASTS`) both present."""
    out: list[dict[str, Any]] = []
    for pair_name, (task, _names, _budget) in plans.items():
        a = METRICS[task][0]
        score = {(r["method"], r["seed"]): r[a] for r in runs if r["pair"] == pair_name and r["status"] == "ok"}
        for x, y in (CONTRASTS if which is None else which):
            diffs = [score[(x, s)] - score[(y, s)] for (m, s) in score if m == x and (y, s) in score]
            if not diffs:
                continue
            t = paired_test(diffs)
            out.append({"pair": pair_name, "task": task, "method": x, "versus": y, "metric": a, "seeds": t.n,
                        "diff": t.mean, "diff_std": t.sd, "t": t.t, "df": t.df, "p": t.p, "_test": t})
    return out


def correct(rows: list[dict[str, Any]], versus: list[dict[str, Any]]) -> None:
    """Holm's correction over every test of the suite (each method against the baseline on each pair, and the
    contrasts); fills ``p_holm`` and ``verdict`` in place."""
    tests = [r for r in rows if r["method"] != BASELINE] + versus
    adjusted = holm([r["p"] for r in tests])
    for r, ph in zip(tests, adjusted, strict=True):
        r["p_holm"] = ph
        r["verdict"] = verdict(r.pop("_test"), ph)
    for r in rows:
        if r["method"] == BASELINE:
            r.pop("_test", None)
            r["p_holm"], r["verdict"] = math.nan, "—"


# -- rankings --------------------------------------------------------------------------------------------
def kendall_tau(a: dict[str, float], b: dict[str, float]) -> tuple[float, int]:
    """Kendall's τ-b between two sets of scores over their common methods; (nan, n) when undefined.

    τ-b counts ties (equal scores, e.g. several methods at mAP 0 after a very short proxy) as neither
    concordant nor discordant and corrects for them, so a ranking that is mostly ties does not look like
    an agreement."""
    common = [k for k in a if k in b and not (math.isnan(a[k]) or math.isnan(b[k]))]
    n = len(common)
    conc = disc = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da = a[common[i]] - a[common[j]]
            db = b[common[i]] - b[common[j]]
            if da == 0:
                ties_a += 1
            if db == 0:
                ties_b += 1
            if da and db:
                conc += (da > 0) == (db > 0)
                disc += (da > 0) != (db > 0)
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - ties_a) * (pairs - ties_b))
    return ((conc - disc) / denom if denom else math.nan), n


def read_rows(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--reference {p}: no such file (expected a quality.csv of another suite)")
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def _scores(rows: list[dict[str, Any]], pair: str) -> dict[str, float]:
    out = {}
    for r in rows:
        if r["pair"] == pair and r.get("mean") not in ("", None):
            out[r["method"]] = float(r["mean"])
    return out


def compare_rankings(rows: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Per pair: Kendall's τ-b between this suite's scores and the reference suite's."""
    return {p: kendall_tau(_scores(rows, p), _scores(ref, p)) for p in dict.fromkeys(r["pair"] for r in rows)}


# -- outputs ---------------------------------------------------------------------------------------------------
QUALITY_COLUMNS = ["pair", "task", "teacher", "student", "method", "rank", "seeds", "failed", "metric", "mean", "std",
                   "gain", "gain_std", "t", "df", "p", "p_holm", "verdict", "run_s", "train_s", "peak_mem_mb",
                   "mem_kind", "loss_ratio", "epochs", "steps", "teacher_score"]


CONTRAST_COLUMNS = ["pair", "task", "method", "versus", "metric", "seeds", "diff", "diff_std", "t", "df", "p",
                    "p_holm", "verdict"]
