"""The console script: help is instant, user mistakes are one line with a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdcli.cli import one_line
from kdcli.errors import DataError


def kdcli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "kdcli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, res.stderr
    assert err[0].startswith("error: ") and "Traceback" not in res.stderr
    for n in needles:
        assert n in err[0], err[0]


def test_help_does_not_import_torch():
    code = "import sys; from kdcli import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_method_lists_valid_names(tiny_shapes: Path, tmp_path: Path):
    res = kdcli("distill", "--method", "nope", "--teacher", "shapes-r34-fcos", "--student", "shapes-r18-fcos",
                "--data", f"coco:{tiny_shapes / 'coco'}", "--out", str(tmp_path / "r"))
    assert_one_line_error(res, "unknown method 'nope'", "cankd", "fitnet", "kd")


def test_unknown_model(tmp_path: Path):
    assert_one_line_error(kdcli("train", "-m", "r999-retina", "--out", str(tmp_path / "r")), "r999-retina")


def test_train_without_model_names_the_option(tmp_path: Path):
    assert_one_line_error(kdcli("train", "--out", str(tmp_path / "r")), "kdcli train: missing --model")
    assert not (tmp_path / "r").exists()


def test_missing_data_folder(tmp_path: Path):
    res = kdcli("train", "-m", "shapes-r18-fcos", "--data", f"coco:{tmp_path / 'nope'}")
    assert_one_line_error(res, "--data", "does not exist")


def test_malformed_annotation_json(tiny_shapes: Path, tmp_path: Path):
    root = tmp_path / "coco"
    shutil.copytree(tiny_shapes / "coco", root)
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    res = kdcli("train", "-m", "shapes-r18-fcos", "--data", f"coco:{root}", "--out", str(tmp_path / "r"))
    assert_one_line_error(res, "instances_train2017.json")


def test_undecodable_image_named(tiny_shapes: Path, tmp_path: Path):
    root = tmp_path / "coco"
    shutil.copytree(tiny_shapes / "coco", root)
    ann = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    bad = root / "train2017" / ann["images"][0]["file_name"]
    bad.write_bytes(b"not a jpeg")
    res = kdcli("train", "-m", "shapes-r18-fcos", "--data", f"coco:{root}", "--out", str(tmp_path / "r"),
                "--epochs", "1", "--workers", "1", "--image-size", "64")
    assert_one_line_error(res, bad.name)


def test_teacher_without_weights_is_named(tiny_shapes: Path, tmp_path: Path):
    res = kdcli("distill", "--method", "cankd", "--teacher", "shapes-r34-fcos", "--student", "shapes-r18-fcos",
                "--data", f"coco:{tiny_shapes / 'coco'}", "--out", str(tmp_path / "r"))
    assert_one_line_error(res, "shapes-r34-fcos", "kdcli train")


def test_one_line_strips_worker_traceback():
    err = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback:\n  File x\n"
                    "kdcli.errors.DataError: /data/x.jpg: cannot decode image")
    assert one_line(err) == "/data/x.jpg: cannot decode image"


@pytest.mark.parametrize("args,needle", [(("zoo", "list"), "r101-retina"), (("zoo", "show", "r50-retina"),
                                                                               "RetinaNet_ResNet50_FPN_Weights"),
                                          (("methods",), "cankd")])
def test_listing_commands(args, needle):
    res = kdcli(*args)
    assert res.returncode == 0 and needle in res.stdout
