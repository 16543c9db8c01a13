"""Hostile inputs are refused in one line, never accepted silently: damaged weight files, malformed COCO
annotations, out-of-range or wrongly typed options, an --out that cannot be written or is taken by
another process, a disk that fills up, Ctrl-C outside the training loop."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_cli import assert_one_line_error, kdcli
from test_export import model_folder

from kdcli import api
from kdcli.checkpoint_files import read_state_dict
from kdcli.config import RunConfig
from kdcli.data import CocoDetection
from kdcli.engine import build as engine_build
from kdcli.engine import checkpoint as ckpt
from kdcli.engine.guards import LossGuard
from kdcli.engine.result import StepResult
from kdcli.engine.runlock import RunLock
from kdcli.errors import ConfigError, DataError, KdcliError, TrainingError, ZooError
from kdcli.export import export


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text, text
    return text


# -- damaged weight files ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "huge header", "truncated header"])
def test_export_of_a_damaged_safetensors_is_one_line(tmp_path: Path, damage: str):
    folder = model_folder(tmp_path / "run", "shapes-r18-fcos")
    path = folder / "weights" / "best.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    bad = {"truncated": data[: len(data) // 2], "huge header": struct.pack("<Q", 10**12) + data[8:],
           "truncated header": data[: 8 + n // 2]}[damage]
    path.write_bytes(bad)
    with pytest.raises(ZooError) as info:
        export(folder, tmp_path / "out")
    msg = _one_line(info.value)
    assert str(path) in msg and "safetensors" in msg
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_pickle_refusal_names_the_object_and_is_not_cut_mid_word(tmp_path: Path):
    path = tmp_path / "obj.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ZooError) as info:
        read_state_dict(path)
    msg = _one_line(info.value)
    assert "refused by torch.load(weights_only=True)" in msg and "argparse.Namespace" in msg
    assert "trus " not in msg + " " and "\x1b" not in msg  # torch's advice, cut and with terminal colours, is gone


def test_a_corrupt_zip_is_said_corrupt_not_python_objects(tmp_path: Path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, good)
    data = bytearray(good.read_bytes())
    flipped = tmp_path / "flipped.pth"  # a few bytes inside the pickled record zeroed
    i = data.index(b"_rebuild_tensor")
    data[i:i + 8] = b"\x00" * 8
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.pth"
    text.write_text("hello, these are not weights\n")
    for path in (flipped, truncated, text):
        with pytest.raises(ZooError) as info:
            read_state_dict(path)
        msg = _one_line(info.value)
        assert str(path) in msg and "corrupt file" in msg, msg
        assert "Python objects" not in msg
    assert list(read_state_dict(good)) == ["w"]


# -- images -------------------------------------------------------------------------------------------
def _coco(root: Path, images: list[dict], anns: list[dict], files: dict[str, bytes] | None = None) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for name, data in (files or {}).items():
        (root / "val2017" / name).write_bytes(data)
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    return root


def _jpeg(w: int = 8, h: int = 6) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_text_file_named_jpg_is_not_an_image(tmp_path: Path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 6},
              {"id": 2, "file_name": "b.jpg", "width": 8, "height": 6}]
    root = _coco(tmp_path / "coco", images, [], {"a.jpg": b"just some text\n", "b.jpg": _jpeg()[:40]})
    ds = CocoDetection(root, "val")
    with pytest.raises(DataError) as info:
        ds[0]
    msg = _one_line(info.value)
    assert msg.startswith(str(root / "val2017" / "a.jpg")) and "not an image" in msg
    with pytest.raises(DataError) as info:
        ds[1]
    msg = _one_line(info.value)
    assert "b.jpg: corrupt JPEG file" in msg
    for m in (msg,):
        assert "/__w/" not in m and ".cpp" not in m and "Only jpeg" not in m


# -- COCO annotations ------------------------------------------------------------------------------
def test_coco_negative_box_zero_images_and_duplicate_ids_are_refused(tmp_path: Path):
    one = [{"id": 7, "file_name": "a.jpg", "width": 8, "height": 6}]
    ok = {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 3, 3]}
    neg = {"id": 12, "image_id": 7, "category_id": 1, "bbox": [5, 1, -3, 3]}
    root = _coco(tmp_path / "neg", one, [ok, neg])
    with pytest.raises(DataError) as info:
        CocoDetection(root, "val")
    msg = _one_line(info.value)
    assert "instances_val2017.json" in msg and "annotations[1]" in msg and "id 12" in msg and "negative" in msg

    root = _coco(tmp_path / "empty", [], [])
    with pytest.raises(DataError) as info:
        CocoDetection(root, "val")
    assert "instances_val2017.json" in _one_line(info.value) and "'images' is empty" in str(info.value)

    two = [*one, {"id": 3, "file_name": "b.jpg", "width": 8, "height": 6},
           {"id": 7, "file_name": "c.jpg", "width": 8, "height": 6}]
    root = _coco(tmp_path / "dup", two, [ok])
    with pytest.raises(DataError) as info:
        CocoDetection(root, "val")
    msg = _one_line(info.value)
    assert "instances_val2017.json" in msg and "images[2]" in msg and "c.jpg" in msg and "image id 7" in msg
    assert "images[0]" in msg

    # a zero-width box stays what it was: a degenerate box left out of the training targets
    zero = {"id": 13, "image_id": 7, "category_id": 1, "bbox": [5, 1, 0, 3]}
    root = _coco(tmp_path / "zero", one, [ok, zero], {"a.jpg": _jpeg()})
    _, target = CocoDetection(root, "val")[0]
    assert target["boxes"].tolist() == [[1.0, 1.0, 4.0, 4.0]]


# -- options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,needle", [
    ("epochs", -1, "epochs = -1: expected an integer >= 1"),
    ("epochs", 0, "expected an integer >= 1"),
    ("epochs", "one", "epochs = 'one': expected an integer"),
    ("batch_size", 0, "batch_size = 0: expected an integer >= 1"),
    ("lr", -0.01, "lr = -0.01: expected a number > 0"),
    ("lr", 0, "expected a number > 0"),
    ("lr", math.inf, "expected a number (finite)"),
    ("weight_decay", -1e-4, "expected a number >= 0"),
    ("warmup_iters", -5, "expected an integer >= 0"),
    ("max_val_images", -1, "expected an integer >= 0"),
    ("grad_clip", "big", "expected a number"),
    ("amp", 16, "expected a string"),
    ("compile", "yes", "expected true or false"),
])
def test_config_values_are_checked(key: str, value: object, needle: str):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({key: value}, "run.toml")
    msg = _one_line(info.value)
    assert msg.startswith("run.toml: ") and needle in msg, msg
    assert RunConfig.from_dict({"lr": 1, "epochs": 2}, "run.toml").lr == 1  # an integer is a number


def test_bad_values_stop_before_any_model_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def boom(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(engine_build, "build_model", boom)
    monkeypatch.setattr(engine_build, "build_run", boom)
    for bad in ({"epochs": -1}, {"batch_size": 0}, {"lr": -1.0}):
        cfg = RunConfig(model="shapes-r18-fcos", out=str(tmp_path / "r"), **bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            api.train(cfg, log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_cli_config_file_with_a_string_epoch_is_one_line(tmp_path: Path):
    conf = tmp_path / "run.toml"
    conf.write_text('model = "shapes-r18-fcos"\nepochs = "one"\n')
    res = kdcli("train", "--config", str(conf), "--out", str(tmp_path / "r"))
    assert_one_line_error(res, "run.toml", "epochs = 'one'", "expected an integer")
    res = kdcli("train", "-m", "shapes-r18-fcos", "--epochs", "-1", "--out", str(tmp_path / "r"))
    assert_one_line_error(res, "--epochs -1", ">= 1")
    assert not (tmp_path / "r").exists()


def test_student_weights_with_other_class_names_says_which(tmp_path: Path):
    cfg = RunConfig(model="shapes-r18-fcos", student_weights=str(tmp_path / "w.safetensors"), data="coco:/d")
    with pytest.raises(KdcliError) as info:
        engine_build._resolve_student_spec(cfg, ["circle", "square", "star"])
    msg = _one_line(info.value)
    assert "3 classes but --data coco:/d has 3" not in msg
    assert "--student-weights" in msg and "class 2 is 'triangle' in the model and 'star' in the data" in msg
    with pytest.raises(KdcliError) as info:
        engine_build._resolve_student_spec(cfg, ["a", "b"])
    assert "3 classes but --data coco:/d has 2" in _one_line(info.value)


# -- the non-finite guard ------------------------------------------------------------------------------
def test_nonfinite_guard_claims_a_checkpoint_only_when_there_is_one():
    guard = LossGuard(None)
    with pytest.raises(TrainingError) as info:
        guard.check(StepResult(None, {"loss": float("nan")}))
    assert "no checkpoint was written yet" in str(info.value) and "kept" not in str(info.value)
    guard.saved = True
    with pytest.raises(TrainingError, match="the last good checkpoint is kept"):
        guard.check(StepResult(None, {"loss": float("inf")}))


# -- the run folder -----------------------------------------------------------------------------------
def _det_cfg(tiny_shapes: Path, out: Path, **kw) -> RunConfig:
    base = dict(model="shapes-r18-fcos", data=f"coco:{tiny_shapes / 'coco'}", out=str(out), epochs=1,
                batch_size=2, image_size=64, max_train_images=4, max_val_images=2, workers=0, device="cpu",
                optimizer="adamw", lr=1e-3, warmup_iters=1, bn_recal=1, ckpt_every_steps=1)
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def test_an_unwritable_out_is_refused_before_models_are_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def boom(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(engine_build, "build_model", boom)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"--out {blocker / 'run'}: {blocker} is a file"):
        api.train(RunConfig(model="shapes-r18-fcos", out=str(blocker / "run")), log=lambda s: None)
    if os.access("/sys", os.W_OK) and not _cannot_create("/sys"):
        pytest.skip("/sys is writable here")
    with pytest.raises(ConfigError, match=r"--out /sys/kdcli-run: cannot write in /sys \("):
        api.train(RunConfig(model="shapes-r18-fcos", out="/sys/kdcli-run"), log=lambda s: None)


def _cannot_create(folder: str) -> bool:
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return False
    except OSError:
        return True


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(tiny_shapes: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    """The disk fills up at the second checkpoint: one line, and the first checkpoint is still loadable."""
    real = ckpt._write_tmp
    weights = tmp_path / "r" / "weights"

    def write_tmp(path: Path, write):
        if path.name == "last_state.pt" and (weights / "last_state.pt").exists():
            def full(tmp: str) -> None:
                write(tmp)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
            return real(path, full)
        return real(path, write)

    monkeypatch.setattr(ckpt, "_write_tmp", write_tmp)
    with pytest.raises(TrainingError) as info:
        api.train(_det_cfg(tiny_shapes, tmp_path / "r"), log=lambda s: None)
    msg = _one_line(info.value)
    assert msg.startswith(f"--out {tmp_path / 'r'}: cannot write (No space left on device")
    assert "the last complete checkpoint in weights/ is kept" in msg
    assert ckpt.load_checkpoint(weights).state["step"] == 1
    assert not [p for p in weights.iterdir() if p.name.startswith(".last")]  # no temporary left behind


@pytest.mark.slow
def test_cli_file_size_limit_is_one_line(tiny_shapes: Path, tmp_path: Path):
    """A real refused write (RLIMIT_FSIZE: the kernel's EFBIG, as a quota gives) at the first checkpoint."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "kdcli", "train", "-m", "shapes-r18-fcos", "--data",
                          f"coco:{tiny_shapes / 'coco'}", "--out", str(tmp_path / "r"), "--epochs", "1", "-b", "2",
                          "--image-size", "64", "--max-train-images", "2", "--max-val-images", "2", "--workers", "0",
                          "--device", "cpu", "--ckpt-every-steps", "1"],
                         capture_output=True, text=True, env=env, timeout=300, preexec_fn=limit)
    assert_one_line_error(res, f"--out {tmp_path / 'r'}: cannot write (File too large)",
                          "no checkpoint had been written yet", after_header=True)


def test_one_writer_per_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A second training process, fresh or --resume, is refused while the first holds the folder; the
    lock of a process that died is reported as stale and taken over."""
    def boom(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(engine_build, "build_model", boom)
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from kdcli.engine.runlock import RunLock\n"
         f"lock = RunLock(Path({str(folder)!r})); lock.acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as info:
            api.train(RunConfig(model="shapes-r18-fcos", out=str(folder)), log=lambda s: None)
        msg = _one_line(info.value)
        assert f"process {holder.pid} is writing this run folder" in msg and msg.startswith(f"--out {folder}")
        (folder / "config.json").write_text(json.dumps({"config": RunConfig(model="shapes-r18-fcos").to_dict()}))
        with pytest.raises(ConfigError, match=f"--resume {folder}: process {holder.pid} is writing"):
            api.resume(folder, log=lambda s: None)
    finally:
        holder.kill()
        holder.wait()
    logs: list[str] = []
    with RunLock(folder, logs.append):
        assert (folder / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(ConfigError, match=f"process {os.getpid()} is writing"):
            RunLock(folder).acquire()  # a second lock in the same process is refused as well
    assert logs == [f"note: {folder / '.lock'}: stale lock of process {holder.pid} (no longer runs); taken over"]
    assert (folder / ".lock").read_text() == ""  # released cleanly: nothing stale for the next one


@pytest.mark.parametrize("mark", ["config.json", "weights/last_state.pt", "weights/prev.safetensors"])
def test_a_fresh_start_over_any_trace_of_a_run_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         mark: str):
    def boom(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(engine_build, "build_model", boom)
    folder = tmp_path / "run"
    (folder / mark).parent.mkdir(parents=True, exist_ok=True)
    (folder / mark).write_bytes(b"{}")
    with pytest.raises(ConfigError) as info:
        api.train(RunConfig(model="shapes-r18-fcos", out=str(folder)), log=lambda s: None)
    msg = _one_line(info.value)
    assert f"--out {folder}: already holds a run ({mark})" in msg and f"--resume {folder}" in msg


def test_after_a_fallback_to_prev_the_next_checkpoint_keeps_prev(tmp_path: Path):
    def save(step: int, rotate: bool = True) -> None:
        ckpt.save_checkpoint(tmp_path, {"w": torch.full((4,), float(step))}, {"step": step, "epoch": 0}, rotate)

    save(1)
    save(2)
    (tmp_path / "last.safetensors").write_bytes(b"\x00" * 16)  # damaged
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.slot == "prev" and loaded.state["step"] == 1
    save(3, rotate=False)
    for slot, step in (("last", 3), ("prev", 1)):  # two intact checkpoints again
        state = torch.load(tmp_path / f"{slot}_state.pt", weights_only=True)
        data = (tmp_path / f"{slot}.safetensors").read_bytes()
        assert state["step"] == step and ckpt.safetensors_problem(data) is None
        import hashlib

        assert hashlib.sha256(data).hexdigest() == state["tensors_sha256"]


# -- Ctrl-C outside the training loop ------------------------------------------------------------------
def test_ctrl_c_before_the_loop_says_so_and_exits_130(tiny_shapes: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "kdcli", "train", "-m", "shapes-r18-fcos", "--data",
                             f"coco:{tiny_shapes / 'coco'}", "--out", str(tmp_path / "r"), "--epochs", "1",
                             "--device", "cpu", "--workers", "0"], stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(2.0)  # importing torch or building the models: before the training loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err


def test_an_interrupted_run_is_announced_by_rank_0_only(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]):
    from kdcli import cli
    from kdcli.engine.guards import Interrupted

    def stopped() -> None:
        raise Interrupted("interrupted by SIGTERM at epoch 1, batch 2/3 (step 2); checkpoint saved")

    monkeypatch.setattr(cli, "app", stopped)
    old = signal.getsignal(signal.SIGINT)  # main() installs kdcli's own handler
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        try:
            with pytest.raises(SystemExit) as info:
                cli.main()
        finally:
            signal.signal(signal.SIGINT, old)
        assert info.value.code == 130
        assert ("interrupted by SIGTERM" in capsys.readouterr().err) is shown, rank


def test_a_user_interrupt_reaches_the_entry_point(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]):
    """A second Ctrl-C inside the loop raises UserInterrupt: typer does not swallow it, main() says so."""
    from kdcli import cli
    from kdcli.engine.guards import GracefulStop

    def loop() -> None:
        with GracefulStop() as stop:
            stop._handler(signal.SIGINT, None)
            stop._handler(signal.SIGINT, None)

    monkeypatch.setattr(cli, "app", cli.typer.Typer())
    cli.app.command()(loop)
    monkeypatch.setattr(sys, "argv", ["kdcli"])
    old = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as info:
            cli.main()
    finally:
        signal.signal(signal.SIGINT, old)
    assert info.value.code == 130
    assert "interrupted by a second Ctrl-C" in capsys.readouterr().err

