"""Run-folder records, the progress bar and result tables."""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .engine.trainer import Run


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"kdcli": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "timm", "faster-coco-eval", "safetensors", "huggingface-hub", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def weight_hash(model: Any) -> str:
    """sha256 over the model's state dict (names, dtypes and bytes), to identify exact weights."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        t = v.detach().cpu().contiguous()
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def describe_run(run: Run) -> None:
    from .engine.checkpoint import save_json

    cfg = run.cfg
    record: dict[str, Any] = {
        "config": cfg.to_dict(),
        "task": run.task,
        "student": {"id": cfg.model, "spec": run.student.spec.name, "init_hash": weight_hash(run.student.net)},
        "effective_batch": cfg.batch_size,
    }
    if run.meta.get("images"):
        record["images"] = run.meta["images"]
    if run.teacher is not None:
        record["teacher"] = {"id": cfg.teacher, "spec": run.teacher.spec.name, "hash": weight_hash(run.teacher.net)}
    if run.method is not None:
        record["method"] = {
            name: {"hparams": m.hp, "needs": list(m.needs)} for name, m in run.method.methods.items()
        }
    save_json(run.folder / "config.json", record)
    save_json(run.folder / "model.json", {"model": run.student.spec.to_dict()})
    save_json(run.folder / "env.json", versions())


@contextmanager
def epoch_progress(run: Run, epoch: int, total: int, enabled: bool = True) -> Iterator[Callable[[dict], None]]:
    """A rich progress bar showing each loss term; silent when output is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda values: None
        return
    with Progress(
        TextColumn(f"epoch {epoch + 1}/{run.cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[losses]}"), console=console, transient=True,
    ) as bar:
        task = bar.add_task("train", total=total, losses="")

        def advance(values: dict[str, float]) -> None:
            text = " ".join(f"{k}={v:.3f}" for k, v in values.items())
            bar.update(task, advance=1, losses=text)

        yield advance


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


def markdown_table(rows: list[tuple[str, dict[str, Any]]], task: str) -> str:
    cols = ["mAP", "AP50", "AP75"] if task == "detection" else ["mIoU", "pixel_acc"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{float(m.get(c, float('nan'))):.4f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
