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
        assert {k: v for k, v in x.items() if k.startswith(("loss/", "val/", "lr"))} == \
               {k: v for k, v in y.items() if k.startswith(("loss/", "val/", "lr"))}


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
    _same_run(root / "full", root / "killed")


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
