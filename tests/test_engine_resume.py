"""Resume loses nothing: a real SIGKILL after a random-but-seeded step, or a SIGTERM, then
``--resume``, give bit-identical final weights and loss logs to a run that was never interrupted
(CPU, fixed seed). A kill inside a checkpoint write is covered file by file in
tests/test_engine_checkpoint.py.

The run: LRASPP-MobileNetV3 at 64 px distilled with ``mgd+maskd`` (MGD's random masks draw on the
global torch RNG, MGD's generator and MasKD's iteration buffer are method state), random
augmentation, 2 epochs of 3 steps, a checkpoint every 2 steps and at epoch ends. The interrupted
runs load data with 2 worker processes, the reference in the training process: augmentation is
seeded per sample, so the worker count must not matter either.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcli import api
from kdcli.config import RunConfig

# the killed child: SIGKILL itself right after its n-th optimizer step (LambdaLR.step runs once per step)
CHILD = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(2)
from torch.optim.lr_scheduler import LambdaLR
from kdcli import api
from kdcli.config import RunConfig
cfg, n = json.loads(sys.argv[1]), int(sys.argv[2])
orig, calls = LambdaLR.step, [-1]  # the constructor calls step() once
def step(self, *a, **k):
    orig(self, *a, **k)
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
LambdaLR.step = step
api.train(RunConfig(**cfg), log=lambda s: None)
"""


def _teacher(root: Path, name: str) -> Path:
    """An exported folder with randomly initialised weights: a teacher needs no training to be frozen."""
    from safetensors.torch import save_file

    from kdcli.models import build_model
    from kdcli.zoo import get_spec

    out = root / f"teacher-{name}"
    if not out.exists():
        torch.manual_seed(123)
        spec = get_spec(name)
        net = build_model(spec).net
        out.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({"model": spec.to_dict()}))
    return out


def _cfg(tiny_shapes: Path, teacher: Path, out: Path, workers: int = 2) -> dict:
    (tiny_shapes / "cityscapes" / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
    return dict(model="shapes-mbv3-lraspp", teacher=str(teacher), method="mgd+maskd", set={"mgd.taps": "c3"},
                data=f"semantic:{tiny_shapes / 'cityscapes'}", out=str(out), epochs=2, batch_size=2, image_size=64,
                max_train_images=6, max_val_images=2, workers=workers, optimizer="adamw", lr=1e-3, warmup_iters=2,
                bn_recal=1, device="cpu", ckpt_every_steps=2, skip_teacher_check=True)


@pytest.fixture(scope="module")
def reference(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    teacher = _teacher(root, "shapes-mbv3-lraspp")
    api.train(RunConfig(**_cfg(tiny_shapes, teacher, root / "full", workers=0)), log=lambda s: None)
    return root, teacher


def _same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "weights" / "last.safetensors")), load_file(str(b / "weights" / "last.safetensors"))
    assert set(wa) == set(wb) and any(k.startswith("method.") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit for bit
    ra = list(csv.DictReader(open(a / "results.csv")))
    rb = list(csv.DictReader(open(b / "results.csv")))
    assert len(ra) == len(rb) == 2  # no epoch row lost or written twice
    for x, y in zip(ra, rb, strict=True):
        keep = ("loss/", "val/", "lr", "mask/")  # mask statistics: their sampling position and sums resume too
        assert {k: v for k, v in x.items() if k.startswith(keep)} == {k: v for k, v in y.items() if k.startswith(keep)}
    assert any(k.startswith("mask/") for k in ra[0])


def _child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).parents[1])}


def test_sigkill_after_a_random_step_then_resume_is_bit_identical(reference: tuple[Path, Path], tiny_shapes: Path):
    root, teacher = reference
    cfg = _cfg(tiny_shapes, teacher, root / "killed")
    # steps 1..6; checkpoints after steps 2 (mid-epoch), 3 (epoch end), 4 (mid-epoch), 6 (end). Killed
    # right after step n's update, before anything else: n = 3 (epoch 1's last step, its end-of-epoch
    # work lost) or n = 5 (mid-epoch 2); the newest checkpoint is then mid-epoch (step 2 or 4), and
    # everything after it is redone. (n = 4 resumes from the epoch-end checkpoint: the legacy path.)
    n = random.Random(7).choice([3, 5])
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(n)],
                          env=_child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = torch.load(root / "killed" / "weights" / "last_state.pt", weights_only=True)
    assert state["step"] == n - 1 and state["pos"] == {3: 2, 5: 1}[n]  # mid-epoch
    logs: list[str] = []
    api.resume(root / "killed", log=logs.append)
    assert any(line.startswith("resumed ") for line in logs)
    # the killed writer's lock record is reported, and the folder taken over
    assert any("stale lock of process" in line and "(no longer runs)" in line for line in logs), logs
    _same_run(root / "full", root / "killed")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(reference: tuple[Path, Path], tiny_shapes: Path):
    root, teacher = reference
    out = root / "term"
    c = _cfg(tiny_shapes, teacher, out)
    cmd = [sys.executable, "-m", "kdcli", "distill", "--student", c["model"], "--teacher", c["teacher"],
           "--method", c["method"], "--set", "mgd.taps=c3", "--data", c["data"], "--out", str(out),
           "--epochs", "2", "-b", "2", "--image-size", "64", "--max-train-images", "6", "--max-val-images", "2",
           "--workers", "2", "--optimizer", "adamw", "--lr", "1e-3", "--warmup-iters", "2", "--bn-recal", "1",
           "--device", "cpu", "--ckpt-every-steps", "0", "--skip-teacher-check", "--schedule", "cosine"]
    proc = subprocess.Popen(cmd, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "config.json").exists():  # written once the signal handlers are in place
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted by SIGTERM" in err and f"kdcli distill --resume {out}" in err and "error:" not in err
    state = torch.load(out / "weights" / "last_state.pt", weights_only=True)
    assert 1 <= state["step"] < 6  # stopped at a step boundary, before the end
    api.resume(out, log=lambda s: None)
    _same_run(root / "full", out)


# -- how far a run went: the same checkpoint choice as --resume ---------------------------------
def test_finished_epochs_uses_the_checkpoint_fallback(tmp_path: Path):
    """``api._finished_epochs`` (how the demo and ``kdcli bench quality`` tell a finished teacher from an
    interrupted one) takes the newest *intact* checkpoint, as ``--resume`` does: a damaged last_state.pt
    or last.safetensors, or a kill between the renames of a write, falls back to prev."""
    import shutil

    from kdcli.engine.checkpoint import save_checkpoint

    logs: list[str] = []
    assert api._finished_epochs(tmp_path / "none", log=logs.append) == 0
    w = tmp_path / "run" / "weights"
    save_checkpoint(w, {"net.x": torch.zeros(3)}, {"epoch": 1, "step": 3})
    save_checkpoint(w, {"net.x": torch.ones(3)}, {"epoch": 2, "step": 6})
    assert api._finished_epochs(tmp_path / "run") == 2
    cases = (("last_state.pt", "unreadable", 1),  # truncated/garbage state: prev (epoch 1)
             ("last.safetensors", "no intact tensor file", 1),  # a flipped byte: its checksum fails
             ("killed", "", 2))  # killed after the renames last -> prev, before the new last: prev is epoch 2
    for case_name, said, want in cases:
        case = tmp_path / case_name
        shutil.copytree(tmp_path / "run", case)
        cw = case / "weights"
        if case_name == "last_state.pt":
            (cw / "last_state.pt").write_bytes(b"not a zip")
        elif case_name == "last.safetensors":
            data = bytearray((cw / "last.safetensors").read_bytes())
            data[-1] ^= 0xFF
            (cw / "last.safetensors").write_bytes(bytes(data))
        else:
            for suffix in ("_state.pt", ".safetensors"):
                os.replace(cw / f"last{suffix}", cw / f"prev{suffix}")
        before = len(logs)
        assert api._finished_epochs(case, log=logs.append) == want, case_name
        assert all(said in line for line in logs[before:]) and (not said or logs[before:]), logs[before:]
    for name in ("last_state.pt", "prev_state.pt"):
        (w / name).write_bytes(b"broken")
    assert api._finished_epochs(tmp_path / "run", log=logs.append) == 0  # nothing intact: nothing to continue
    assert "no intact checkpoint" in logs[-1]


def test_a_damaged_last_state_resumes_from_prev_bit_identically(reference: tuple[Path, Path]):
    """The reference run's last checkpoint (end of epoch 2) made unreadable: the status says 1 epoch done
    (prev: step 4, mid-epoch 2) and --resume redoes the rest from prev, ending on the same weights."""
    import shutil

    root, _ = reference
    out = root / "damaged-last"
    shutil.copytree(root / "full", out)
    (out / "weights" / "last_state.pt").write_bytes(b"\x00" * 64)
    logs: list[str] = []
    assert api._finished_epochs(out, log=logs.append) == 1
    assert any("last_state.pt: unreadable" in line for line in logs), logs
    api.resume(out, log=logs.append)
    assert any(line.startswith("resumed ") and "from prev_state.pt" in line for line in logs), logs
    _same_run(root / "full", out)
    assert api._finished_epochs(out) == 2
    # the damaged pair was overwritten, not rotated into prev: two intact checkpoints, as documented
    for slot, step in (("last", 6), ("prev", 4)):
        state = torch.load(out / "weights" / f"{slot}_state.pt", weights_only=True)
        data = (out / "weights" / f"{slot}.safetensors").read_bytes()
        assert state["step"] == step and hashlib.sha256(data).hexdigest() == state["tensors_sha256"], slot


# -- the resume hint names the command that started the run ------------------------------------
def test_started_by_reads_the_command_line_or_else_the_config(monkeypatch: pytest.MonkeyPatch):
    from kdcli.api import started_by
    from kdcli.config import apply_objective_and_augment

    pskd = RunConfig(model="m", method="pskd")
    for argv, want in ((["/venv/bin/kdcli", "train", "--method", "pskd"], "train"),
                       (["/venv/bin/kdcli", "--offline", "distill", "--method", "pskd"], "distill"),
                       (["/src/kdcli/__main__.py", "distill", "--method", "pskd"], "distill"),  # torchrun -m kdcli
                       (["/venv/bin/kdcli", "bench", "quality"], "train")):  # not a training command: the config
        monkeypatch.setattr(sys, "argv", argv)
        assert started_by(pskd) == want, argv
    monkeypatch.setattr(sys, "argv", ["pytest"])  # the Python API: what only `distill` takes decides
    assert started_by(apply_objective_and_augment(RunConfig(model="m", objective="mcmi"))) == "train"
    assert started_by(RunConfig(model="m", method="pskd")) == "train"
    assert started_by(RunConfig(model="m", method="cwd", teacher="t")) == "distill"


@pytest.mark.slow
def test_the_resume_hint_names_the_command_that_started_the_run(tiny_shapes: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    """`kdcli train --method pskd` interrupted: the hint says `kdcli train --resume`, not `distill`; a run
    started by `kdcli distill` keeps saying `distill` after a resume by any means (config.json records it)."""
    from kdcli.engine import loop
    from kdcli.engine.guards import GracefulStop, Interrupted

    class SignalledAtOnce(GracefulStop):  # as if SIGTERM arrived during the first step
        def __enter__(self) -> GracefulStop:
            super().__enter__()
            self.requested = "SIGTERM"
            return self

    monkeypatch.setattr(loop, "GracefulStop", SignalledAtOnce)
    (tiny_shapes / "cityscapes" / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
    base = dict(model="shapes-mbv3-lraspp", method="pskd", data=f"semantic:{tiny_shapes / 'cityscapes'}", epochs=1,
                batch_size=2, image_size=64, max_train_images=4, max_val_images=2, workers=0, device="cpu")
    for command in ("train", "distill"):
        out = tmp_path / command
        monkeypatch.setattr(sys, "argv", ["/venv/bin/kdcli", command, "--method", "pskd"])
        with pytest.raises(Interrupted, match=f"Continue with: kdcli {command} --resume {out}$"):
            api.train(RunConfig(out=str(out), **base), log=lambda s: None)
        assert json.loads((out / "config.json").read_text())["command"] == command
    monkeypatch.setattr(sys, "argv", ["/venv/bin/kdcli", "train", "--resume", str(tmp_path / "distill")])
    with pytest.raises(Interrupted, match=f"Continue with: kdcli distill --resume {tmp_path / 'distill'}$"):
        api.resume(tmp_path / "distill", log=lambda s: None)
