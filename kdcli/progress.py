"""Progress of slow loops: a two-line rich display on a terminal, plain periodic lines in a log.

On a terminal the first line always keeps ``label``, a bar, ``step/total``, the rate, the loop's
ETA and (for training) the run's ETA; it is built to the console width, the bar giving way first,
so nothing that matters is cut at 80 columns. The loss terms go on a second line, shortened to
the width. When stderr is not a terminal (``| tee``, nohup, a batch scheduler) a plain line is
written every ``every`` steps (default: about every 10 % of the loop) and at least every
``seconds`` seconds, like MMEngine's logger hook.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

PLAIN_SECONDS = 30.0


def fmt_time(seconds: float | None) -> str:
    """``h:mm:ss`` (``--:--`` while unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_rate(rate: float | None) -> str:
    if not rate:
        return "-- it/s"
    return f"{rate:.1f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it"


# short names of torchvision's task losses for the terminal line (log lines keep the full names)
SHORT = {"classification": "cls", "bbox_regression": "box", "bbox_ctrness": "ctr", "loss_classifier": "cls",
         "loss_box_reg": "box", "loss_objectness": "obj", "loss_rpn_box_reg": "rpn_box", "loss_mask": "mask"}


def fmt_losses(values: dict[str, float]) -> str:
    """``loss 18.5 | cls 1.13 box 0.999 ctr 0.718 cankd.p3 5.28 ...``: the total, then each term
    (3 significant digits, task terms under short names) for the terminal's second line."""
    if not values:
        return ""
    parts = " ".join(f"{SHORT.get(k, k)} {v:.3g}" for k, v in values.items())
    total = sum(values.values())
    return f"loss {total:.4g} | {parts}" if len(values) > 1 else parts


def _stderr_is_terminal() -> bool:
    from rich.console import Console

    return Console(stderr=True).is_terminal


class Progress:
    """Progress of one loop of ``total`` steps (``start`` already done, e.g. after a resume).

    ``after``: steps still to come once this loop ends (other epochs), for the run's ETA;
    ``info``: extra text for plain lines (the learning rate); ``log``: where plain lines go."""

    def __init__(self, label: str, total: int, *, start: int = 0, after: int | None = None,
                 log: Callable[[str], None] | None = None, every: int = 0, seconds: float = PLAIN_SECONDS,
                 info: Callable[[], str] | None = None, enabled: bool = True, terminal: bool | None = None,
                 plain: bool = True) -> None:
        self.label, self.total, self.done, self.start = label, max(1, total), start, start
        self.after = after
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.every = every if every > 0 else max(1, math.ceil(self.total / 10))
        self.seconds = seconds
        self.info = info
        self.values: dict[str, float] = {}
        self.enabled = enabled
        self.terminal = _stderr_is_terminal() if terminal is None and enabled else bool(terminal)
        self.plain = plain  # False: nothing in a log file (loops too short or too frequent to report)
        self.t0 = time.monotonic()
        self.t_first: float | None = None  # after the first step (compilation, worker start-up excluded)
        self.last_line = self.t0
        self._live: Any = None

    # -- numbers ---------------------------------------------------------------------------------
    def rate(self) -> float | None:
        """Steps per second since the first step of this session."""
        if self.t_first is None or self.done - self.start < 2:
            return None
        dt = time.monotonic() - self.t_first
        return (self.done - self.start - 1) / dt if dt > 0 else None

    def eta(self) -> float | None:
        r = self.rate()
        return (self.total - self.done) / r if r else None

    def run_eta(self) -> float | None:
        r = self.rate()
        return (self.total - self.done + (self.after or 0)) / r if r and self.after is not None else None

    # -- terminal display ------------------------------------------------------------------------
    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        width = self._console.width
        tail = [f"{self.done}/{self.total}", fmt_rate(self.rate()), f"eta {fmt_time(self.eta())}"]
        if self.after is not None:
            tail.append(f"run {fmt_time(self.run_eta())}")
        text = " ".join(tail)
        label = self.label
        # the bar takes what is left; below 6 cells it goes, then the label shortens
        room = width - len(label) - len(text) - 3
        grid = Table.grid(padding=(0, 1))
        if room >= 6:
            grid.add_row(Text(label, style="bold"), ProgressBar(self.total, self.done, width=min(40, room)),
                         Text(text))
        else:
            line = f"{label} {text}"
            grid.add_row(Text(line[:width], no_wrap=True, overflow="ellipsis"))
        lines: list[Any] = [grid]
        if self.values:
            lines.append(Text(fmt_losses(self.values), no_wrap=True, overflow="ellipsis", style="dim"))
        return Group(*lines)

    def __enter__(self) -> Progress:
        if self.enabled and self.terminal:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(stderr=True)
            self._live = Live(self, console=self._console, transient=True, refresh_per_second=4,
                              redirect_stdout=True, redirect_stderr=True)
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # -- updates ---------------------------------------------------------------------------------
    def advance(self, values: dict[str, float] | None = None, n: int = 1) -> None:
        self.done += n
        if self.t_first is None:
            self.t_first = time.monotonic()
        if values:
            self.values = values
        if not self.enabled or self.terminal or not self.plain:
            return
        now = time.monotonic()
        by_count = self.every <= self.total and (self.done % self.every == 0 or self.done == self.total)
        if by_count or now - self.last_line >= self.seconds:
            self.last_line = now
            self.log(self.line())

    def line(self) -> str:
        """The plain line: ``epoch 1/8 step 12/120 (10%) | losses | lr | rate, ETAs``."""
        pct = 100 * self.done // self.total
        parts = [f"{self.label} step {self.done}/{self.total} ({pct}%)"]
        if self.values:
            parts.append(" ".join(f"{k}={v:.4g}" for k, v in self.values.items()))
        if self.info is not None:
            parts.append(self.info())
        eta = f"{fmt_rate(self.rate())} eta {fmt_time(self.eta())}"
        if self.after is not None:
            eta += f" run {fmt_time(self.run_eta())}"
        parts.append(eta)
        return " | ".join(parts)


def track(items: Iterable[Any], label: str, total: int | None = None, enabled: bool = True,
          log: Callable[[str], None] | None = None, every: int = 0, seconds: float = PLAIN_SECONDS) -> Iterator[Any]:
    """Iterate ``items`` with a :class:`Progress` (``total`` defaults to ``len(items)``).

    In a log file only the time rule writes lines unless ``every`` is given: an evaluation after each
    epoch should not fill the log."""
    n = total if total is not None else len(items)  # type: ignore[arg-type]
    with Progress(label, n, log=log, every=every or n + 1, seconds=seconds, enabled=enabled) as p:
        for item in items:
            yield item
            p.advance()
