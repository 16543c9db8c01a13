"""Copy each method's rows of the evidence suite onto its page (docs/methods/<method>.md).

    python benchmarks/evidence_rows.py [docs/results/evidence_runs.csv [ABLATION_RUNS.csv ...]]

Every run of the method, its paired baseline (same seed) and, for methods trained from the teacher's
neck and head (``--inherit``), the inherit-only control of the same seed: negatives included. Where the
ablation suite (``kdcli bench quality --suite ablation``) ran variants of the method, every variant run too,
beside the method's own run of the same seed in the same invocation (default: every
``docs/results/ablation*_runs.csv``; each invocation has its own references and report, ``<name>_runs.csv``
beside ``<name>.md``). The section between the two markers below is rewritten; the
rest of the page is left as it is.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- evidence rows: written by benchmarks/evidence_rows.py -->"
END = "<!-- end of evidence rows -->"
CONTROLS = ("baseline", "inherit")
METRIC = {"detection": "mAP", "segmentation": "mIoU"}


def ablation_lines(method: str, runs: list[dict[str, str]], in_suite: bool = True,
                   report: str = "ablation") -> list[str]:
    mine = [r for r in runs if r["method"].startswith(f"{method}@")]
    if not mine:
        return []
    a = METRIC[mine[0]["task"]]
    score = {(r["method"], r["seed"]): r for r in runs if r["status"] == "ok"}
    lines = []
    if not in_suite:  # the method's own runs beside the plain student of the same seed
        lines += [f"**{method}** in the suite's regime, beside the plain student of the same seed ({a}):", "",
                  f"| seed | {method} | baseline | gain |", "|---|---|---|---|"]
        for seed in sorted({r["seed"] for r in runs if r["method"] == method}, key=int):
            me, base = score.get((method, seed)), score.get(("baseline", seed))
            if me and base:
                lines.append(f"| {seed} | {float(me[a]):.4f} | {float(base[a]):.4f} | "
                             f"{float(me[a]) - float(base[a]):+.4f} |")
        lines.append("")
    lines += [f"**Ablations** (`kdcli bench quality --suite ablation`, [{report}.md](../results/{report}.md), "
             f"per-run file `docs/results/{report}_runs.csv`): each variant beside this method's run of the same "
             f"seed ({a}).", "", f"| variant | options | seed | variant {a} | {method} | difference |",
             "|---|---|---|---|---|---|"]
    for r in sorted(mine, key=lambda r: (r["method"], int(r["seed"]))):
        parent = score.get((method, r["seed"]))
        me = f"{float(r[a]):.4f}" if r["status"] == "ok" else r["status"]
        ref = f"{float(parent[a]):.4f}" if parent else "—"
        diff = f"{float(r[a]) - float(parent[a]):+.4f}" if parent and r["status"] == "ok" else "—"
        lines.append(f"| {r['method'].split('@', 1)[1]} | `{r['set']}` | {r['seed']} | {me} | {ref} | {diff} |")
    return [*lines, ""]


def section(method: str, runs: list[dict[str, str]], ablation: list[dict[str, str]] | None = None,
            report: str = "ablation", more: dict[str, list[dict[str, str]]] | None = None) -> str:
    """``more``: further ablation invocations with variants of ``method`` (report name → its runs), shown
    after ``report``'s."""
    extra = [ln for name, rows in (more or {}).items() for ln in ablation_lines(method, rows, report=name)]
    by_pair: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in runs:
        by_pair[r["pair"]].append(r)
    in_suite = any(r["method"] == method for r in runs)
    if not in_suite:
        lines = [BEGIN, "", "## Evidence suite rows", "",
                 "This method is not in the evidence suite ([evidence.md](../results/evidence.md)); the ablation "
                 "suite trained it in that suite's regime.", ""]
        return "\n".join([*lines, *ablation_lines(method, ablation or [], in_suite=False, report=report), *extra,
                          END])
    lines = [BEGIN, "", "## Evidence suite rows", "",
             "Every run of this method in the evidence suite ([evidence.md](../results/evidence.md), "
             "per-run file `docs/results/evidence_runs.csv`), beside the plain student of the same seed "
             "and, where the method inherits the teacher's neck and head, the inherit-only control "
             "(same start, no distillation loss). The suite's paired tests and Holm-corrected verdicts "
             "are in evidence.md.", ""]
    for pair, rows in by_pair.items():
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        task = mine[0]["task"]
        a = METRIC[task]
        score = {(r["method"], r["seed"]): r for r in rows}
        inherits = "inherit" in mine[0].get("init", "")
        cols = ["seed", method, "baseline", "gain"] + (["inherit-only", "gain over inherit-only"] if inherits else [])
        epochs = f"{mine[0]['epochs']} epoch" + ("" if mine[0]["epochs"] == "1" else "s")
        lines += [f"**{pair}** ({mine[0]['teacher']} → {mine[0]['student']}, {a}, {epochs}, "
                  f"{mine[0]['image_size']} px, taps {mine[0]['taps']}, start: {mine[0]['init']})", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in sorted(mine, key=lambda r: int(r["seed"])):
            s = r["seed"]
            me = float(r[a]) if r["status"] == "ok" else float("nan")
            cells = [s, f"{me:.4f}" if r["status"] == "ok" else r["status"]]
            for ctl in ("baseline", "inherit") if inherits else ("baseline",):
                other = score.get((ctl, s))
                if other is None or other["status"] != "ok":
                    cells += ["—", "—"]
                    continue
                o = float(other[a])
                cells += [f"{o:.4f}", f"{me - o:+.4f}" if r["status"] == "ok" else "—"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ablation_lines(method, ablation or [], report=report) + extra
    lines.append(END)
    return "\n".join(lines)


def main(path: Path, ablation_paths: list[Path]) -> None:
    with path.open() as f:
        runs = list(csv.DictReader(f))
    # one ablation invocation per file, each with its own references: a method's variants are read with the
    # parent and baseline runs of their own file
    ablations = {p.name.removesuffix("_runs.csv"): list(csv.DictReader(p.open())) for p in ablation_paths}
    owners: dict[str, list[str]] = defaultdict(list)
    for name, rows in ablations.items():
        for m in dict.fromkeys(r["method"].split("@")[0] for r in rows if "@" in r["method"]):
            owners[m].append(name)
    # the suite's methods, and those only the ablation suite trained (PS-KD: self-distillation, not in the suite)
    methods = sorted(({r["method"] for r in runs} | set(owners)) - set(CONTROLS))
    for m in methods:
        page = ROOT / "docs" / "methods" / f"{m}.md"
        text = page.read_text()
        first, *others = owners.get(m, ["ablation"])
        new = section(m, runs, ablations.get(first, []), first, {o: ablations[o] for o in others})
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + new + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + new + "\n"
        page.write_text(text)
        print(f"wrote {page.relative_to(ROOT)}")


if __name__ == "__main__":
    results = ROOT / "docs" / "results"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else results / "evidence_runs.csv",
         [Path(a) for a in sys.argv[2:]] or sorted(results.glob("ablation*_runs.csv")))
