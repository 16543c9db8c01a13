"""Copy each method's rows of the evidence suite onto its page (docs/methods/<method>.md).

    python benchmarks/evidence_rows.py [docs/results/evidence_runs.csv]

Every run of the method, its paired baseline (same seed) and, for methods trained from the teacher's
neck and head (``--inherit``), the inherit-only control of the same seed: negatives included. The section
between the two markers below is rewritten; the rest of the page is left as it is.
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


def section(method: str, runs: list[dict[str, str]]) -> str:
    by_pair: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in runs:
        by_pair[r["pair"]].append(r)
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
        lines += [f"**{pair}** ({mine[0]['teacher']} → {mine[0]['student']}, {a}, {mine[0]['epochs']} epochs, "
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
                cells += [f"{o:.4f}", f"{me - o:+.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main(path: Path) -> None:
    with path.open() as f:
        runs = list(csv.DictReader(f))
    methods = sorted({r["method"] for r in runs} - set(CONTROLS))
    for m in methods:
        page = ROOT / "docs" / "methods" / f"{m}.md"
        text = page.read_text()
        new = section(m, runs)
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + new + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + new + "\n"
        page.write_text(text)
        print(f"wrote {page.relative_to(ROOT)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "results" / "evidence_runs.csv")
