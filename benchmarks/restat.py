"""Re-test a committed quality suite with kdcli's statistics (one-sided paired t-test, Holm over the suite).

A paired t statistic needs only the mean and the standard deviation of the per-seed differences, which
``quality.csv`` keeps as ``gain`` and ``gain_std`` (``seeds`` of them), so older suites are re-tested
exactly without rerunning. With the per-run CSV the method-against-method contrasts are tested too and
join the Holm family. The CSV gets ``t, df, p, p_holm`` and a new ``verdict``; with ``--markdown`` the
"beats baseline" cells of that page's table for each pair are rewritten as ``verdict (p Holm)``.

    python benchmarks/restat.py docs/results/quality.csv --runs docs/results/quality_runs.csv \
        --markdown docs/results/quality.md
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path

from kdcli.bench.plan import BASELINE, METRICS
from kdcli.bench.quality_report import write_csv
from kdcli.bench.ranking import CONTRAST_COLUMNS, contrasts
from kdcli.bench.stats import holm, summary_test, verdict


def _float(v: str) -> float:
    return float(v) if v not in ("", "nan") else math.nan


def retest(quality: Path, runs: Path | None) -> tuple[list[dict], list[dict]]:
    rows = list(csv.DictReader(quality.open()))
    versus: list[dict] = []
    if runs is not None:
        raw = list(csv.DictReader(runs.open()))
        for r in raw:
            a = METRICS[r["task"]][0]
            r[a] = _float(r[a])
            r["seed"] = int(r["seed"])
        plans = {r["pair"]: (r["task"], [], None) for r in rows}
        versus = contrasts(raw, plans)  # type: ignore[arg-type]
    for r in rows:
        r["_test"] = summary_test(int(r["seeds"]), _float(r["gain"]), _float(r["gain_std"]))
    tests = [r for r in rows if r["method"] != BASELINE] + versus
    for r, ph in zip(tests, holm([r["_test"].p for r in tests]), strict=True):
        t = r.pop("_test")
        r.update(t=t.t, df=t.df, p=t.p, p_holm=ph, verdict=verdict(t, ph))
    for r in rows:
        if r["method"] == BASELINE:
            r.pop("_test")
            r.update(t=math.nan, df="", p=math.nan, p_holm=math.nan, verdict="—")
    return rows, versus


def cell(r: dict) -> str:
    return r["verdict"] if math.isnan(r["p_holm"]) else f"{r['verdict']} ({r['p_holm']:.2f})"


def patch_markdown(md: Path, rows: list[dict], section: str | None) -> int:
    """Rewrite the "beats baseline" cells of every table under a ``## <pair>:`` heading (or, with ``section``,
    of the first table after the line that starts with it)."""
    by = {(r["pair"], r["method"]): r for r in rows}
    lines = md.read_text().splitlines()
    pair, col, changed, armed = None, None, 0, section is None
    for i, line in enumerate(lines):
        if section is not None and line.startswith(section):
            armed, pair = True, rows[0]["pair"]
        m = re.match(r"## (\w+): ", line)
        if m and section is None:
            pair = m.group(1)
        if not armed or pair is None or not line.startswith("|"):
            if col is not None and not line.startswith("|"):
                col = None
                if section is not None:
                    armed = False
            continue
        cells = line.split("|")
        if "beats baseline" in line or "beats baseline (p Holm)" in line:
            col = next(j for j, c in enumerate(cells) if "beats baseline" in c)
            cells[col] = " beats baseline (p Holm) "
            lines[i] = "|".join(cells)
            continue
        if col is None or cells[1].strip().startswith("-") or cells[1].strip().startswith(":"):
            continue
        name = cells[2].strip().strip("*").split(" (")[0]
        r = by.get((pair, name))
        if r is not None:
            cells[col] = f" {cell(r)} "
            lines[i] = "|".join(cells)
            changed += 1
    md.write_text("\n".join(lines) + "\n")
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quality", type=Path)
    ap.add_argument("--runs", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--section", help="patch only the first table after the line starting with this text")
    args = ap.parse_args()
    rows, versus = retest(args.quality, args.runs)
    cols = list(rows[0])
    write_csv(args.quality, rows, cols)
    if versus:
        write_csv(args.quality.with_name(args.quality.stem + "_contrasts.csv"), versus, list(CONTRAST_COLUMNS))
    shown = [f"{r['pair']}/{r['method']}" for r in rows if r["verdict"] == "yes"]
    print(f"{args.quality}: {len(rows)} rows, {sum(r['method'] != BASELINE for r in rows) + len(versus)} tests; "
          f"shown: {', '.join(shown) or 'none'}")
    for c in versus:
        print(f"  {c['pair']}: {c['method']} vs {c['versus']}: {c['diff']:+.4f}, p {c['p']:.3f}, "
              f"Holm {c['p_holm']:.3f}, {c['verdict']}")
    if args.markdown:
        print(f"{args.markdown}: {patch_markdown(args.markdown, rows, args.section)} cells rewritten")


if __name__ == "__main__":
    main()
