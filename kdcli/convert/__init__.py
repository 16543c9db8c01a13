"""``kdcli zoo import CHECKPOINT --arch NAME``: teachers trained in mmdetection / mmsegmentation →
kdcli model folders (``config.json`` with a zoo-like spec + ``model.safetensors``) that
``--teacher``, ``kdcli eval`` and ``kdcli export`` accept like an exported model.

What is converted and how it was checked: docs/import.md. The checkpoint is read with
``torch.load(weights_only=True)`` (never a full unpickle). Every source key must be mapped and every
model parameter filled, else the import is refused with the keys named.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import ConfigError, ZooError
from ..zoo import CITYSCAPES_CLASSES, ModelSpec
from .common import KeyMap, bgr_first_conv, cfg_flag, cfg_floats, cfg_str, checkpoint_classes, config_text

ARCHS = {"retinanet": "mmdet", "fcos": "mmdet", "fasterrcnn": "mmdet", "deeplabv3": "mmseg", "pspnet": "mmseg"}
# mmdet/mmseg's ImageNet normalisation for pytorch-style ResNets (0-255 RGB) and caffe-style (0-255 BGR)
PYTORCH_NORM = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
CAFFE_NORM = ([103.53, 116.28, 123.675], [1.0, 1.0, 1.0])
IMPORT_OPTIONS = ("resnet_style", "bgr", "mean", "std", "fcos_centerness", "fcos_regression",
                  "relu_before_extra_convs", "name")


def coco80() -> list[str]:
    from torchvision.models import _meta

    return [n for n in _meta._COCO_CATEGORIES if n not in ("__background__", "N/A")]


@dataclass
class Imported:
    folder: Path
    spec: ModelSpec
    notes: list[str] = field(default_factory=list)  # assumptions made (no config in the checkpoint)


def class_slots(src_names: list[str], classes: str | list[str] | None, task: str) -> tuple[list[str], list[int]]:
    """kdcli class names and, for each source class, its output slot.

    Detection: slot 0 is background; by default source class c → slot c + 1 and the names are the
    checkpoint's. ``classes="coco"`` lays the 80 COCO classes out in torchvision's 91-slot
    category-id layout (the zoo's ``coco`` set), so the teacher pairs with torchvision COCO models.
    Segmentation: slot c = class c."""
    if classes is None:
        names = list(src_names)
    elif classes == "coco" and task == "detection":
        from torchvision.models import _meta

        if list(src_names) != coco80():
            raise ConfigError("--classes coco: the checkpoint's classes are not the 80 COCO categories")
        full = list(_meta._COCO_CATEGORIES)  # 91 slots, "__background__" at 0
        slots = [full.index(n) for n in src_names]
        return full[1:], slots
    elif classes == "cityscapes":
        names = list(CITYSCAPES_CLASSES)
    elif isinstance(classes, list):
        names = list(classes)
    else:
        raise ConfigError(f"--classes {classes}: expected coco (detection), cityscapes, or a list of names")
    if len(names) != len(src_names):
        raise ConfigError(f"--classes: {len(names)} names for a checkpoint with {len(src_names)} classes")
    offset = 1 if task == "detection" else 0
    return names, [c + offset for c in range(len(src_names))]


def _default_names(n: int, arch: str) -> list[str] | None:
    if ARCHS[arch] == "mmdet" and n == 80:
        return coco80()
    if ARCHS[arch] == "mmseg" and n == 19:
        return list(CITYSCAPES_CLASSES)
    return None


def _split(obj: dict) -> tuple[dict[str, Tensor], dict[str, Any]]:
    stored = obj.get("meta")
    meta: dict[str, Any] = stored if isinstance(stored, dict) else {}
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise ZooError("checkpoint: no state_dict")
    # tensors only; DataParallel's "module." prefix and EMA copies are not part of the model
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    return state, meta


def _normalisation(text: str, opts: dict[str, Any], resnet_style: str, notes: list[str]) -> tuple[list, list, bool]:
    """mean/std (0-255, in the order the network sees channels) and whether that order is BGR."""
    mean = opts.get("mean") or cfg_floats(text, "mean")
    std = opts.get("std") or cfg_floats(text, "std")
    bgr = opts.get("bgr")
    if bgr is None:
        to_rgb = cfg_flag(text, "to_rgb")
        if to_rgb is None:
            to_rgb = cfg_flag(text, "bgr_to_rgb")
        bgr = (not to_rgb) if to_rgb is not None else resnet_style == "caffe"
        if to_rgb is None:
            notes.append(f"channel order not in the checkpoint: assumed {'BGR' if bgr else 'RGB'} (set bgr=...)")
    if mean is None or std is None:
        mean, std = CAFFE_NORM if resnet_style == "caffe" else PYTORCH_NORM
        notes.append(f"normalisation not in the checkpoint: assumed mean {mean}, std {std} (set mean=..., std=...)")
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"mean/std: expected 3 values each, got {mean} / {std}")
    return [float(v) for v in mean], [float(v) for v in std], bool(bgr)


def import_checkpoint(path: str | Path, arch: str, out: str | Path | None = None,
                      classes: str | list[str] | None = None, metric: dict[str, float] | None = None,
                      options: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> Imported:
    """Convert an mmdet/mmseg checkpoint; write ``out/config.json`` + ``out/model.safetensors``.

    ``options`` override what is otherwise read from the checkpoint's stored config (or mmdet's
    defaults): ``resnet_style`` (pytorch|caffe), ``bgr`` (bool), ``mean``/``std`` (0-255, network
    channel order), ``fcos_centerness`` (reg|cls), ``fcos_regression`` (relu|exp),
    ``relu_before_extra_convs`` (bool), ``name``."""
    from ..checkpoint_files import read_checkpoint
    from ..io import save_json, save_tensors
    from ..models import build_model
    from ..weights import sha256

    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch}: expected one of {', '.join(ARCHS)}")
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(IMPORT_OPTIONS))
    if unknown:
        raise ConfigError(f"--set {unknown[0]}: unknown import option (valid: {', '.join(IMPORT_OPTIONS)})")
    path = Path(path)
    state, meta = _split(read_checkpoint(path))
    text = config_text(meta)
    notes: list[str] = []
    where = str(path)
    framework = ARCHS[arch]
    task = "detection" if framework == "mmdet" else "segmentation"
    from .mmdet import src_classes
    from .mmseg import seg_classes
    try:
        n = src_classes(state, arch) if framework == "mmdet" else seg_classes(state)
    except ZooError as err:
        raise ZooError(f"{where}: {err}") from None
    src_names = checkpoint_classes(meta) or _default_names(n, arch)
    if src_names is None:
        if isinstance(classes, list):
            src_names = classes
        else:
            raise ConfigError(f"{where}: {n} classes and no class names in the checkpoint; give --classes NAMES")
    if len(src_names) != n:
        raise ZooError(f"{where}: the checkpoint lists {len(src_names)} class names for {n} outputs")
    names, slots = class_slots(src_names, classes, task)
    m = KeyMap(state, where)
    for k in ("data_preprocessor.mean", "data_preprocessor.std"):
        m.ignore(k)  # mmengine keeps them as (non-persistent) buffers; read below when present
    resnet_style = opts.get("resnet_style") or cfg_str(text, "style") or "pytorch"
    if resnet_style not in ("pytorch", "caffe"):
        raise ConfigError(f"resnet_style {resnet_style}: expected pytorch or caffe")
    if "data_preprocessor.mean" in state and "mean" not in opts:
        opts["mean"] = [float(v) for v in state["data_preprocessor.mean"].flatten()]
        opts["std"] = [float(v) for v in state["data_preprocessor.std"].flatten()]
    mean, std, bgr = _normalisation(text, opts, resnet_style, notes)
    fields: dict[str, Any] = {}
    if framework == "mmdet":
        from .mmdet import map_detector

        relu = opts.get("relu_before_extra_convs")
        if relu is None:
            relu = cfg_flag(text, "relu_before_extra_convs")
        if relu is None and text:
            relu = False  # the stored config leaves it at FPN's default
        elif relu is None and arch != "fasterrcnn":
            relu = arch == "fcos"  # mmdet's FCOS configs set it, RetinaNet's leave the False default
            notes.append(f"no config in the checkpoint: assumed relu_before_extra_convs={relu} (mmdet's {arch} "
                         "configs); set relu_before_extra_convs=... otherwise")
        fields.update(map_detector(m, arch, slots, len(names) + 1, bool(relu)))
        if arch == "fcos":
            fields.update(_fcos_variant(text, opts, notes))
        depth = _depth(state)
        fields.update(backbone=f"torchvision:resnet{depth}", style="mmdet", resnet_style=resnet_style,
                      fpn_channels=int(state["neck.lateral_convs.0.conv.weight"].shape[0]),
                      norm="frozen", preprocess={"min_size": 800, "max_size": 1333})
        first_conv = "backbone.body.conv1.weight"
        if resnet_style == "caffe" and depth < 50:
            raise ZooError(f"{where}: a caffe-style ResNet-{depth} is not supported (no bottleneck)")
    else:
        from .mmseg import map_segmenter

        seg = map_segmenter(m, arch)
        first_conv = seg.pop("first_conv")
        fields.update(seg, style="mmseg", norm="bn", output_stride=8, preprocess={"size": 1024})
        if resnet_style == "caffe":
            raise ZooError(f"{where}: caffe-style mmseg backbones are not supported")
    m.check_all_used(arch)
    if bgr:
        bgr_first_conv(m, first_conv)
        mean, std = mean[::-1], std[::-1]
    fields["preprocess"] = {**fields["preprocess"], "mean": [v / 255 for v in mean], "std": [v / 255 for v in std]}
    name = opts.get("name") or re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem)
    spec = ModelSpec(name=name, task=task, architecture=arch, classes=names,
                     weights="none", weights_kind="full", metric=dict(metric or {}), license="see the source",
                     notes=f"imported from {framework} checkpoint {path.name} by kdcli zoo import", **fields)
    model = build_model(spec)
    m.check_fits(model.net.state_dict(), arch)
    from ..checkpoint_files import load_strict

    load_strict(model.net, m.out, where)
    folder = Path(out) if out else Path(name)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "model.safetensors", model.net.state_dict())
    save_json(folder / "config.json", {
        "model": spec.to_dict(),
        "source": {"framework": framework, "arch": arch, "checkpoint": path.name, "sha256": sha256(path),
                   "resnet_style": resnet_style, "input": "BGR" if bgr else "RGB", "assumptions": notes,
                   "versions": {k: meta.get(k) for k in ("mmdet_version", "mmseg_version", "mmengine_version")
                                if isinstance(meta.get(k), str)}},
    })
    for note in notes:
        log(f"note: {note}")
    return Imported(folder, spec, notes)


def _depth(state: dict[str, Tensor]) -> int:
    from .common import resnet_depth

    return resnet_depth(state)


def _fcos_variant(text: str, opts: dict[str, Any], notes: list[str]) -> dict[str, str]:
    """mmdet FCOS's ``centerness_on_reg`` / ``norm_on_bbox`` (both False by default)."""
    out = {}
    for key, flag, yes, no in (("fcos_centerness", "centerness_on_reg", "reg", "cls"),
                               ("fcos_regression", "norm_on_bbox", "relu", "exp")):
        if opts.get(key):
            out[key] = str(opts[key])
            continue
        v = cfg_flag(text, flag)
        if v is None:
            if not text:
                notes.append(f"no config in the checkpoint: assumed {flag}=False (mmdet's default); "
                             f"set {key}=... otherwise")
            v = False
        out[key] = yes if v else no
    return out


def parse_options(items: dict[str, str]) -> dict[str, Any]:
    """``--set key=value`` strings → typed import options."""
    out: dict[str, Any] = {}
    for k, v in items.items():
        if k in ("bgr", "relu_before_extra_convs"):
            if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"--set {k}={v}: expected true or false")
            out[k] = v.lower() in ("true", "1", "yes")
        elif k in ("mean", "std"):
            try:
                out[k] = [float(x) for x in v.strip("[]()").split(",")]
            except ValueError:
                raise ConfigError(f"--set {k}={v}: expected three numbers, e.g. 123.675,116.28,103.53") from None
        else:
            out[k] = v
    return out


def parse_metric(text: str | None) -> dict[str, float]:
    """``box_map=38.9`` / ``miou=79.1,box_map=1`` → dict (percent, as the zoo's ``metric``)."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        k, eq, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ConfigError(f"--metric {text}: expected key=value in percent, e.g. box_map=38.9") from None
        if not eq or k.strip() not in ("box_map", "mask_map", "miou"):
            raise ConfigError(f"--metric {text}: keys are box_map, mask_map or miou (percent)")
    return out
