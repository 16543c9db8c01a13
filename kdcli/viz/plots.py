"""``results.png`` of a run folder: loss terms, validation metrics and mask statistics per epoch.

Drawn from ``results.csv`` alone (so it can be redrawn for any finished or running run:
:func:`render_results`), with matplotlib's object API and the Agg canvas: no pyplot state, no display,
nothing global to switch. The engine calls :func:`update_results_png` after each epoch's row is written;
a plotting failure is reported once and never stops training.

Panels (each :data:`PANEL` inches at :data:`DPI` dpi, so the PNG is 500·panels × 400 pixels):

1. losses: every task term (``loss/<name>``), each distillation method's terms summed
   (``loss/<method>.<tap>...`` → ``<method> (sum)``) and the total, log scale when all are positive;
2. validation: the headline ``val/*`` metrics (:data:`HEADLINE`: mAP, AP50, AP75 or mIoU, pixel accuracy; values
   outside [0, 1] such as COCO's −1 "no such objects" are left out), at the epochs that were evaluated;
3. masks (only when the run logged ``mask/...`` columns, :mod:`kdcli.engine.monitor`): each statistic of each
   method mask, averaged over the taps.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine.result import loss_columns

DPI = 100
PANEL = (5.0, 4.0)  # inches per panel
_FAILED: set[str] = set()
# the validation curves drawn when present (else every val/ column in [0, 1])
HEADLINE = ("mAP", "AP50", "AP75", "mask_mAP", "mIoU", "pixel_acc")


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _num(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _nansum(row: dict[str, str], keys: list[str]) -> float:
    vals = [v for k in keys if not math.isnan(v := _num(row.get(k)))]
    return sum(vals) if vals else math.nan


def series(rows: list[dict[str, str]]) -> dict[str, dict[str, list[float]]]:
    """The curves of each panel: ``{"loss": {label: values}, "val": ..., "mask": ...}`` (NaN = no value)."""
    keys = list(rows[0]) if rows else []
    out: dict[str, dict[str, list[float]]] = {"loss": {}, "val": {}, "mask": {}}
    n = len(rows)
    loss_keys = [k for k in keys if k.startswith("loss/")]
    task, methods = loss_columns(loss_keys)  # task losses, and each method's terms
    for k in task:
        out["loss"][k[5:]] = [_num(r.get(k)) for r in rows]
    for name, ks in methods.items():
        out["loss"][f"{name} (sum)"] = [_nansum(r, ks) for r in rows]
    if len(loss_keys) > 1:
        out["loss"]["total"] = [_nansum(r, loss_keys) for r in rows]
    headline = [k for k in keys if k[4:] in HEADLINE and k.startswith("val/")]
    for k in headline or keys:
        if k.startswith("val/"):
            vals = [_num(r.get(k)) for r in rows]
            vals = [v if 0.0 <= v <= 1.0 else math.nan for v in vals]
            if any(not math.isnan(v) for v in vals):
                out["val"][k[4:]] = vals
    groups: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        if k.startswith("mask/"):
            parts = k[5:].split(".")  # method.tap.map.stat
            label = f"{parts[0]} {parts[-2]} {parts[-1]}" if len(parts) >= 4 else k[5:]
            groups[label].append(k)
    for label, ks in sorted(groups.items()):
        vals = []
        for r in rows:
            got = [v for k in ks if not math.isnan(v := _num(r.get(k)))]
            vals.append(sum(got) / len(got) if got else math.nan)
        out["mask"][label] = vals
    assert all(len(v) == n for p in out.values() for v in p.values())
    return out


def _panel(ax: Any, epochs: list[int], curves: dict[str, list[float]], title: str, ylabel: str,
           log: bool = False) -> None:
    for label, vals in curves.items():
        pts = [(e, v) for e, v in zip(epochs, vals, strict=True) if not math.isnan(v)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1.2, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best", ncol=1 if len(curves) <= 8 else 2)


def render_results(csv_path: Path, png_path: Path | None = None, title: str = "") -> Path:
    """Draw ``results.png`` (next to ``results.csv`` unless ``png_path``) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path else csv_path.with_name("results.png")
    rows = read_rows(csv_path)
    epochs = [int(_num(r.get("epoch")) or i + 1) for i, r in enumerate(rows)]
    data = series(rows)
    panels = 3 if data["mask"] else 2
    fig = Figure(figsize=(PANEL[0] * panels, PANEL[1]), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    losses = data["loss"]
    positive = all(v > 0 for vals in losses.values() for v in vals if not math.isnan(v))
    _panel(axes[0], epochs, losses, "training losses (epoch means)", "loss", log=positive and bool(losses))
    _panel(axes[1], epochs, data["val"], "validation", "metric")
    if panels == 3:
        _panel(axes[2], epochs, data["mask"], "mask statistics (mean over taps)", "value")
    fig.suptitle(title or csv_path.parent.name, fontsize=10)
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=DPI, format="png")
    tmp.replace(png_path)  # a reader never sees half a file
    return png_path


def update_results_png(folder: Path, log: Callable[[str], None] = print) -> Path | None:
    """Engine hook: redraw ``folder/results.png``; any failure is logged once per folder and swallowed."""
    try:
        return render_results(Path(folder) / "results.csv")
    except Exception as err:  # noqa: BLE001 - a figure must never stop training
        key = str(folder)
        if key not in _FAILED:
            _FAILED.add(key)
            log(f"note: results.png not drawn ({type(err).__name__}: {err}); training continues")
        return None
