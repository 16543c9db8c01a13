"""``results.csv``: one row per epoch (lr, times, mean loss terms, mask statistics, validation metrics).

Rows are rewritten whole through a temporary file, so a kill never leaves half a row; on resume the rows
of epochs after the checkpoint (written before a kill) are dropped and redone.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .callbacks import Callback

if TYPE_CHECKING:
    from .build import Run


class ResultsCsv(Callback):
    """Writes ``<run>/results.csv`` (the callback :mod:`kdcli.api` wires into every run)."""

    def on_start(self, run: Run, resumed_at: int | None) -> None:
        if resumed_at is not None:
            _truncate_csv(run.folder / "results.csv", resumed_at)

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        _write_csv(run.folder / "results.csv", row)


def _write_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    old_rows: list[dict[str, Any]] = []
    if not new:
        with open(path) as f:
            old_rows = list(csv.DictReader(f))
    keys = list(dict.fromkeys([*(old_rows[0].keys() if old_rows else []), *row.keys()]))
    rows = [*old_rows, row]
    _write_rows(path, keys, rows)


def _write_rows(path: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    os.replace(tmp, path)


def _truncate_csv(path: Path, epochs: int) -> None:
    """Drop rows of epochs after ``epochs``: written before a kill, they are redone after the resume."""
    if not path.exists():
        return
    with open(path) as f:
        reader = csv.DictReader(f)
        keys = list(reader.fieldnames or [])
        rows = list(reader)
    keep = [r for r in rows if int(r.get("epoch") or 0) <= epochs]
    if len(keep) != len(rows):
        _write_rows(path, keys, keep)
