"""What a user sees: the CLI under a real pseudo-terminal at 80 and 120 columns, and in a log file."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from kdcli.progress import Progress, fmt_time

# the same tiny run everywhere: 12 images of 64 px, batch 2 -> 6 steps per epoch
TINY = ("--image-size", "64", "--workers", "0", "-b", "2")


def _env() -> dict[str, str]:
    drop = ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CI")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(TERM="xterm-256color", PYTHONWARNINGS="ignore")
    return env


class Screen:
    """A minimal terminal: rows of cells, the cursor, and every row as it was before being changed.

    It follows what rich's live display sends (text, CR/LF, cursor up, erase line, SGR colours) and
    counts each character written beyond the last column (a line too long for the terminal)."""

    CSI = re.compile(r"\x1b\[([?0-9;]*)([A-Za-z])")

    def __init__(self, cols: int) -> None:
        self.cols = cols
        self.rows: list[list[str]] = [[]]
        self.r = self.c = 0
        self.overflow: list[str] = []
        self.seen: list[str] = []

    def _row(self) -> list[str]:
        while len(self.rows) <= self.r:
            self.rows.append([])
        return self.rows[self.r]

    def _snap(self) -> None:
        text = "".join(self._row()).rstrip()
        if text and (not self.seen or self.seen[-1] != text):
            self.seen.append(text)

    def feed(self, data: str) -> None:
        i = 0
        while i < len(data):
            m = self.CSI.match(data, i)
            if m:
                self._csi(m.group(1), m.group(2))
                i = m.end()
                continue
            ch = data[i]
            i += 1
            if ch == "\x1b":  # other escapes (e.g. ESC 7/8): skip the next character
                i += 1
            elif ch == "\r":
                self._snap()
                self.c = 0
            elif ch == "\n":
                self._snap()
                self.r += 1
            elif ch >= " ":
                row = self._row()
                if self.c == self.cols:  # the first character past the last column (once per line)
                    self.overflow.append("".join(row) + ch)
                while len(row) <= self.c:
                    row.append(" ")
                row[self.c] = ch
                self.c += 1
        self._snap()

    def _csi(self, params: str, op: str) -> None:
        n = int(params) if params.isdigit() else 1
        if op == "A":
            self._snap()
            self.r = max(0, self.r - n)
        elif op == "B":
            self._snap()
            self.r += n
        elif op == "K":
            self._snap()
            row = self._row()
            if params in ("", "0"):
                del row[self.c:]
            else:
                row.clear()
        elif op == "G":
            self.c = n - 1


def run_in_pty(args: list[str], cols: int, cwd: Path, timeout: float = 240) -> Screen:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "kdcli", *args], stdin=slave, stdout=slave, stderr=slave,
                            cwd=cwd, env=_env(), start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=30)
    screen = Screen(cols)
    screen.feed(b"".join(chunks).decode("utf-8", "replace"))
    assert proc.returncode == 0, "\n".join(screen.seen[-20:])
    return screen


BAR = re.compile(r"epoch 1/2 .*\b(\d+)/6 .*(it/s|s/it) eta \d:\d\d:\d\d run \d:\d\d:\d\d")


@pytest.mark.slow
@pytest.mark.parametrize("cols", [80, 120])
def test_training_bar_fits_the_terminal(tiny_shapes: Path, tmp_path: Path, cols: int):
    (tmp_path / "d").symlink_to(tiny_shapes / "coco")  # short paths: the header's lines fit 80 columns
    screen = run_in_pty(["train", "-m", "shapes-r18-fcos", "--data", "coco:d", "--epochs", "2", "--out", "run",
                         *TINY], cols, tmp_path)
    assert not screen.overflow, screen.overflow
    bars = [ln for ln in screen.seen if BAR.search(ln)]
    assert bars, "\n".join(screen.seen)
    assert all(len(ln) <= cols for ln in screen.seen)
    # the losses have their own line (FCOS: three terms)
    assert any(re.match(r"loss [\d.]+ \| cls [\d.]+ box [\d.]+ ctr [\d.]+$", ln) for ln in screen.seen), \
        "\n".join(screen.seen)
    # header, per-epoch summary and the result table
    text = "\n".join(screen.seen)
    assert "run run  (detection)" in text and "device  cpu, precision fp32" in text and "2 epochs x 6 steps" in text
    assert re.search(r"epoch 2/2 \| mAP [\d.]+ \(best [\d.]+\) \| lr ", text)
    assert re.search(r"^  loss [\d.]+: classification [\d.]+, bbox_regression", text, re.M)
    assert re.search(r"│ mAP\s+│\s+[\d.]+ │ AP50", text)
    if cols == 80:  # eval has its own bar
        ev = run_in_pty(["eval", "run", "--data", "coco:d", "-b", "1", "--workers", "0"], cols, tmp_path)
        assert not ev.overflow
        assert any(re.search(r"eval .*\b\d/6 .*eta \d:\d\d:\d\d", ln) for ln in ev.seen), "\n".join(ev.seen)


@pytest.mark.slow
def test_log_file_gets_plain_progress_lines(tiny_shapes: Path, tmp_path: Path):
    log = tmp_path / "log.txt"
    with open(log, "w") as err:
        res = subprocess.run([sys.executable, "-m", "kdcli", "train", "-m", "shapes-r18-fcos", "--data",
                              f"coco:{tiny_shapes / 'coco'}", "--epochs", "2", "--out", str(tmp_path / "run"),
                              "--log-every", "2", *TINY], stdout=subprocess.PIPE, stderr=err, text=True,
                             env=_env(), timeout=300)
    assert res.returncode == 0
    lines = log.read_text().splitlines()
    assert not any("\x1b[" in ln for ln in lines)  # no terminal control codes in a log
    step = re.compile(r"^epoch (\d)/2 step (\d)/6 \(\d+%\) \| classification=\S+ bbox_regression=\S+ "
                      r"bbox_ctrness=\S+ \| lr [\d.e-]+ \| .* eta \d:\d\d:\d\d run \d:\d\d:\d\d$")
    got = [tuple(map(int, m.groups())) for m in map(step.match, lines) if m]
    assert got == [(1, 2), (1, 4), (1, 6), (2, 2), (2, 4), (2, 6)], lines
    assert sum(ln.startswith("epoch 1/2 | mAP ") for ln in lines) == 1
    assert "run folder:" in res.stdout and "{" not in res.stdout  # a table, not a dict repr


def test_plain_lines_default_to_a_tenth_and_thirty_seconds(monkeypatch: pytest.MonkeyPatch):
    out: list[str] = []
    clock = [0.0]
    monkeypatch.setattr("kdcli.progress.time.monotonic", lambda: clock[0])
    p = Progress("epoch 1/3", 100, after=200, log=out.append, terminal=False)
    for _ in range(25):
        clock[0] += 0.5
        p.advance({"a": 1.0})
    assert [ln.split(" | ")[0] for ln in out] == ["epoch 1/3 step 10/100 (10%)", "epoch 1/3 step 20/100 (20%)"]
    # 0.5 s per step after the first: at step 20, 80 steps left of the epoch, 280 of the run
    assert out[-1].endswith("| a=1 | 2.0 it/s eta 0:00:40 run 0:02:20")
    assert fmt_time(3725) == "1:02:05" and fmt_time(None) == "--:--"
    clock[0] += 31  # a slow step: the time rule writes a line before the next tenth
    p.advance()
    assert out[-1].startswith("epoch 1/3 step 26/100")
