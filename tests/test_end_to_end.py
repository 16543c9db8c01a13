"""End to end on a handful of shapes images: train, distill, resume, evaluate, export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcli import api
from kdcli.config import RunConfig
from kdcli.errors import ConfigError, KdcliError, TrainingError
from kdcli.models import build_model
from kdcli.zoo import load_model_config

pytestmark = pytest.mark.slow  # end-to-end: `make test-slow` (CI) runs these


def _cfg(tiny_shapes: Path, out: Path, **kw) -> RunConfig:
    base = dict(data=f"coco:{tiny_shapes / 'coco'}", out=str(out), epochs=1, batch_size=4, image_size=64,
                workers=0, optimizer="adamw", lr=1e-3, warmup_iters=2, bn_recal=2, device="cpu")
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def teacher_run(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    api.train(_cfg(tiny_shapes, out, model="shapes-r18-fcos"), log=lambda s: None)
    return out


def test_train_writes_a_complete_run_folder(teacher_run: Path):
    for f in ("config.json", "model.json", "env.json", "results.csv", "metrics.json", "predictions.json",
              "weights/best.safetensors", "weights/last.safetensors", "weights/last_state.pt"):
        assert (teacher_run / f).is_file(), f
    record = json.loads((teacher_run / "config.json").read_text())
    assert record["student"]["id"] == "shapes-r18-fcos" and len(record["student"]["init_hash"]) == 64
    rows = list(csv.DictReader(open(teacher_run / "results.csv")))
    assert len(rows) == 1 and float(rows[0]["loss/classification"]) > 0
    metrics = json.loads((teacher_run / "metrics.json").read_text())
    assert 0.0 <= metrics["mAP"] <= 1.0 and "AR100" in metrics
    assert api._finished_epochs(teacher_run) == 1  # what the demo uses to tell a cached teacher


def test_distill_cankd_and_export_round_trip(teacher_run: Path, tiny_shapes: Path, tmp_path: Path):
    out = tmp_path / "kd"
    cfg = _cfg(tiny_shapes, out, model="shapes-r18-fcos", teacher=str(teacher_run), method="cankd")
    folder, metrics = api.train(cfg, log=lambda s: None)
    rows = list(csv.DictReader(open(folder / "results.csv")))
    kd_cols = [k for k in rows[0] if k.startswith("loss/cankd.")]
    assert sorted(kd_cols) == ["loss/cankd.p3", "loss/cankd.p4", "loss/cankd.p5", "loss/cankd.p6"]
    # at 64 px P6 is 1x1: instance norm maps it to 0 for both, so only P3..P5 carry a loss
    assert all(float(rows[0][f"loss/cankd.{p}"]) > 0 for p in ("p3", "p4", "p5"))
    # export: the student alone, plain torchvision key names, metadata, reloadable
    exp = api.export(folder, tmp_path / "export")
    state = load_file(str(exp / "model.safetensors"))
    assert not any(k.startswith(("method.", "net.", "teacher")) for k in state)
    assert any(k.startswith("backbone.body.") for k in state) and any(k.startswith("head.") for k in state)
    best = load_file(str(folder / "weights" / "best.safetensors"))
    assert set(state) == set(best)
    last = load_file(str(folder / "weights" / "last.safetensors"))
    assert any(k.startswith("method.") for k in last)  # adapters are checkpointed for resume
    assert (exp / "model.safetensors").stat().st_size < (folder / "weights" / "last.safetensors").stat().st_size
    cfg_json = json.loads((exp / "config.json").read_text())
    assert cfg_json["method"] == "cankd" and cfg_json["model"]["architecture"] == "fcos"
    again = api.evaluate(str(exp), data=f"coco:{tiny_shapes / 'coco'}", device="cpu", workers=0)
    assert again["mAP"] == pytest.approx(metrics["mAP"], abs=1e-12)
    assert again["AP50"] == pytest.approx(metrics["AP50"], abs=1e-12)


def test_resume_gives_the_same_weights(tiny_shapes: Path, tmp_path: Path):
    full = _cfg(tiny_shapes, tmp_path / "full", model="shapes-r18-fcos", epochs=2, eval_every=0)
    api.train(full, log=lambda s: None)
    part = _cfg(tiny_shapes, tmp_path / "part", model="shapes-r18-fcos", epochs=2, eval_every=0)
    api.train(part, log=lambda s: None, stop_after=1)  # as if interrupted after epoch 1
    state = torch.load(tmp_path / "part" / "weights" / "last_state.pt", weights_only=True)
    assert state["epoch"] == 1
    api.resume(tmp_path / "part", log=lambda s: None)
    a = load_file(str(tmp_path / "full" / "weights" / "last.safetensors"))
    b = load_file(str(tmp_path / "part" / "weights" / "last.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_nonfinite_loss_stops_with_a_clear_message(tiny_shapes: Path, tmp_path: Path):
    cfg = _cfg(tiny_shapes, tmp_path / "nan", model="shapes-r18-fcos", optimizer="sgd",
               lr=1e12, grad_clip=0.0, warmup_iters=0, epochs=4, bn_recal=0)
    with pytest.raises(TrainingError, match="non-finite loss"):
        api.train(cfg, log=lambda s: None)


def test_teacher_class_mismatch_is_refused(teacher_run: Path, tmp_path: Path):
    from kdcli.data import write_shapes

    other = tmp_path / "other"
    write_shapes(other, n_train=4, n_val=2, size=64)
    ann = other / "coco" / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    data["categories"].append({"id": 99, "name": "star", "supercategory": "shape"})
    ann.write_text(json.dumps(data))
    cfg = _cfg(other, tmp_path / "x", model="shapes-r18-fcos", teacher=str(teacher_run), method="kd")
    cfg.data = f"coco:{other / 'coco'}"
    with pytest.raises(KdcliError, match="--teacher .* 3 classes .* 4"):
        api.train(cfg, log=lambda s: None)


def test_segmentation_distill_kd_runs(tiny_shapes: Path, tmp_path: Path):
    data = f"semantic:{tiny_shapes / 'cityscapes'}"
    (tiny_shapes / "cityscapes" / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
    t = _cfg(tiny_shapes, tmp_path / "segt", model="shapes-mbv3-lraspp", data=data)
    api.train(t, log=lambda s: None)
    s = _cfg(tiny_shapes, tmp_path / "segs", model="shapes-mbv3-lraspp", data=data, teacher=str(tmp_path / "segt"),
             method="kd+cankd", set={"kd.weight": "0.5"})
    folder, metrics = api.train(s, log=lambda s: None)
    assert 0.0 <= metrics["mIoU"] <= 1.0
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert "loss/kd.seg_logits" in rows[0] and "loss/cankd.c5" in rows[0]
    spec = load_model_config(folder / "model.json")
    assert spec.classes == ["background", "circle", "square", "triangle"]
    build_model(spec, folder / "weights" / "best.safetensors")  # strict load of the student


def test_incompatible_taps_refused_before_training(teacher_run: Path, tiny_shapes: Path, tmp_path: Path):
    from kdcli.errors import MethodError

    cfg = _cfg(tiny_shapes, tmp_path / "x", model="shapes-r18-fcos", teacher=str(teacher_run), method="cankd",
               set={"taps": "p2"})
    with pytest.raises(MethodError, match="needs tap 'p2'"):
        api.train(cfg, log=lambda s: None)
    assert not (tmp_path / "x" / "weights").exists()


def test_inherit_copies_neck_and_head_not_backbone(teacher_run: Path, tiny_shapes: Path, tmp_path: Path):
    from kdcli.engine.build import build_run

    cfg = _cfg(tiny_shapes, tmp_path / "inh", model="shapes-r18-fcos", teacher=str(teacher_run), method="cankd",
               inherit=True)
    run = build_run(cfg, log=lambda s: None)
    s, t = run.student.net.state_dict(), run.teacher.net.state_dict()
    copied = [k for k in t if not k.startswith("backbone.body.")]
    assert copied and all(torch.equal(s[k], t[k]) for k in copied)
    # the backbone body keeps its own initialisation
    assert not all(torch.equal(s[k], t[k]) for k in t if k.startswith("backbone.body.") and k.endswith("weight"))


def test_inherit_without_a_method_is_the_inherited_start_alone(teacher_run: Path, tiny_shapes: Path,
                                                               tmp_path: Path):
    """``--inherit`` and no method: the teacher initialises the neck and head, then the run is plain training
    (the control of the evidence suite); a teacher without --inherit or a method is still refused."""
    from kdcli.engine.build import build_run

    cfg = _cfg(tiny_shapes, tmp_path / "ctl", model="shapes-r18-fcos", teacher=str(teacher_run), inherit=True)
    run = build_run(cfg, log=lambda s: None)
    assert run.teacher is None and run.method is None
    t = build_run(_cfg(tiny_shapes, tmp_path / "t", model="shapes-r18-fcos", teacher=str(teacher_run), method="cankd",
                       inherit=True), log=lambda s: None).teacher.net.state_dict()
    s = run.student.net.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in t if not k.startswith("backbone.body."))
    with pytest.raises(ConfigError, match="--method"):
        build_run(_cfg(tiny_shapes, tmp_path / "no", model="shapes-r18-fcos", teacher=str(teacher_run)),
                  log=lambda s: None)
