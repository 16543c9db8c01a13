"""Export a student out of its run folder: safetensors (+ ONNX, TorchScript) of the student alone.

Formats (``kdcli export RUN --format safetensors,onnx,torchscript``):

- ``model.safetensors``: the tensors of ``weights/best.safetensors`` under the model's own key names,
  with flat string metadata, and ``config.json`` (model spec, provenance, metrics).
- ``model.onnx``: the inference graph, one self-contained file, checked with onnxruntime against
  PyTorch on a few images before it is kept.
- ``model.torchscript.pt``: the same inference graph traced with ``torch.jit.trace``.

The inference graph takes ``images``: float32 ``(N, 3, H, W)`` RGB in [0, 1] and normalises them
itself (the spec's mean/std are baked in).

- Segmentation: output ``logits`` ``(N, C, H, W)``, bilinearly upsampled to the input size; N, H and W
  are dynamic in the ONNX graph.
- One-stage detection (RetinaNet, FCOS): outputs ``boxes`` ``(N, A, 4)`` (x1, y1, x2, y2 in input
  pixels, decoded by the detector's own box coder, not clipped) and ``scores`` ``(N, A, K)`` (RetinaNet:
  sigmoid of the class logits; FCOS: sqrt(sigmoid(cls) * sigmoid(centerness))), K = the detector's
  class slots, column 0 being torchvision's never-trained background slot. **Post-processing is
  not in the graph**: score threshold, per-level top-k, class-wise NMS and clipping are data-dependent
  and left to :func:`select_detections`, which reproduces torchvision's ``postprocess_detections``
  on these outputs exactly. The spatial size is fixed at export (anchors are constants of it); N is
  dynamic. Two-stage detectors (Faster/Mask R-CNN) are not exported to ONNX/TorchScript.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet

from .errors import ConfigError, KdcliError
from .models import Batch, TapModel
from .zoo import ModelSpec

FORMATS = ("safetensors", "onnx", "torchscript")
ONE_STAGE = ("retinanet", "fcos")
ONNX_OPSET = 18
EXPORTERS = ("dynamo", "legacy")
GRAPH_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
# onnxruntime vs PyTorch, elementwise: |ort - torch| <= ATOL + RTOL * |torch| (float32 kernels differ in
# summation order; measured diffs are ~1e-7 on logits and ~1e-4 on boxes of ~100 px, see docs/publish.md)
ATOL, RTOL = 1e-4, 1e-3
CHECK_IMAGES = 3


class ExportError(KdcliError):
    """A format the model cannot be exported to, or an export that failed its numerical check."""


@dataclass
class Source:
    """What an export reads: the student's spec, its tensors and the run's provenance."""

    spec: ModelSpec
    state: dict[str, Tensor]
    config: dict[str, Any]  # the export config.json (model, provenance, metrics)
    folder: Path
    is_run: bool
    model: TapModel  # built from ``spec`` with ``state`` loaded strictly, in eval mode


@dataclass
class ExportResult:
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_formats(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"safetensors,onnx"`` → ``["safetensors", "onnx"]``; safetensors is always written."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    names = [s.strip().lower() for s in items if s.strip()]
    bad = [n for n in names if n not in FORMATS]
    if bad:
        raise ConfigError(f"--format {bad[0]}: unknown format (valid: {', '.join(FORMATS)})")
    return ["safetensors"] + [f for f in FORMATS[1:] if f in names]


# -- source --------------------------------------------------------------------------------------
def load_source(path: str | Path) -> Source:
    """A run folder (``model.json`` + ``weights/best.safetensors``) or an export folder
    (``config.json`` + ``model.safetensors``). The tensors are loaded strictly into the built model,
    which proves they are the student alone (an adapter or teacher key would be unexpected)."""
    from ._version import __version__
    from .checkpoint_files import load_strict, read_checkpoint
    from .models import build_model
    from .zoo import load_model_config

    folder = Path(path)
    if (folder / "model.json").is_file():
        weights = folder / "weights" / "best.safetensors"
        if not weights.is_file():
            raise ConfigError(f"{weights}: no best weights yet (has the run finished one validation?)")
        spec = load_model_config(folder / "model.json")
        record = _read_json(folder / "config.json")
        metrics = _read_json(folder / "metrics.json")
        run_cfg = record.get("config", {})
        config = {
            "model": spec.to_dict(),
            "kdcli_version": __version__,
            "teacher": public_id(record.get("teacher", {}).get("id")),
            "method": run_cfg.get("method"),
            "method_hparams": {k: v.get("hparams") for k, v in record.get("method", {}).items()},
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        is_run = True
    elif (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        weights = folder / "model.safetensors"
        spec = load_model_config(folder / "config.json")
        config = _read_json(folder / "config.json")
        config.pop("exports", None)  # re-described below for what this export writes
        config["kdcli_version"] = __version__
        is_run = False
    else:
        raise ConfigError(f"{folder}: not a kdcli run folder (model.json) or export folder "
                          "(config.json + model.safetensors)")
    state = read_checkpoint(weights)  # a damaged file is a one-line error naming it, never a traceback
    model = build_model(spec)
    load_strict(model.net, state, str(weights))
    return Source(spec, state, config, folder, is_run, model.eval())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def safetensors_metadata(spec: ModelSpec, config: dict[str, Any]) -> dict[str, str]:
    """Flat string metadata (safetensors allows str → str only): lists and dicts are JSON."""
    return {
        "format": "pt",
        "name": spec.name,
        "architecture": spec.architecture,
        "backbone": spec.backbone,
        "task": spec.task,
        "classes": json.dumps(spec.classes),
        "preprocess": json.dumps(spec.preprocess),
        "teacher": str(config.get("teacher") or ""),
        "method": str(config.get("method") or ""),
        "metrics": json.dumps(config.get("metrics", {})),
        "license": spec.license,
        "kdcli_version": str(config.get("kdcli_version", "")),
    }


# -- the inference graph -----------------------------------------------------------------------------
def export_size(spec: ModelSpec, image_size: int | None = None) -> int:
    """Square input side for graph exports: ``image_size``, else the spec's preprocess size."""
    pp = spec.preprocess
    size = int(image_size or pp.get("size") or pp.get("min_size") or 512)
    if spec.task == "detection" and size % 32:
        raise ConfigError(f"--image-size {size}: detectors take sides that are multiples of 32")
    return size


def inference_module(model: TapModel) -> nn.Module:
    """The exportable forward of a built model: images in [0, 1] → logits, or boxes + scores."""
    if model.task == "segmentation":
        return _SegmentationInference(model).eval()
    if model.spec.architecture not in ONE_STAGE:
        raise ExportError(f"{model.spec.name}: ONNX/TorchScript export covers segmenters and one-stage detectors "
                          f"({', '.join(ONE_STAGE)}), not {model.spec.architecture}; use --format safetensors")
    return _DetectionInference(model).eval()


class _Inference(nn.Module):
    """Normalise images in [0, 1] with the spec's mean/std (baked into the graph), then run the model."""

    mean: Tensor  # buffers, registered below
    std: Tensor

    def __init__(self, model: TapModel) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(model.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(model.std).view(1, -1, 1, 1), persistent=False)

    def batch(self, images: Tensor) -> Batch:
        x = (images - self.mean) / self.std
        size = (x.shape[-2], x.shape[-1])
        return Batch(x, [size], [size], None, self.model.mean, self.model.std)


class _SegmentationInference(_Inference):
    """images (N, 3, H, W) in [0, 1] → logits (N, C, H, W) at the input size."""

    def forward(self, images: Tensor) -> Tensor:
        b = self.batch(images)
        logits = self.model(b, need={"seg_logits"}, losses=False).taps["seg_logits"]
        return F.interpolate(logits, size=b.images.shape[-2:], mode="bilinear", align_corners=False)


class _DetectionInference(_Inference):
    """images (N, 3, H, W) in [0, 1] → boxes (N, A, 4), scores (N, A, K); no NMS (see the module doc)."""

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(self.batch(images), need={"cls_logits", "head"}, losses=False)
        head = out.extras["head"]
        anchors = out.extras["anchors"][0]  # one image size in the batch → one anchor set
        net: RetinaNet | FCOS = self.model.net  # export takes one-stage detectors only
        reg = head["bbox_regression"]
        flat_anchors = anchors.unsqueeze(0).expand(reg.shape[0], -1, -1).reshape(-1, 4)
        flat_reg = reg.reshape(-1, 4)
        # the detector's own coder: FCOS's linear one (ltrb x anchor size), RetinaNet's (dx, dy, dw, dh)
        if isinstance(net, FCOS):
            boxes = net.box_coder.decode(flat_reg, flat_anchors)
            scores = torch.sqrt(torch.sigmoid(head["cls_logits"]) * torch.sigmoid(head["bbox_ctrness"]))
        else:
            boxes = net.box_coder.decode_single(flat_reg, flat_anchors)
            scores = torch.sigmoid(head["cls_logits"])
        return boxes.reshape(reg.shape), scores


def detection_params(model: TapModel, size: int) -> dict[str, Any]:
    """What :func:`select_detections` needs, stored in the ONNX metadata and config.json."""
    net: RetinaNet | FCOS = model.net  # export takes one-stage detectors only
    with torch.no_grad():
        x = torch.zeros(1, 3, size, size)
        out = model(Batch(x, [(size, size)], [(size, size)], None, model.mean, model.std),
                    need={"cls_logits", "head"}, losses=False)
    return {
        "anchors_per_level": [int(n) for n in out.extras["num_anchors_per_level"]],
        "score_thresh": float(net.score_thresh),
        "nms_thresh": float(net.nms_thresh),
        "topk_candidates": int(net.topk_candidates),
        "detections_per_img": int(net.detections_per_img),
    }


def select_detections(boxes: Tensor, scores: Tensor, params: dict[str, Any],
                      image_sizes: list[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
    """torchvision's one-stage ``postprocess_detections`` on the exported graph's outputs.

    Per image and pyramid level: keep scores > ``score_thresh`` (over anchors x classes), the
    ``topk_candidates`` best; clip boxes to the image; class-wise NMS at ``nms_thresh`` over all
    levels; keep ``detections_per_img``. Labels are score columns (0 is background, never kept by a
    trained model). Boxes are in input pixels: scale them back to the original image yourself.
    """
    from torchvision.ops import batched_nms, clip_boxes_to_image

    boxes, scores = torch.as_tensor(boxes), torch.as_tensor(scores)
    n, _, k = scores.shape
    sizes = image_sizes or [tuple(params.get("input_size", (0, 0)))] * n
    out = []
    for i in range(n):
        keep_boxes, keep_scores, keep_labels = [], [], []
        for b, s in zip(boxes[i].split(params["anchors_per_level"]), scores[i].split(params["anchors_per_level"]),
                        strict=True):
            flat = s.flatten()
            idx = torch.where(flat > params["score_thresh"])[0]
            top, order = flat[idx].topk(min(int(params["topk_candidates"]), idx.numel()))
            idx = idx[order]
            keep_boxes.append(clip_boxes_to_image(b[idx // k], sizes[i]))
            keep_scores.append(top)
            keep_labels.append(idx % k)
        bx, sc, lb = torch.cat(keep_boxes), torch.cat(keep_scores), torch.cat(keep_labels)
        keep = batched_nms(bx, sc, lb, float(params["nms_thresh"]))[: int(params["detections_per_img"])]
        out.append({"boxes": bx[keep], "scores": sc[keep], "labels": lb[keep]})
    return out


def check_images(n: int, size: int, seed: int = 0) -> Tensor:
    """Deterministic test images in [0, 1]: smooth colour fields (coarse noise upsampled) with
    fine noise, so activations resemble those of photographs more than uniform noise does."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (smooth + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def compare(got: list[Any], want: list[Any]) -> dict[str, float]:
    """Max absolute difference and the worst ratio to the allowed ``ATOL + RTOL * |want|``."""
    import numpy as np

    worst_abs, worst_ratio = 0.0, 0.0
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        if g.shape != w.shape:
            raise ExportError(f"exported output shape {g.shape} differs from PyTorch's {w.shape}")
        d = np.abs(g - w)
        worst_abs = max(worst_abs, float(d.max(initial=0.0)))
        worst_ratio = max(worst_ratio, float((d / (ATOL + RTOL * np.abs(w))).max(initial=0.0)))
    return {"max_abs_diff": worst_abs, "tolerance_used": worst_ratio}


def _reference(module: nn.Module, images: Tensor) -> list[Any]:
    with torch.no_grad():
        out = module(images)
    outs = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in outs]


def write_onnx(module: nn.Module, path: Path, size: int, task: str, metadata: dict[str, str],
               exporter: str = "dynamo") -> dict[str, Any]:
    """Export to one ONNX file, then run it in onnxruntime on :data:`CHECK_IMAGES` images and compare
    with PyTorch; a graph outside tolerance is not kept.

    ``exporter``: ``dynamo`` (``torch.export``-based, torch's default since 2.9) or ``legacy`` (the
    TorchScript-based exporter torch deprecates; about 5x faster here and a fallback when dynamo fails).
    """
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--format onnx needs onnx, onnxruntime and onnxscript: pip install 'kdcli[export]'") from None
    if exporter not in EXPORTERS:
        raise ConfigError(f"--onnx-exporter {exporter}: expected {' or '.join(EXPORTERS)}")
    example = check_images(2, size, seed=1)
    outputs = ["logits"] if task == "segmentation" else ["boxes", "scores"]
    # segmentation: N, H, W dynamic; detection: N only (anchors are constants of the export size)
    axes = {0: "batch", 2: "height", 3: "width"} if task == "segmentation" else {0: "batch"}
    kw: dict[str, Any]
    if exporter == "dynamo":
        from torch.export import Dim

        dims = {0: Dim("batch", min=1, max=1024), 2: Dim("height", min=32, max=8192),
                3: Dim("width", min=32, max=8192)}
        kw = dict(dynamo=True, dynamic_shapes=({i: dims[i] for i in axes},), external_data=False)
    else:
        kw = dict(dynamo=False, dynamic_axes={"images": axes, **{o: {0: "batch"} for o in outputs}})
    tmp = path.with_name(f".{path.name}.tmp")
    try:  # the exporter prints progress and warns about code we do not own: keep the CLI output clean
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=outputs,
                              opset_version=ONNX_OPSET, verbose=False, **kw)
    except Exception as err:  # noqa: BLE001 - exporter failures are many types; name the cause in one line
        tmp.unlink(missing_ok=True)
        other = "legacy" if exporter == "dynamo" else "dynamo"
        raise ExportError(f"ONNX export ({exporter}) failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160]}; try --onnx-exporter {other}") from None
    proto = onnx.load(str(tmp))
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(tmp))
    images = check_images(CHECK_IMAGES, size, seed=2)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    check = {"images": CHECK_IMAGES, "size": size, "atol": ATOL, "rtol": RTOL,
             **compare(got, _reference(module, images))}
    if check["tolerance_used"] > 1.0:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX output differs from PyTorch by up to {check['max_abs_diff']:.3g} "
                          f"(allowed {ATOL} + {RTOL}·|value|); not written")
    tmp.replace(path)
    return check


def write_torchscript(module: nn.Module, path: Path, size: int, metadata: dict[str, str]) -> dict[str, Any]:
    """``torch.jit.trace`` of the inference graph (trace, not script: the models' Python control flow
    depends on configuration only, fixed at export). Checked against eager PyTorch like ONNX."""
    example = check_images(2, size, seed=1)
    with warnings.catch_warnings():  # tracer and deprecation warnings are about code we do not own
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(module, example, check_trace=False, strict=False)
        except Exception as err:  # noqa: BLE001
            raise ExportError(f"TorchScript trace failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}") \
                from None
        tmp = path.with_name(f".{path.name}.tmp")
        torch.jit.save(traced, str(tmp), _extra_files={"kdcli.json": json.dumps(metadata)})
        loaded = torch.jit.load(str(tmp), map_location="cpu")
    images = check_images(CHECK_IMAGES, size, seed=2)
    with torch.no_grad():
        out = loaded(images)
    got = [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
    check = {"images": CHECK_IMAGES, "size": size, "atol": ATOL, "rtol": RTOL,
             **compare(got, _reference(module, images))}
    if check["tolerance_used"] > 1.0:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"TorchScript output differs from PyTorch by up to {check['max_abs_diff']:.3g}; not written")
    tmp.replace(path)
    return check


def graph_description(spec: ModelSpec, size: int, params: dict[str, Any] | None) -> dict[str, Any]:
    desc: dict[str, Any] = {
        "input": {"name": "images", "shape": ["N", 3, "H", "W"], "dtype": "float32", "range": [0, 1],
                  "channels": "RGB", "normalisation": "inside the graph (spec preprocess mean/std)"},
        "size": size,
    }
    if spec.task == "segmentation":
        desc["outputs"] = {"logits": ["N", len(spec.classes), "H", "W"]}
        desc["dynamic"] = ["N", "H", "W"]
        desc["postprocess"] = "argmax over dim 1 gives class indices"
    else:
        desc["input"]["shape"] = ["N", 3, size, size]
        desc["outputs"] = {"boxes": ["N", "A", 4], "scores": ["N", "A", spec.num_classes]}
        desc["dynamic"] = ["N"]
        desc["postprocess"] = ("not included: score threshold, per-level top-k, class-wise NMS and clipping; "
                               "kdcli.export.select_detections(boxes, scores, detection_params) reproduces "
                               "torchvision's postprocess_detections")
        desc["detection_params"] = params
    return desc


# -- the command --------------------------------------------------------------------------------------
def export(src: str | Path, out: str | Path | None = None, formats: str | list[str] | None = None,
           image_size: int | None = None, onnx_exporter: str = "dynamo") -> ExportResult:
    """Write the requested formats of the student in ``src`` (run or export folder) into ``out``
    (default ``RUN/export``, or the export folder itself)."""
    from .io import save_json, save_tensors

    fmts = parse_formats(formats or "safetensors")
    if onnx_exporter not in EXPORTERS:
        raise ConfigError(f"--onnx-exporter {onnx_exporter}: expected {' or '.join(EXPORTERS)}")
    source = load_source(src)
    spec, config = source.spec, dict(source.config)
    out_dir = Path(out) if out else (source.folder / "export" if source.is_run else source.folder)
    result = ExportResult(out_dir)
    meta = safetensors_metadata(spec, config)
    exports: dict[str, Any] = {"safetensors": {"file": "model.safetensors"}}
    graph = [f for f in fmts if f != "safetensors"]
    if graph:  # refuse an unsupported architecture or size before writing anything
        module = inference_module(source.model)
        size = export_size(spec, image_size)
        params = detection_params(source.model, size) if spec.task == "detection" else None
        if params is not None:
            params["input_size"] = [size, size]
        desc = graph_description(spec, size, params)
    # every file is written into a staging folder and moved into place only when all formats passed
    # their checks: a failed graph export leaves an earlier export folder exactly as it was
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        save_tensors(stage / "model.safetensors", source.state, meta)
        if graph:
            graph_meta = {**meta, "graph": json.dumps(desc)}
            with torch.no_grad():
                if "onnx" in fmts:
                    check = write_onnx(module, stage / GRAPH_FILES["onnx"], size, spec.task, graph_meta,
                                       onnx_exporter)
                    exports["onnx"] = {"file": GRAPH_FILES["onnx"], "opset": ONNX_OPSET, "exporter": onnx_exporter,
                                       **desc, "check": check}
                    result.checks["onnx"] = check
                if "torchscript" in fmts:
                    check = write_torchscript(module, stage / GRAPH_FILES["torchscript"], size, graph_meta)
                    exports["torchscript"] = {"file": GRAPH_FILES["torchscript"], "method": "torch.jit.trace",
                                              **desc, "check": check}
                    result.checks["torchscript"] = check
        config["exports"] = exports
        save_json(stage / "config.json", config)
        for fmt, name in GRAPH_FILES.items():  # a graph left from an earlier export would hold other weights
            if fmt not in fmts:
                (out_dir / name).unlink(missing_ok=True)
        files = {"safetensors": "model.safetensors", **{f: GRAPH_FILES[f] for f in graph}, "config": "config.json"}
        for key, name in files.items():  # config.json last: it describes the files already in place
            os.replace(stage / name, out_dir / name)
            result.files[key] = out_dir / name
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result


class _CallableModule(types.ModuleType):
    """``kdcli.export(run, ...)``: importing this submodule binds it as the package's ``export``
    attribute, so the module itself answers the call of the Python API (docs/api.md)."""

    def __call__(self, run: str | Path, out: str | Path | None = None, formats: str | list[str] | None = None,
                 image_size: int | None = None, onnx_exporter: str = "dynamo") -> Path:
        return export(run, out, formats, image_size, onnx_exporter).folder


sys.modules[__name__].__class__ = _CallableModule


DATA_KINDS = ("coco", "cityscapes", "semantic")  # --data kinds that name a local folder


def public_id(value: str | None) -> str | None:
    """A model or data reference as it may be published: zoo names, ``hf-hub:`` ids and ``shapes`` as
    they are; a local path (a run or export folder, a weights file, a data folder) by its last name
    only, ``local run (name)``, since an absolute path would publish a home directory's layout."""
    if not value:
        return value
    text = str(value)
    if text.startswith("hf-hub:") or text == "shapes":
        return text
    kind, sep, rest = text.partition(":")
    if sep and kind in DATA_KINDS:
        return f"{kind} (local folder {Path(rest.rstrip('/')).name or rest})"
    from .zoo import names

    if text in names():
        return text
    p = Path(text)
    what = "run" if (p / "model.json").is_file() else "export" if (p / "config.json").is_file() else \
        "folder" if p.is_dir() else "file"
    return f"local {what} ({p.name or text})"
