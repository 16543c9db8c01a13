"""DDP on CPU with gloo: 2 processes launched by torchrun (and by ``kdcli train --nproc 2``).

- every rank ends with the same student + method tensors (bit for bit);
- sharded evaluation merged over 2 ranks equals evaluation in 1 process (segmentation confusion
  matrices summed; COCO detections gathered to rank 0, same predictions.json, same 12 numbers);
- the 2-process run (batch 1 per process) equals a 1-process run with batch 1 and ``--accumulate 2``
  (the same two single-image gradients averaged), and is close to a 1-process run with batch 2 (see
  ``test_two_processes_match_one_process``'s docstring for the tolerance and why it is not exact);
- DDP wrapping changes nothing the methods see (no ``module.`` prefix anywhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcli.config import RunConfig

WORKER = r"""
import json, sys
from dataclasses import replace
from pathlib import Path
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from kdcli.config import RunConfig
from kdcli.data import build_dataset, collate_detection
from kdcli.engine import distributed as ddp
from kdcli.engine.evaluate_model import evaluate_model
from kdcli.engine.build import build_run
from kdcli.engine.callbacks import standard
from kdcli.engine.loop import fit
from kdcli.models import build_model
from kdcli.zoo import get_spec

cfgs, out, det_data = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
runs = {}
for name, cfg in cfgs.items():  # two runs in one process group: BatchNorm student, frozen-BN student
    run = build_run(RunConfig(**cfg), log=lambda s: None)
    run.callbacks = standard()  # config.json and results.csv, as kdcli.api wires them
    assert (run.dist.world, run.dist.backend) == (2, "gloo") and hasattr(run.step_module, "no_sync")
    fit(run, progress=False)
    r = run.dist.rank
    state = {f"net.{k}": v for k, v in run.student.net.state_dict().items()}
    state.update({f"method.{k}": v for k, v in run.method.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{name}-rank{r}.safetensors"))
    runs[name] = run
run = runs["bn"]
seg = evaluate_model(run.student, run.val_loader, run.val_ds, run.device, shard=ddp.EvalShard(run.dist, run.val_ds))
spec = get_spec("shapes-r18-fcos")
spec = replace(spec, preprocess={**spec.preprocess, "min_size": 64, "max_size": 64})
torch.manual_seed(0)
det = build_model(spec)
det.net.score_thresh, det.net.detections_per_img = 0.0, 10  # an untrained head scores ~0.01: keep some
ds = build_dataset(det_data, "detection", "val", 64, train=False)
loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=ddp.ShardSampler(len(ds), r, 2),
                                     collate_fn=collate_detection)
dm = evaluate_model(det, loader, ds, run.device, out_dir=out / f"det{r}", shard=ddp.EvalShard(run.dist, ds))
if r == 0:
    save_file({k: v.contiguous() for k, v in det.net.state_dict().items()}, str(out / "det.safetensors"))
(out / f"eval{r}.json").write_text(json.dumps({"seg": seg, "det": dm}))
ddp.finish(run.dist, True)  # leave the gloo group together (as api.train does): an exit with it alive can abort
"""


def _teacher(root: Path, name: str) -> Path:
    """An exported folder with randomly initialised weights: a teacher needs no training to be frozen."""
    from safetensors.torch import save_file

    from kdcli.models import build_model
    from kdcli.zoo import get_spec

    out = root / f"teacher-{name}"
    torch.manual_seed(123)
    spec = get_spec(name)
    net = build_model(spec).net
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model": spec.to_dict()}))
    return out


def _frozen_student(root: Path) -> Path:
    """LRASPP-MobileNetV3 with every BatchNorm frozen (random init): no statistics over the batch."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from kdcli.models import build_model
    from kdcli.zoo import get_spec

    out = root / "student-frozen-bn"
    spec = replace(get_spec("shapes-mbv3-lraspp"), norm="frozen")
    torch.manual_seed(5)
    net = build_model(spec).net
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model": spec.to_dict()}))
    return out


def _cfg(tiny_shapes: Path, teacher: Path, out: Path, **kw) -> dict:
    (tiny_shapes / "cityscapes" / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
    base = dict(model="shapes-mbv3-lraspp", teacher=str(teacher), method="kd+fitnet",
                data=f"semantic:{tiny_shapes / 'cityscapes'}", out=str(out), epochs=2, batch_size=1, image_size=64,
                max_train_images=4, max_val_images=4, workers=0, optimizer="sgd", lr=0.01, warmup_iters=0,
                bn_recal=0, eval_every=0, device="cpu", skip_teacher_check=True)
    base.update(kw)
    return base


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


@pytest.fixture(scope="module")
def two_ranks(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    teacher = _teacher(root, "shapes-mbv3-lraspp")
    script = root / "worker.py"
    script.write_text(WORKER)
    cfgs = {"bn": _cfg(tiny_shapes, teacher, root / "ddp"),
            "frozen": _cfg(tiny_shapes, teacher, root / "ddp-frozen", model=str(_frozen_student(root)))}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         json.dumps(cfgs), str(root), f"coco:{tiny_shapes / 'coco'}"],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, teacher


@pytest.mark.slow
def test_every_rank_holds_the_same_checkpoint(two_ranks: tuple[Path, Path]):
    root, _ = two_ranks
    for name, folder in (("bn", "ddp"), ("frozen", "ddp-frozen")):
        a, b = (load_file(str(root / f"{name}-rank{r}.safetensors")) for r in (0, 1))
        assert set(a) == set(b) and any(k.startswith("method.") for k in a)
        assert any("running_mean" in k for k in a)
        for k in a:  # parameters, BatchNorm statistics, method adapters
            assert torch.equal(a[k], b[k]), (name, k)
        saved = load_file(str(root / folder / "weights" / "last.safetensors"))  # what rank 0 wrote
        assert set(saved) == set(a)
        for k in saved:
            assert torch.equal(saved[k], a[k]), (name, k)
    record = json.loads((root / "ddp" / "config.json").read_text())
    assert record["effective_batch"] == 2 and record["training"]["world_size"] == 2
    assert record["training"]["backend"] == "gloo" and record["training"]["lr_used"] == 0.01


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(two_ranks: tuple[Path, Path], tiny_shapes: Path):
    root, _ = two_ranks
    e0, e1 = (json.loads((root / f"eval{r}.json").read_text()) for r in (0, 1))
    assert e0 == e1  # every rank got rank 0's numbers
    # one thread, as torchrun gives each rank (OMP_NUM_THREADS=1): oneDNN's float32 kernels can round differently
    # with another thread count (seen on an AMX CPU: 1e-6 apart, enough to reorder an untrained head's near-tied
    # detections), and this test is about sharding, not threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _one_process_equals_ranks(root, tiny_shapes, e0)
    finally:
        torch.set_num_threads(threads)


def _one_process_equals_ranks(root: Path, tiny_shapes: Path, e0: dict) -> None:
    from dataclasses import replace

    from kdcli.data import build_dataset, collate_detection, collate_segmentation, subset
    from kdcli.engine.evaluate_model import evaluate_model
    from kdcli.models import build_model
    from kdcli.zoo import get_spec

    # segmentation: the trained student over the same 4 images in one process
    spec = get_spec("shapes-mbv3-lraspp")
    spec = replace(spec, preprocess={**spec.preprocess, "size": 64})
    seg = build_model(spec)
    seg.net.load_state_dict({k[4:]: v for k, v in load_file(str(root / "bn-rank0.safetensors")).items()
                             if k.startswith("net.")})
    ds = subset(build_dataset(f"semantic:{tiny_shapes / 'cityscapes'}", "segmentation", "val", 64, train=False), 4)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate_segmentation)
    one = json.loads(json.dumps(evaluate_model(seg, loader, ds, torch.device("cpu"))))
    assert one == e0["seg"] and 0 < one["pixel_acc"] <= 1
    # detection: every image's detections, in the order one process writes them, and the 12 numbers
    dspec = get_spec("shapes-r18-fcos")
    det = build_model(replace(dspec, preprocess={**dspec.preprocess, "min_size": 64, "max_size": 64}),
                      root / "det.safetensors")
    det.net.score_thresh, det.net.detections_per_img = 0.0, 10
    dds = build_dataset(f"coco:{tiny_shapes / 'coco'}", "detection", "val", 64, train=False)
    dl = torch.utils.data.DataLoader(dds, batch_size=1, collate_fn=collate_detection)
    dm = evaluate_model(det, dl, dds, torch.device("cpu"), out_dir=root / "det-one")
    assert dm == e0["det"]
    preds = json.loads((root / "det-one" / "predictions.json").read_text())
    assert len(preds) > 0 and preds == json.loads((root / "det0" / "predictions.json").read_text())
    assert not (root / "det1" / "predictions.json").exists()  # rank 1 only sent its results


@pytest.mark.slow
def test_two_processes_match_one_process(two_ranks: tuple[Path, Path], tiny_shapes: Path, tmp_path: Path):
    """Two processes with batch 1 each against one process (SGD, 4 steps).

    - ``--accumulate 2`` with batch 1: both average the gradients of the same two single-image
      micro-batches (the sampler gives rank r images r, r+2, ...; one process takes them in pairs)
      and halving is exact in floating point, so the parameters agree to float32 round-off
      (asserted: max abs difference <= 1e-6; measured 0). BatchNorm running statistics are not
      compared: DDP keeps rank 0's (its images only), one process averages both micro-batches.
    - batch 2: with BatchNorm the two differ at the first step (statistics over 1 vs 2 images; the
      distance was 1.3x the whole update). With every BatchNorm frozen the remaining difference is
      the loss normalisation (the mean over each image's labelled pixels vs over both images'):
      asserted distance < 5 % of the distance the parameters moved (measured 0.7 %; a run without
      gradient averaging is 160 % away).
    """
    from kdcli import api
    from kdcli.engine.build import build_run

    root, teacher = two_ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the thread count changes float reduction order
    try:
        api.train(RunConfig(**_cfg(tiny_shapes, teacher, tmp_path / "acc", accumulate=2)), log=lambda s: None)
        frozen = dict(model=str(root / "student-frozen-bn"), batch_size=2)
        start = build_run(RunConfig(**_cfg(tiny_shapes, teacher, tmp_path / "b2", **frozen)), log=lambda s: None)
        init = {f"net.{k}": v.clone() for k, v in start.student.net.state_dict().items()}
        init.update({f"method.{k}": v.clone() for k, v in start.method.state_dict().items()})
        api.train(RunConfig(**_cfg(tiny_shapes, teacher, tmp_path / "b2", **frozen)), log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    ddp = load_file(str(root / "bn-rank0.safetensors"))
    acc = load_file(str(tmp_path / "acc" / "weights" / "last.safetensors"))
    for k in ddp:
        if "running_" not in k and "num_batches" not in k:
            torch.testing.assert_close(acc[k], ddp[k], rtol=0, atol=1e-6, msg=k)
    ddp = load_file(str(root / "frozen-rank0.safetensors"))
    b2 = load_file(str(tmp_path / "b2" / "weights" / "last.safetensors"))
    params = [k for k in ddp if ddp[k].is_floating_point() and not torch.equal(ddp[k], init[k])]

    def flat(d: dict) -> torch.Tensor:
        return torch.cat([d[k].double().flatten() for k in params])

    moved = (flat(ddp) - flat(init)).norm()
    apart = (flat(ddp) - flat(b2)).norm()
    assert moved > 0 and apart / moved < 0.05, float(apart / moved)


@pytest.mark.slow
def test_kdcli_nproc_runs_the_command_under_torchrun(tiny_shapes: Path, tmp_path: Path):
    out = tmp_path / "cli"
    (tiny_shapes / "cityscapes" / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kdcli", "train", "--model", "shapes-mbv3-lraspp", "--data",
         f"semantic:{tiny_shapes / 'cityscapes'}", "--out", str(out), "--epochs", "1", "-b", "1", "--image-size",
         "64", "--max-train-images", "2", "--max-val-images", "2", "--workers", "0", "--device", "cpu",
         "--bn-recal", "1", "--nproc=2", "--scale-lr", "--lr", "0.001", "--optimizer", "adamw"],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # rank 0 alone reports
    record = json.loads((out / "config.json").read_text())
    t = record["training"]
    assert (t["world_size"], t["effective_batch"], t["lr_used"]) == (2, 2, 0.002)
    assert t["lr_rule"].startswith("linear")
    assert len(list(csv_rows(out / "results.csv"))) == 1 and (out / "weights" / "best.safetensors").is_file()


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_launch_flags_are_stripped_and_checked():
    from kdcli.engine.distributed import launch_plan, strip_launch_flags
    from kdcli.errors import ConfigError

    argv = ["distill", "--nproc", "4", "--devices=0,1", "-b", "2", "--set", "w=1", "--nproc=3"]
    assert strip_launch_flags(argv) == ["distill", "-b", "2", "--set", "w=1"]
    assert launch_plan(3, None) == (3, {})
    with pytest.raises(ConfigError, match="--nproc 0"):
        launch_plan(0, None)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--devices 0,1: CUDA is not available"):
            launch_plan(None, "0,1")
    with pytest.raises(ConfigError, match="--devices a,b"):
        launch_plan(None, "a,b")


def test_isolated_rng_seeds_the_sample_and_restores_the_caller_without_touching_cuda(monkeypatch):
    import random

    import numpy as np
    import torch

    from kdcli.engine.distributed import isolated_rng

    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(s))
    torch.manual_seed(123)
    calls.clear()
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with isolated_rng(7):
        a = (torch.rand(3), random.random(), np.random.rand())
    with isolated_rng(7):
        b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]  # the same sample seed, the same draws
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()
    assert calls == []  # the per-rank CUDA streams (dropout, method masks) are left alone


def test_finish_leaves_a_group_it_did_not_create(tmp_path: Path, monkeypatch):
    import torch.distributed as tdist

    from kdcli.engine import distributed as ddp

    monkeypatch.setattr(ddp, "_OWNED", False)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        info = ddp.init("cpu")  # joins the caller's group
        assert info.enabled and info.world == 1
        ddp.finish(info, ok=True)
        assert tdist.is_initialized()  # the caller's: left alone
        monkeypatch.setattr(ddp, "_OWNED", True)  # as after init() created it
        ddp.finish(info, ok=True)
        assert not tdist.is_initialized() and ddp._OWNED is False
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def test_launcher_stderr_replaces_torchruns_signal_traceback_only():
    """A SIGTERM makes torchrun raise SignalException in the launcher: that traceback (nothing failed) becomes
    one line; a worker's real traceback and every other line pass unchanged."""
    import io

    from kdcli.engine.distributed import LauncherStderr

    signal_tb = ["Traceback (most recent call last):\n", '  File "<frozen runpy>", line 198, in _run_module_as_main\n',
                 "    return _run_code(code, main_globals, None,\n", "\n",
                 "torch.distributed.elastic.multiprocessing.api.SignalException: Process 2306 got signal: 15\n"]
    real_tb = ["Traceback (most recent call last):\n", '  File "x.py", line 1, in <module>\n',
               "ValueError: a real failure\n"]
    out = io.StringIO()
    f = LauncherStderr(out)
    for line in ["W1203 Received 15 death signal, shutting down workers\n", "interrupted by SIGTERM at epoch 6\n",
                 *real_tb, *signal_tb, "after\n", "Traceback (most recent call last):\n", "  cut short\n"]:
        f.feed(line)
    f.close()
    first = "W1203 Received 15 death signal, shutting down workers\ninterrupted by SIGTERM at epoch 6\n"
    one = "launcher: stopped by signal 15 (the ranks' own line above says what they kept)\n"
    assert out.getvalue() == first + "".join(real_tb) + one + "after\nTraceback (most recent call last):\n  cut short\n"

