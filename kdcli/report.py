"""Result tables and folder sizes for the CLI and the API (the run record itself: kdcli.engine.record)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def folder_size(folder: Path) -> int:
    """Bytes under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def metrics_table(rows: list[tuple[str, dict[str, Any]]], task: str, title: str = "") -> Any:
    from rich.table import Table

    table = Table(title=title or None)
    table.add_column("model")
    cols = ["mAP", "AP50", "AP75"] if task == "detection" else ["mIoU", "pixel_acc"]
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in rows:
        table.add_row(name, *(f"{float(m.get(c, float('nan'))):.4f}" for c in cols))
    return table


def run_summary(folder: Path, metrics: dict[str, Any]) -> list[Any]:
    """What ``kdcli train`` / ``distill`` print at the end (stdout): the best epoch's scores as a table
    (:func:`scores_table`, 80 columns) and the run folder with its size."""
    epoch = metrics.get("epoch")
    out: list[Any] = []
    if any(isinstance(v, float) for v in metrics.values()):
        out.append(scores_table(metrics, f"best epoch{f' ({epoch})' if epoch else ''}"))
    out.append(f"run folder: {folder} ({fmt_bytes(folder_size(folder))})")
    return out


def scores_table(metrics: dict[str, Any], title: str = "", per_row: int = 3) -> Any:
    """The float metrics as metric/value pairs, ``per_row`` side by side: a dozen COCO metrics fit
    80 columns (one column per metric does not)."""
    from rich.table import Table

    table = Table(title=title or None, title_justify="left", show_header=False)
    for _ in range(per_row):
        table.add_column(style="bold")
        table.add_column(justify="right")
    items = [(k, f"{v:.4f}") for k, v in metrics.items() if isinstance(v, float)]
    for i in range(0, len(items), per_row):
        chunk = items[i:i + per_row]
        table.add_row(*(x for kv in chunk for x in kv), *([""] * (2 * (per_row - len(chunk)))))
    return table


def per_class_table(metrics: dict[str, Any], names: list[str]) -> Any:
    """``kdcli eval --per-class``: AP and AP50 per category (and mask AP), or IoU per class."""
    from rich.table import Table

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.4f}"

    table = Table(title="per class")
    if "per_class" in metrics:  # detection
        cols = ["id", "class", "AP", "AP50"] + (["mask AP"] if "mask_per_class" in metrics else [])
        for c in cols:
            table.add_column(c, justify="left" if c == "class" else "right")
        masks = {r["id"]: r["AP"] for r in metrics.get("mask_per_class", [])}
        for r in metrics["per_class"]:
            extra = [fmt(masks.get(r["id"]))] if masks else []
            table.add_row(str(r["id"]), r["name"], fmt(r["AP"]), fmt(r["AP50"]), *extra)
    else:
        for c in ("id", "class", "IoU"):
            table.add_column(c, justify="left" if c == "class" else "right")
        for i, (name, iou) in enumerate(zip(names, metrics["per_class_iou"], strict=True)):
            table.add_row(str(i), name, fmt(iou))
    return table


def markdown_table(rows: list[tuple[str, dict[str, Any]]], task: str) -> str:
    cols = ["mAP", "AP50", "AP75"] if task == "detection" else ["mIoU", "pixel_acc"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{float(m.get(c, float('nan'))):.4f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
