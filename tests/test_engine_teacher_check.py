"""The teacher check before distillation (kdcli/engine/teacher_check.py) and the zoo's refusal of
backbone-only teachers."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kdcli.config import RunConfig
from kdcli.data import build_dataset, collate_segmentation, subset
from kdcli.engine.build import build_run
from kdcli.engine.evaluate_model import evaluate_model
from kdcli.engine.teacher_check import reference_metric, teacher_check
from kdcli.errors import TrainingError, ZooError
from kdcli.io import save_json, save_tensors
from kdcli.models import build_model
from kdcli.zoo import SHAPES_SEG, get_spec, resolve_ref


def teacher_folder(folder: Path, name: str, metric: dict | None = None, metrics: dict | None = None) -> Path:
    """An exported-model folder (config.json + model.safetensors) holding randomly initialised weights."""
    spec = get_spec(name)
    if metric:
        spec = replace(spec, metric=metric)
    torch.manual_seed(0)
    model = build_model(spec)
    save_json(folder / "config.json", {"model": spec.to_dict(), "metrics": metrics or {}})
    save_tensors(folder / "model.safetensors", model.net.state_dict())
    return folder


@pytest.fixture
def seg_data(tiny_shapes: Path, tmp_path: Path) -> str:
    root = tmp_path / "seg"
    shutil.copytree(tiny_shapes / "cityscapes", root)
    (root / "classes.txt").write_text("\n".join(SHAPES_SEG) + "\n")
    return f"semantic:{root}"


def test_threshold_against_the_recorded_metric(seg_data: str, tmp_path: Path):
    ds = build_dataset(seg_data, "segmentation", "val", 64, train=False)
    folder = teacher_folder(tmp_path / "t", "shapes-r18-deeplabv3")
    ref = resolve_ref(str(folder))
    teacher = build_model(ref.spec, ref.weights).eval()
    loader = torch.utils.data.DataLoader(subset(ds, 2), batch_size=2, collate_fn=collate_segmentation)
    measured = evaluate_model(teacher, loader, subset(ds, 2), torch.device("cpu"))["mIoU"]
    assert measured > 0
    logs: list[str] = []
    assert teacher_check(teacher, str(folder), ds, torch.device("cpu"), images=2, log=logs.append)["measured"] is None
    assert "skipped" in logs[-1]  # no reported or recorded mIoU

    def record(miou: float) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["metrics"] = {"mIoU": miou}
        (folder / "config.json").write_text(json.dumps(cfg))

    record(measured)  # as good as recorded: passes, and says so next to the reference
    import kdcli.progress

    labels: list[str] = []
    real_track = kdcli.progress.track

    def spy(items, label, *a, **kw):  # noqa: ANN001, ANN002, ANN003 - the progress display's own signature
        labels.append(label)
        return real_track(items, label, *a, **kw)

    kdcli.progress.track = spy
    try:
        res = teacher_check(teacher, str(folder), ds, torch.device("cpu"), images=2, log=logs.append)
    finally:
        kdcli.progress.track = real_track
    assert labels == ["teacher check"]  # its progress says what is being evaluated
    assert res["measured"] == pytest.approx(measured) and res["reference"] == pytest.approx(measured)
    assert f"{measured:.4f} on 2 validation images vs {measured:.4f}" in logs[-1]
    record(2 * measured + 0.04)  # below half, but within the absolute margin of 0.05: a noisy tiny teacher
    teacher_check(teacher, str(folder), ds, torch.device("cpu"), images=2, log=logs.append)
    record(2 * measured + 0.06)  # below half and more than 0.05 below: stop, in one line
    with pytest.raises(TrainingError) as err:
        teacher_check(teacher, str(folder), ds, torch.device("cpu"), images=2, log=logs.append)
    msg = str(err.value)
    assert "\n" not in msg and "below 50%" in msg and "--skip-teacher-check" in msg and str(folder) in msg


def test_reference_prefers_the_reported_metric(tmp_path: Path):
    spec = replace(get_spec("shapes-r18-fcos"), metric={"box_map": 39.2})
    assert reference_metric(spec, "x") == (pytest.approx(0.392), "reported box_map of shapes-r18-fcos")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"epoch": 3, "mAP": 0.25}))
    value, where = reference_metric(get_spec("shapes-r18-fcos"), str(run))
    assert value == 0.25 and "metrics.json" in where
    assert reference_metric(get_spec("shapes-r18-fcos"), str(tmp_path / "nothing")) is None


def _distill_cfg(tiny_shapes: Path, tmp_path: Path, teacher: str, **kw) -> RunConfig:
    return RunConfig(model="shapes-r18-fcos", teacher=teacher, method="kd", data=f"coco:{tiny_shapes / 'coco'}",
                     out=str(tmp_path / "run"), image_size=64, batch_size=2, workers=0, device="cpu",
                     max_train_images=4, max_val_images=4, **kw)


def test_random_teacher_with_a_reported_metric_stops_the_run(tiny_shapes: Path, tmp_path: Path):
    folder = teacher_folder(tmp_path / "imported", "shapes-r34-fcos", metric={"box_map": 39.0})
    logs: list[str] = []
    with pytest.raises(TrainingError, match=r"scores mAP 0\.0\d* on 4 validation images, below 50% of its 0\.3900"):
        build_run(_distill_cfg(tiny_shapes, tmp_path, str(folder)), log=logs.append)
    run = build_run(_distill_cfg(tiny_shapes, tmp_path, str(folder), skip_teacher_check=True), log=logs.append)
    assert run.teacher is not None and not any("teacher check" in m for m in logs[1:])


def test_backbone_only_zoo_teacher_is_refused(tiny_shapes: Path, tmp_path: Path):
    with pytest.raises(ZooError, match=r"--teacher r18-retina: the zoo has only ImageNet backbone weights"):
        build_run(_distill_cfg(tiny_shapes, tmp_path, "r18-retina"), log=lambda _m: None)
