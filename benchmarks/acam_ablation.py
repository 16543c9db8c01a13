"""ACAM-KD ablations on the demo's FCOS pair at the demo's budget (8 epochs, seed 0 unless --seeds).

Every variant is one ``kdcli distill`` run with the demo recipe and the cached demo teacher; the baseline is
trained with the same recipe and seed, so each row is a paired comparison. Each run keeps its folder
(``results.csv`` holds the ``mask/...`` collapse-monitor columns per epoch); the summary CSV has one row per
run with the final and per-epoch validation metric.

    python benchmarks/acam_ablation.py --out runs/acam-ablation --csv docs/results/acam_ablation.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from kdcli.api import DEMO, cached_teacher, train
from kdcli.config import RunConfig

# name -> --set overrides of acam (None: the plain student)
VARIANTS: dict[str, dict[str, str] | None] = {
    "baseline": None,
    "acam": {},
    "masks-off": {"mask_init_std": "0", "mask_grad": "detach", "lambda_div": "0"},  # masks fixed at 0.5
    "mask_grad=detach": {"mask_grad": "detach"},
    "mask_grad=detach_mass": {"mask_grad": "detach_mass"},
    "mask_power=1": {"mask_power": "1"},
    "mask_input=teacher": {"mask_input": "teacher"},
    "mask_init_std=1": {"mask_init_std": "1.0"},
    "alpha=0.1": {"alpha": "0.1"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/acam-ablation"))
    ap.add_argument("--csv", type=Path, default=None, help="summary CSV (default: OUT/ablation.csv)")
    ap.add_argument("--variants", default="all", help="comma-separated names of VARIANTS")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=DEMO["detection"]["student_epochs"])
    args = ap.parse_args()
    d = DEMO["detection"]
    base = dict(optimizer=d["optimizer"], lr=d["lr"], amp=d["amp"], data="shapes", warmup_iters=50,
                weight_decay=1e-4, schedule="cosine", eval_every=2)
    t_dir = cached_teacher(d["teacher"], d["teacher_epochs"], {**base, "seed": 0},
                           key=f"{d['teacher']}-e{d['teacher_epochs']}")
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    summary = args.csv or args.out / "ablation.csv"
    summary.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            sets = VARIANTS[name]
            folder = args.out / f"{name}-s{seed}"
            if (folder / "metrics.json").exists():
                metrics = json.loads((folder / "metrics.json").read_text())
                run_s = float("nan")
            else:
                t0 = time.time()
                cfg = RunConfig(model=d["student"], out=str(folder), epochs=args.epochs, seed=seed, **base)
                if sets is not None:
                    cfg = RunConfig(model=d["student"], teacher=str(t_dir), method="acam", set=dict(sets),
                                    out=str(folder), epochs=args.epochs, seed=seed, **base)
                _, metrics = train(cfg, log=lambda *_a, **_k: None)
                run_s = time.time() - t0
            curve = []
            with open(folder / "results.csv") as f:
                for r in csv.DictReader(f):
                    if r.get("val/mAP"):
                        curve.append(f"{r['epoch']}:{float(r['val/mAP']):.4f}")
            row = {"variant": name, "seed": seed, "set": json.dumps(sets), "mAP": metrics.get("mAP"),
                   "AP50": metrics.get("AP50"), "curve": " ".join(curve), "run_s": round(run_s, 1),
                   "epochs": args.epochs}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(summary, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)


if __name__ == "__main__":
    main()
