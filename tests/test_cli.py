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


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str, after_header: bool = False) -> None:
    """One error line on stderr, no traceback; ``after_header``: a run that failed once started may have
    printed its header (kdcli.engine.record.run_header) before it."""
    assert res.returncode != 0
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if after_header and err and err[0].startswith("run "):  # the header, and progress lines (stderr is a file)
        err = [ln for ln in err if not ln.startswith(("run ", "  ", "epoch "))]
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
    assert_one_line_error(res, bad.name, after_header=True)


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


# ---------------------------------------------------------------- config files, run folders, --keep
def test_config_types_yaml_and_did_you_mean(tmp_path: Path):
    from kdcli.config import RunConfig, read_config_file
    from kdcli.errors import ConfigError

    (tmp_path / "a.yaml").write_text("model: shapes-r18-fcos\nepochs: 3\nlr: 1\nset:\n  tau: 2\n")
    cfg = RunConfig.from_dict(read_config_file(tmp_path / "a.yaml"), "a.yaml")
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.set) == ("shapes-r18-fcos", 3, 1.0, {"tau": 2})
    assert isinstance(cfg.lr, float)
    with pytest.raises(ConfigError, match=r"^a.toml: epochs = 'one': expected an integer$"):
        RunConfig.from_dict({"epochs": "one"}, "a.toml")
    with pytest.raises(ConfigError, match=r"amp = True: expected a string"):
        RunConfig.from_dict({"amp": True}, "x")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) epoch \(did you mean epochs\?\), zzz \(valid"):
        RunConfig.from_dict({"epoch": 2, "zzz": 1}, "x")


def test_config_errors_are_one_line(tmp_path: Path):
    (tmp_path / "c.toml").write_text('epochs = "one"\n')
    assert_one_line_error(kdcli("train", "-m", "shapes-r18-fcos", "--config", str(tmp_path / "c.toml")),
                          "c.toml: epochs = 'one': expected an integer")
    (tmp_path / "c.yaml").write_text("model: [unclosed\n")
    assert_one_line_error(kdcli("train", "--config", str(tmp_path / "c.yaml")), "c.yaml")


def test_print_config_shows_the_resolved_config(tmp_path: Path):
    (tmp_path / "c.toml").write_text('model = "shapes-r18-deeplabv3"\nepochs = 2\n')
    res = kdcli("train", "--config", str(tmp_path / "c.toml"), "--lr", "0.5", "--print-config")
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)
    # file < command line; the segmentation task default (poly) applies where nothing was given
    assert (cfg["model"], cfg["epochs"], cfg["lr"], cfg["schedule"]) == ("shapes-r18-deeplabv3", 2, 0.5, "poly")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_run_repeats_from_its_folder_numbered_and_kept(tiny_shapes: Path, tmp_path: Path):
    first = tmp_path / "first"
    args = ("--data", f"coco:{tiny_shapes / 'coco'}", "--epochs", "1", "--image-size", "64", "--workers", "0",
            "-b", "4", "--seed", "3")
    res = kdcli("train", "-m", "shapes-r18-fcos", "--out", str(first), *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    record = json.loads((first / "config.json").read_text())["config"]
    # the run's own folder (or its config.json) as --config: the same run, in a numbered default folder
    for n, src in enumerate([first, first / "config.json"]):
        extra = ("--keep", "best") if n == 0 else ()
        res = kdcli("train", "--config", str(src), *extra, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        folder = tmp_path / "runs" / "detection" / ("shapes-r18-fcos" if n == 0 else "shapes-r18-fcos-2")
        again = json.loads((folder / "config.json").read_text())["config"]
        assert {k: v for k, v in again.items() if k not in ("out", "keep")} == \
            {k: v for k, v in record.items() if k not in ("out", "keep")}
        assert f"run folder: runs/detection/{folder.name} (" in res.stdout
    kept = sorted(p.name for p in (tmp_path / "runs" / "detection" / "shapes-r18-fcos" / "weights").iterdir())
    assert kept == ["best.safetensors"]
    full = sorted(p.name for p in (tmp_path / "runs" / "detection" / "shapes-r18-fcos-2" / "weights").iterdir())
    assert {"best.safetensors", "last.safetensors", "last_state.pt"} <= set(full)
    # an explicit --out that holds a run still refuses
    assert_one_line_error(kdcli("train", "--config", str(first), "--out", str(first), cwd=tmp_path),
                          "already holds a run")


# ---------------------------------------------------------------- names, help, cheap checks
def no_torch(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    """The CLI in a process where importing torch fails: what it does here, it does before torch."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['kdcli', *sys.argv[1:]]; "
            "from kdcli.cli import main; main()")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def test_version_and_completion():
    from kdcli import __version__

    res = kdcli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"kdcli {__version__}"
    assert "--install-completion" in kdcli("--help").stdout


def test_methods_is_fast_and_fits_the_terminal():
    from kdcli.catalog import _from_registry, methods

    assert methods() == _from_registry()  # the table read from source is the registry's
    res = no_torch("methods", columns=80)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "cankd" in res.stdout and "uskd" in res.stdout and max(map(len, lines)) <= 80
    wide = no_torch("methods", columns=200)
    assert "detection preset" in wide.stdout and "segmentation preset" not in res.stdout


def test_train_and_distill_help_show_defaults_and_choices():
    for cmd in ("train", "distill"):
        out = " ".join(subprocess.run([sys.executable, "-m", "kdcli", cmd, "--help"], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "200"}).stdout.split())
        for needle in ("(default: 12)", "sgd | adamw (default: sgd, momentum 0.9)", "cosine | poly | step | constant",
                       "--keep", "--log-every", "--print-config"):
            assert needle in out, (cmd, needle)


@pytest.mark.parametrize("args,needle", [
    (("distill", "--method", "cankd+nope", "-t", "shapes-r34-fcos", "-s", "shapes-r18-fcos"),
     "--method: unknown method 'nope'"),
    (("distill", "--method", "cankd", "-t", "shapes-r34-fcos", "-s", "shapes-r18-fcos", "--set", "nope=1"),
     "--set nope: 'cankd' has no such option"),
    (("distill", "--method", "kd", "-t", "shapes-r34-fcos", "-s", "shapes-r18-fcos", "--set", "tau=warm"),
     "--set tau: cannot read 'warm' as float"),
    (("distill", "--method", "kd+cwd", "-t", "shapes-r34-fcos", "-s", "shapes-r18-fcos", "--set", "tau=2"),
     "with several methods prefix the option"),
    (("train", "-m", "shapes-r18-fcos", "--schedule", "linear"), "--schedule linear: expected one of cosine"),
    (("train", "-m", "shapes-r18-fcos", "--optimizer", "adam"), "--optimizer adam: expected one of sgd, adamw"),
    (("train", "-m", "shapes-r18-fcos", "--keep", "most"), "--keep most: expected one of best, last, all"),
    (("train", "-m", "runs/nope"), "--model runs/nope: no such folder"),
    (("distill", "--method", "kd", "-t", "runs/t", "-s", "shapes-r18-fcos"), "--teacher runs/t: no such folder"),
    (("train", "-m", "shapes-r18-fcos", "--student-weights", "nope.safetensors"), "nope.safetensors: no such file"),
    (("train", "-m", "shapes-r18-fcos", "--data", "coco:/nope/coco"), "does not exist"),
    (("train", "-m", "shapes-r18-fcos", "--method", "kd"), "--method kd: needs a teacher"),
])
def test_cheap_checks_come_before_torch(args: tuple[str, ...], needle: str, tmp_path: Path):
    res = no_torch(*args, "--out", str(tmp_path / "r"))
    assert_one_line_error(res, needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_eval_missing_folder_and_json(tiny_shapes: Path, tmp_path: Path):
    assert_one_line_error(kdcli("eval", str(tmp_path / "runs" / "x")), "runs/x: no such folder")
    run = tmp_path / "run"
    args = ("--data", f"coco:{tiny_shapes / 'coco'}", "--workers", "0")
    res = kdcli("train", "-m", "shapes-r18-fcos", "--out", str(run), "--epochs", "1", "--image-size", "64", "-b", "4",
                *args)
    assert res.returncode == 0, res.stderr
    res = kdcli("eval", str(run), "--json", "--out", str(tmp_path / "ev"), "--max-val-images", "4", *args)
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert set(metrics) >= {"mAP", "AP50", "AP75"} and all(isinstance(metrics[k], float) for k in ("mAP", "AP50"))
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == metrics
    old = kdcli("eval", str(run), "--json", "--max-images", "4", *args)  # the old option name still works
    assert old.returncode == 0 and json.loads(old.stdout) == metrics


def test_eval_checks_classes_before_making_shapes(tmp_path: Path):
    env_home = {"KDCLI_HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch")}
    # the weights file is there (checked first, also before any data): never read, the class check stops first
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / "fcos_resnet50_fpn_coco-99b0c9b7.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not read")
    res = subprocess.run([sys.executable, "-m", "kdcli", "eval", "r50-fcos"], capture_output=True, text=True,
                         env={**os.environ, **env_home, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert_one_line_error(res, "r50-fcos: predicts 90 classes but --data shapes has 3")
    assert not (tmp_path / "home" / "data").exists()  # no shapes set was generated first


def test_reports_name_the_command_kdcli_when_run_as_a_module(monkeypatch: pytest.MonkeyPatch):
    import sys

    from kdcli.cli_options import command_line

    monkeypatch.setattr(sys, "argv", ["/x/kdcli/__main__.py", "bench", "quality", "--suite", "evidence"])
    assert command_line() == "kdcli bench quality --suite evidence"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/kdcli", "bench", "speed", "--set", "a b"])
    assert command_line() == "kdcli bench speed --set 'a b'"


def test_ablation_suite_with_a_parent_without_variants_is_one_line_before_any_run(tmp_path: Path):
    res = kdcli("bench", "quality", "--suite", "ablation", "--method", "mgd", "--out", str(tmp_path / "ev"))
    assert_one_line_error(res, "--method mgd: the ablation suite has variants of acam, fgd, pskd, samkd")
    assert not (tmp_path / "ev").exists()


def test_ablation_suite_pair_without_the_parents_variants_is_one_line_before_any_run(tmp_path: Path):
    res = kdcli("bench", "quality", "--suite", "ablation", "--pairs", "lraspp", "--method", "fgd",
                "--out", str(tmp_path / "ev"))
    assert_one_line_error(res, "no variant of fgd runs on the lraspp pair (segmentation)")
    res = kdcli("bench", "quality", "--suite", "ablation", "--pairs", "retina", "--out", str(tmp_path / "ev"))
    assert_one_line_error(res, "ablation suite: unknown pair retina; expected one of fcos, lraspp")
    assert not (tmp_path / "ev").exists()
