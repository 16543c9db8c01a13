"""Export: the student alone in safetensors, ONNX and TorchScript graphs checked against PyTorch."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kdcli import api
from kdcli.config import RunConfig
from kdcli.errors import ConfigError, ZooError
from kdcli.export import (
    ATOL,
    RTOL,
    ExportError,
    check_images,
    detection_params,
    export,
    inference_module,
    parse_formats,
    select_detections,
)
from kdcli.io import save_json, save_tensors
from kdcli.models import Batch, build_model
from kdcli.zoo import get_spec, resolve_ref

SEG_CLASSES = ["background", "circle", "square", "triangle"]


def model_folder(folder: Path, spec_or_name, seed: int = 0) -> Path:
    """A folder usable as a model (``model.json`` + ``weights/best.safetensors``), freshly initialised."""
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    torch.manual_seed(seed)
    model = build_model(spec)
    save_json(folder / "model.json", {"model": spec.to_dict()})
    save_tensors(folder / "weights" / "best.safetensors", model.net.state_dict())
    return folder


def close(got, want) -> float:
    """Worst |got - want| / (ATOL + RTOL |want|): <= 1 means within the stated tolerance."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    return float((np.abs(got - want) / (ATOL + RTOL * np.abs(want))).max())


@pytest.fixture(scope="module")
def distilled(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MGD run (1 step): its last.safetensors holds the generators next to the student."""
    root = tmp_path_factory.mktemp("kd")
    data = root / "cityscapes"
    shutil.copytree(tiny_shapes / "cityscapes", data)  # the shared fixture stays untouched
    (data / "classes.txt").write_text("\n".join(SEG_CLASSES) + "\n")
    teacher = model_folder(root / "teacher", "shapes-mbv3-lraspp", seed=1)
    cfg = RunConfig(model="shapes-mbv3-lraspp", teacher=str(teacher), method="mgd",
                    data=f"semantic:{data}", out=str(root / "run"), epochs=1, batch_size=4,
                    image_size=64, workers=0, optimizer="adamw", lr=1e-3, warmup_iters=1, bn_recal=1,
                    max_train_images=4, max_val_images=2, device="cpu")
    folder, _ = api.train(cfg, log=lambda s: None)
    return folder


def test_safetensors_export_holds_the_student_alone(distilled: Path, tmp_path: Path):
    res = export(distilled, tmp_path / "exp")
    exp = res.folder / "model.safetensors"
    state = load_file(str(exp))
    own = build_model(get_spec("shapes-mbv3-lraspp")).net.state_dict()
    # key inspection: exactly the torchvision model's keys, nothing of the method or the teacher
    assert set(state) == set(load_file(str(distilled / "weights" / "best.safetensors")))
    assert set(state) <= set(own) and {k for k in own if not k.endswith("num_batches_tracked")} <= set(state)
    last = load_file(str(distilled / "weights" / "last.safetensors"))
    method_keys = [k for k in last if k.startswith("method.")]
    assert method_keys, "the run should checkpoint MGD's generators"
    assert not any(k.startswith(("method.", "net.", "teacher", "generation")) for k in state)
    # size: the tensor bytes of the student plus a small header, far below the checkpoint with generators
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    method_bytes = sum(last[k].numel() * last[k].element_size() for k in method_keys)
    size = exp.stat().st_size
    assert tensor_bytes <= size <= tensor_bytes * 1.01 + 65536
    assert size < (distilled / "weights" / "last.safetensors").stat().st_size - 0.9 * method_bytes
    # flat string metadata
    with safe_open(str(exp), "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["architecture"] == "lraspp" and meta["task"] == "segmentation" and meta["method"] == "mgd"
    assert json.loads(meta["classes"]) == SEG_CLASSES and json.loads(meta["preprocess"])["size"] == 64
    assert meta["teacher"] == "local run (teacher)" and "mIoU" in json.loads(meta["metrics"])  # no local path
    assert meta["kdcli_version"]
    cfg = json.loads((res.folder / "config.json").read_text())
    assert cfg["method"] == "mgd" and "mgd" in cfg["method_hparams"] and cfg["exports"] == {
        "safetensors": {"file": "model.safetensors"}}


def test_segmentation_onnx_matches_pytorch_at_any_size(distilled: Path, tmp_path: Path):
    import onnx
    import onnxruntime as ort

    res = export(distilled, tmp_path / "exp", formats="safetensors,onnx", onnx_exporter="legacy")  # 5x faster
    check = res.checks["onnx"]
    assert check["tolerance_used"] <= 1.0 and check["max_abs_diff"] < 1e-3
    path = res.files["onnx"]
    proto = onnx.load(str(path))
    # the graph's weights are the student's alone: initialiser bytes ~ the safetensors tensor bytes
    init_bytes = sum(np.prod(t.dims, dtype=np.int64) * 4 for t in proto.graph.initializer if t.data_type == 1)
    student_bytes = sum(t.numel() * t.element_size() for k, t in load_file(str(res.files["safetensors"])).items()
                        if t.is_floating_point() and "running" not in k)
    assert 0.98 * student_bytes <= init_bytes <= 1.02 * student_bytes + 4096
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["method"] == "mgd" and json.loads(meta["graph"])["dynamic"] == ["N", "H", "W"]
    # N, H and W are dynamic: check a size and batch other than those exported
    ref = resolve_ref(str(res.folder))
    model = build_model(ref.spec, ref.weights).eval()
    images = check_images(1, 96, seed=7)[..., :80]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        want = inference_module(model)(images).numpy()
    assert got.shape == (1, 4, 96, 80) and close(got, want) <= 1.0


@pytest.mark.slow
def test_detection_onnx_and_torchscript_boxes_scores_and_decoding(tmp_path: Path):
    import onnxruntime as ort

    run = model_folder(tmp_path / "run", "shapes-r18-fcos")
    res = export(run, formats=["onnx", "torchscript"])
    assert res.folder == run / "export" and set(res.files) == {"safetensors", "onnx", "torchscript", "config"}
    cfg = json.loads((res.folder / "config.json").read_text())
    params = cfg["exports"]["onnx"]["detection_params"]
    assert "not included" in cfg["exports"]["onnx"]["postprocess"] and params["nms_thresh"] == 0.6
    model = build_model(get_spec("shapes-r18-fcos"), res.files["safetensors"]).eval()
    images = check_images(2, 128, seed=5)
    with torch.no_grad():
        want = [t.numpy() for t in inference_module(model)(images)]
    got = ort.InferenceSession(str(res.files["onnx"]), providers=["CPUExecutionProvider"]).run(
        None, {"images": images.numpy()})
    assert [g.shape for g in got] == [(2, 341, 4), (2, 341, 4)]  # 16²+8²+4²+2²+1 locations, 3 classes + bg
    assert close(got[0], want[0]) <= 1.0 and close(got[1], want[1]) <= 1.0
    traced = torch.jit.load(str(res.files["torchscript"]))
    with torch.no_grad():
        ts = [t.numpy() for t in traced(images)]
    assert close(ts[0], want[0]) <= 1.0 and close(ts[1], want[1]) <= 1.0
    # select_detections on the graph's outputs == torchvision's own postprocess (threshold lowered so an
    # untrained detector keeps boxes)
    model.net.score_thresh = 0.05
    params = {**detection_params(model, 128), "input_size": [128, 128]}
    with torch.no_grad():
        x = (images - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
        ref = model(Batch(x, [(128, 128)] * 2, [(128, 128)] * 2, None, model.mean, model.std),
                    losses=False, predict=True).extras["detections"]
    mine = select_detections(torch.from_numpy(want[0]), torch.from_numpy(want[1]), params)
    for a, b in zip(mine, ref, strict=True):
        assert len(b["boxes"]) > 10
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-6)
        assert torch.equal(a["labels"], b["labels"])


def test_best_weights_with_method_tensors_are_refused(tmp_path: Path):
    run = model_folder(tmp_path / "run", "shapes-mbv3-lraspp")
    state = load_file(str(run / "weights" / "best.safetensors"))
    state["method.methods.mgd.generation.p3.0.weight"] = torch.zeros(4, 4)
    save_tensors(run / "weights" / "best.safetensors", state)
    with pytest.raises(ZooError, match="1 unexpected .*method.methods.mgd"):
        export(run)


def test_unsupported_formats_are_one_line_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="--format bogus: unknown format"):
        parse_formats("onnx,bogus")
    assert parse_formats("torchscript,onnx") == ["safetensors", "onnx", "torchscript"]
    spec = replace(get_spec("shapes-r18-fcos"), architecture="fasterrcnn", extra_levels="pool")
    with pytest.raises(ExportError, match="not fasterrcnn; use --format safetensors"):
        inference_module(build_model(spec))
    with pytest.raises(ConfigError, match="not a kdcli run folder"):
        export(tmp_path)


def test_cli_export_torchscript_of_a_timm_backbone(tmp_path: Path):
    from typer.testing import CliRunner

    from kdcli.cli import app

    run = model_folder(tmp_path / "run", "shapes-r18-deeplabv3")  # a timm backbone
    res = CliRunner().invoke(app, ["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "out"),
                                   "--image-size", "64"])
    assert res.exit_code == 0, res.output
    assert "torchscript: max |diff|" in res.output and "model.torchscript.pt" in res.output
    assert (tmp_path / "out" / "model.torchscript.pt").is_file()
    bad = CliRunner().invoke(app, ["export", str(run), "--format", "onnx,tflite"])
    assert isinstance(bad.exception, ConfigError)  # main() prints it as one line (tests/test_cli.py)
    assert str(bad.exception) == "--format tflite: unknown format (valid: safetensors, onnx, torchscript)"


def test_a_failed_graph_export_leaves_the_earlier_export_untouched(tmp_path: Path, monkeypatch):
    import kdcli.export as ex

    run = model_folder(tmp_path / "run", "shapes-r18-deeplabv3")
    out = tmp_path / "out"
    export(run, out, "safetensors,torchscript", image_size=64)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"model.safetensors", "model.torchscript.pt", "config.json"}

    model_folder(run, "shapes-r18-deeplabv3", seed=5)  # new weights, then a graph export that fails
    def boom(*args, **kwargs):
        raise ExportError("TorchScript output differs from PyTorch; not written")
    monkeypatch.setattr(ex, "write_torchscript", boom)
    with pytest.raises(ExportError, match="not written"):
        export(run, out, "safetensors,torchscript", image_size=64)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either
