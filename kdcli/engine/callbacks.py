"""What a run reports besides training: the hooks the training loop calls, wired by the caller.

The loop (:mod:`kdcli.engine.loop`) trains, validates and checkpoints; results.csv
(:mod:`kdcli.engine.csvlog`), the run record (:mod:`kdcli.engine.record`), mask statistics
(:mod:`kdcli.engine.monitor`) and results.png are callbacks that :mod:`kdcli.api` puts in
``Run.callbacks``. A run without them trains and checkpoints the same way and writes none of their files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import Run


class Callback:
    """Every hook is a no-op here; a callback overrides the ones it needs."""

    # the checkpoint entry that holds this callback's state ("": it keeps none), so a resume continues it
    state_key = ""

    def on_start(self, run: Run, resumed_at: int | None) -> None:
        """Main rank, once the folder is there: a fresh run (``None``) or one resumed after that many epochs."""

    def on_step(self, run: Run, s_out: Any, t_out: Any, targets: Any) -> None:
        """Main rank, after every micro-step's forward (the student's and the teacher's outputs)."""

    def epoch_columns(self, run: Run) -> dict[str, Any]:
        """Every rank, at the end of an epoch: columns for the epoch's results.csv row (after the losses)."""
        return {}

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        """Main rank, once the epoch is validated: its complete results.csv row."""

    def state_dict(self, run: Run) -> dict[str, Any]:
        return {}

    def load_state_dict(self, run: Run, state: dict[str, Any] | None) -> None:
        """Every rank, on resume: what :meth:`state_dict` saved (None: the checkpoint has none)."""


class AfterEpoch(Callback):
    """``fn(folder, log)`` after every epoch's row (results.png: :func:`kdcli.viz.plots.update_results_png`)."""

    def __init__(self, fn: Callable[[Path, Callable[[str], None]], Any]) -> None:
        self.fn = fn

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        self.fn(run.folder, run.log)


def standard() -> list[Callback]:
    """The run record, results.csv and the mask statistics, in the order they must run."""
    from .csvlog import ResultsCsv
    from .monitor import MaskMonitor
    from .record import RunRecord

    return [RunRecord(), ResultsCsv(), MaskMonitor()]
