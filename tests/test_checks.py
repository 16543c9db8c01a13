"""`kdcli checks`: versions, devices, CUDA, distributed backends, cache folders and offline state."""

from __future__ import annotations

import json
import os

import torch
from typer.testing import CliRunner

from kdcli import __version__
from kdcli.cli import app


def test_checks_reports_the_installation():
    res = CliRunner().invoke(app, ["checks", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    v = info["versions"]
    assert v["kdcli"] == __version__ and torch.__version__.startswith(v["torch"])
    assert {"torchvision", "timm", "huggingface_hub", "faster-coco-eval", "python"} <= set(v)
    assert all(v[k] != "not installed" for k in ("torchvision", "timm", "huggingface_hub", "faster-coco-eval"))
    assert info["devices"]["cuda available"] == torch.cuda.is_available()
    assert info["cuda"]["torch built with cuda"] == (torch.version.cuda or "no")
    assert info["distributed backends"]["gloo"] is torch.distributed.is_gloo_available()
    assert info["cache folders"]["KDCLI_HOME"] == os.environ["KDCLI_HOME"]  # set by conftest
    assert info["cache folders"]["torch hub"] == torch.hub.get_dir()
    assert info["offline"]["HF_HUB_OFFLINE"] == "1" and info["offline"]["hub reachable by kdcli"].startswith("no")
    text = CliRunner().invoke(app, ["checks"]).output
    assert "versions:" in text and "cache folders:" in text and "torch hub:" in text
