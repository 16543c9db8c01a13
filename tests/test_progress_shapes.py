"""Slow data preparation is never silent: generating the shapes data (periodic lines in a log, a bar on a
terminal) and parsing a large COCO annotation file (a line first)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from test_cli_terminal import run_in_pty


def test_shapes_generation_writes_periodic_lines_to_a_log(tmp_path: Path):
    err = tmp_path / "stderr.log"
    with open(err, "w") as f:
        res = subprocess.run([sys.executable, "-m", "kdcli", "data", "shapes", "--out", str(tmp_path / "d"),
                              "--n-train", "20", "--n-val", "10", "--size", "32"], stderr=f, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert res.returncode == 0, err.read_text()
    lines = err.read_text().splitlines()
    steps = [int(m.group(1)) for ln in lines
             if (m := re.match(r"generating shapes data \(32 px\) step (\d+)/30 \(\d+%\) \| ", ln))]
    # 30 images over both splits: a line every 10 % (3 images), the last at 30/30
    assert steps == list(range(3, 31, 3)), lines
    assert lines[-1].startswith("generating shapes data (32 px) step 30/30 (100%)")
    assert (tmp_path / "d" / "coco" / "annotations" / "instances_val2017.json").is_file()


def test_shapes_generation_shows_a_bar_on_a_terminal(tmp_path: Path):
    screen = run_in_pty(["data", "shapes", "--out", "d", "--n-train", "150", "--n-val", "50", "--size", "32"], 80,
                        tmp_path)
    assert not screen.overflow, screen.overflow
    bars = [ln for ln in screen.seen if re.search(r"generating shapes data \(32 px\) .*\d+/200 ", ln)]
    assert bars, "\n".join(screen.seen)
    assert not any(" step " in ln for ln in screen.seen)  # no plain log lines on a terminal


def test_a_large_annotation_file_is_announced_before_parsing(tmp_path: Path, monkeypatch, capsys):
    from kdcli.data import coco

    small = tmp_path / "small.json"
    small.write_text('{"images": []}')
    assert coco.load_json(small) == {"images": []}
    assert capsys.readouterr().err == ""  # under the threshold: silent
    monkeypatch.setattr(coco, "ANNOUNCE_BYTES", 4)
    assert coco.load_json(small) == {"images": []}
    assert capsys.readouterr().err == f"reading {small} (0 MB of annotations; this takes a while)\n"
