"""Build a :class:`TapModel` from a zoo spec, optionally loading its weights strictly."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..checkpoint_files import load_strict, read_state_dict
from ..errors import ZooError
from ..weights import cached_file
from ..zoo import ModelSpec
from .base import TapModel
from .narrow_conv import guard_strided_convs


def build_model(spec: ModelSpec, weights: Path | str | None = None) -> TapModel:
    """Build ``spec`` with ``weights=None`` everywhere; then load ``weights``:
    a local file, ``"zoo"`` (the spec's source, from the cache only), or ``None`` (as built)."""
    if spec.task == "detection":
        from .detection import DetectionModel, build_detector

        model: TapModel = DetectionModel(spec, build_detector(spec))
    elif spec.task == "segmentation":
        from .segmentation import SegmentationModel, build_segmenter

        model = SegmentationModel(spec, build_segmenter(spec))
    else:
        raise ZooError(f"{spec.name}: unknown task '{spec.task}'")
    guard_strided_convs(model.net)  # CPU bf16 strided convolutions on 1–2 px wide maps are wrong (narrow_conv.py)
    if weights == "zoo":
        load_zoo_weights(model, spec)
    elif weights == "backbone":
        load_backbone_weights(model, spec)
    elif weights is not None:
        load_strict(model.net, read_state_dict(Path(weights)), str(weights))
    return model


def image_size_of(spec: ModelSpec) -> int:
    """The input side a model's preprocessing resizes to (``size``, else the detector's ``min_size``)."""
    pp = spec.preprocess
    return int(pp.get("size", pp.get("min_size", 512)))


def imagenet_source(spec: ModelSpec) -> str:
    """The entry's ImageNet backbone source ("" if none): its own weights for a ``backbone`` entry,
    else its ``backbone_weights``."""
    source = spec.weights if spec.weights_kind == "backbone" else spec.backbone_weights
    return "" if not source or source == "none" else source


def required_file(spec: ModelSpec, weights: Path | str | None) -> Path | None:
    """The local file that ``build_model(spec, weights)`` will read, checked now: a missing one is
    the one-line error of :func:`kdcli.weights.cached_file` (fetch command, download size), raised
    before any data set or model is built."""
    if weights is None:
        return None
    if weights == "zoo":
        if spec.weights_kind == "none" or spec.weights == "none":
            raise ZooError(f"{spec.name}: the zoo has no weights for it; "
                           f"train it with `kdcli train --model {spec.name}`")
        return cached_file(spec.weights, spec.name)
    if weights == "backbone":
        source = imagenet_source(spec)
        if not source:
            return None  # load_backbone_weights names what is missing
        return cached_file(source, spec.name if spec.weights_kind == "backbone" else f"{spec.name} --backbone")
    path = Path(weights)
    if not path.is_file():
        raise ZooError(f"weights {path}: no such file")
    return path


def load_zoo_weights(model: TapModel, spec: ModelSpec) -> None:
    if spec.weights_kind == "none" or spec.weights == "none":
        raise ZooError(f"{spec.name}: the zoo has no weights for it; "
                           f"train it with `kdcli train --model {spec.name}`")
    path = cached_file(spec.weights, spec.name)
    state = read_state_dict(path)
    if spec.weights_kind == "full":
        load_strict(model.net, state, str(path))
    else:
        load_strict(backbone_body(model.net), strip_classifier(state), str(path))


def load_backbone_weights(model: TapModel, spec: ModelSpec) -> None:
    """ImageNet weights into the backbone body alone: the entry's own (``weights_kind = "backbone"``)
    or its ``backbone_weights`` source; neck and heads stay freshly initialised."""
    source = spec.weights if spec.weights_kind == "backbone" else spec.backbone_weights
    if not source or source == "none":
        raise ZooError(f"{spec.name}: the zoo names no ImageNet backbone weights for it (weights_kind "
                       f"{spec.weights_kind}, no backbone_weights); use student_weights = \"zoo\" or a file")
    path = cached_file(source, spec.name if spec.weights_kind == "backbone" else f"{spec.name} --backbone")
    body = backbone_body(model.net)
    state = strip_classifier(read_state_dict(path))
    if not any(k.startswith("features.") for k in body.state_dict()):
        # a MobileNet body is its classifier's `features` alone (IntermediateLayerGetter keys 0.*, 1.*, ...)
        state = {k.removeprefix("features."): v for k, v in state.items()}
    load_strict(body, state, str(path))


def backbone_body(net: nn.Module) -> nn.Module:
    """The ImageNet-classifier part of a model's backbone: wrappers (FPN, mmseg and timm dilated
    bodies) keep it in ``.body``, possibly nested."""
    body = net.get_submodule("backbone")
    while isinstance(inner := getattr(body, "body", None), nn.Module):
        body = inner
    return body


def strip_classifier(state: dict) -> dict:
    """ImageNet checkpoints carry a classifier (``fc.*``, ``classifier.*``, ``head.*``) the dense
    model does not have."""
    return {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier.", "head.fc."))}
