"""The Python API of docs/api.md: lazy names on ``import kdcli``, and its example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_import_kdcli_is_light_and_checks_come_first():
    code = ("import sys, kdcli\n"
            "names = [kdcli.train, kdcli.distill, kdcli.evaluate, kdcli.export, kdcli.push]\n"
            "assert all(callable(n) for n in names)\n"
            "print('torch' in sys.modules)\n"
            "from kdcli.errors import ConfigError, MethodError\n"
            "for call in (lambda: kdcli.distill('nope', teacher='shapes-r34-fcos', student='shapes-r18-fcos'),\n"
            "             lambda: kdcli.train('shapes-r18-fcos', epochs='one'),\n"
            "             lambda: kdcli.train('shapes-r18-fcos', optimiser='adamw')):\n"
            "    try:\n"
            "        call()\n"
            "    except (ConfigError, MethodError) as err:\n"
            "        print(err)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "False" and out[-1] == "False", out
    assert out[1].startswith("--method: unknown method 'nope'")
    assert out[2] == "--epochs 'one': expected an integer"
    assert "optimiser (did you mean optimizer?)" in out[3]


@pytest.mark.slow
def test_docs_example_runs(tmp_path: Path):
    text = DOC.read_text()
    code = re.search(r"## Example.*?```python\n(.*?)```", text, re.S).group(1)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"teacher mAP [\d.]+, distilled student mAP [\d.]+", res.stdout)
    run = tmp_path / "runs" / "api" / "cankd"
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["best.safetensors"]  # keep="best"
    assert (run / "export" / "model.safetensors").is_file()
    assert res.stdout.strip().endswith(str(Path("runs/api/cankd/export")))
