"""The model zoo: a TOML manifest shipped in the wheel, read into :class:`ModelSpec`.

Names follow ``<backbone>-<architecture>`` as users type them (``r101-retina``). A spec says how
to build the model (always with ``weights=None``) and where its weights come from; kdcli loads
weights itself, strictly. Nothing here downloads: a missing file is a one-line error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ZooError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TASKS = ("detection", "segmentation")
ARCHITECTURES = {
    "retinanet": "detection",
    "fcos": "detection",
    "fasterrcnn": "detection",
    "maskrcnn": "detection",
    "deeplabv3": "segmentation",
    "pspnet": "segmentation",
    "fcn": "segmentation",
    "lraspp": "segmentation",
}

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]
SHAPES_DET = ["circle", "square", "triangle"]
SHAPES_SEG = ["background", *SHAPES_DET]


def class_names(classes: str | list[str], task: str) -> list[str]:
    """Class names for a named set. Detection lists foreground classes only: the model's label ``k``
    (``k >= 1``; torchvision's label 0 is background) is ``names[k - 1]``. ``coco`` keeps torchvision's
    category-id layout: slots 1..90 with ``"N/A"`` where COCO has no category (91 outputs with
    background)."""
    if isinstance(classes, list):
        return list(classes)
    if classes == "shapes":
        return list(SHAPES_DET if task == "detection" else SHAPES_SEG)
    if classes == "cityscapes":
        return list(CITYSCAPES_CLASSES)
    if classes in ("coco", "voc"):
        from torchvision.models import _meta

        if classes == "coco":
            return list(_meta._COCO_CATEGORIES[1:])  # drop "__background__"
        return list(_meta._VOC_CATEGORIES)
    raise ZooError(f"zoo: unknown class set '{classes}' (valid: coco, voc, cityscapes, shapes, or a list)")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model and find its weights."""

    name: str
    task: str
    architecture: str
    backbone: str
    classes: list[str]
    preprocess: dict[str, Any]
    fpn_channels: int = 256
    extra_levels: str = "p6p7-from-p5"
    anchor_sizes: list[int] | None = None
    output_stride: int = 8
    head_channels: int | None = None
    norm: str = "bn"
    weights: str = "none"
    weights_kind: str = "none"
    # ImageNet weights of the backbone alone, for `student_weights = "backbone"` on an entry whose
    # `weights` are a whole detector/segmenter (a `backbone` entry's own weights serve otherwise)
    backbone_weights: str = ""
    # layouts of imported checkpoints (docs/import.md): "torchvision" | "mmdet" | "mmseg"
    style: str = "torchvision"
    resnet_style: str = "pytorch"  # "caffe": stride in the bottleneck's 1x1 conv (mmdet caffe ResNets)
    fcos_centerness: str = "reg"  # mmdet FCOS: "cls" when centerness_on_reg=False
    fcos_regression: str = "relu"  # mmdet FCOS: "exp" when norm_on_bbox=False
    metric: dict[str, float] = field(default_factory=dict)
    # where `metric` was published (a model-zoo README), shown by `kdcli zoo show`
    metric_source: str = ""
    # `weights` is an mmdet/mmseg release converted at fetch time by `kdcli zoo import`'s code with
    # this --arch (docs/zoo.md, OpenMMLab teachers); the converted folder is cached under $KDCLI_HOME/zoo
    convert: str = ""
    sha256: str = ""  # the publisher's full sha256 of the download, when known
    size: int = 0  # download size in bytes, when published; else `size_estimate` (from the parameter count)
    size_estimate: int = 0
    license: str = ""
    notes: str = ""

    @property
    def num_classes(self) -> int:
        """Output channels of the classifier (detection: + background)."""
        return len(self.classes) + (1 if self.task == "detection" else 0)

    def with_classes(self, classes: list[str]) -> ModelSpec:
        return replace(self, classes=list(classes))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ZooError(f"{where}: unknown model field(s) {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except TypeError as err:
            raise ZooError(f"{where}: incomplete model spec ({err})") from None


ZOO_ENV = "KDCLI_ZOO"  # user manifests (TOML of the same form), separated by os.pathsep; `--zoo FILE`


def user_zoo_files() -> list[Path]:
    import os

    return [Path(p).expanduser() for p in os.environ.get(ZOO_ENV, "").split(os.pathsep) if p.strip()]


def _read_manifest(text: str, where: str, specs: dict[str, ModelSpec]) -> None:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ZooError(f"zoo manifest {where}: {err}") from None
    defaults = data.pop("defaults", {})
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ZooError(f"zoo manifest {where}: '{name}' is not a table ([{name}])")
        arch = entry.get("architecture")
        if arch not in ARCHITECTURES:
            raise ZooError(f"zoo manifest {where} [{name}]: unknown architecture '{arch}'")
        task = ARCHITECTURES[arch]
        merged = {**defaults.get(task, {}), **entry}
        specs[name] = ModelSpec.from_dict({"name": name, "task": task, **merged}, f"zoo {where} [{name}]")


def _manifest() -> dict[str, ModelSpec]:
    """The shipped manifests, then the user's (``--zoo FILE`` / ``KDCLI_ZOO``): a user entry of the
    same name replaces the shipped one."""
    keys = []
    for p in user_zoo_files():
        try:
            st = p.stat()
            keys.append((str(p), st.st_mtime_ns, st.st_size))  # an edited file is read again
        except OSError:
            keys.append((str(p), -1, -1))
    return _load_manifests(tuple(keys))


def _manifest_files() -> list[Any]:
    """The shipped manifests: package data of ``kdcli.zoo.manifests`` (the top-level ``zoo/`` folder, mapped
    into the package by the build), or ``zoo/`` beside ``kdcli/`` when the source tree is run as it is."""
    try:
        return list(resources.files(f"{__name__}.manifests").iterdir())
    except ModuleNotFoundError:
        return list((Path(__file__).resolve().parents[2] / "zoo").iterdir())


@lru_cache(maxsize=8)
def _load_manifests(user_files: tuple[tuple[str, int, int], ...]) -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for res in sorted(_manifest_files(), key=lambda p: p.name):
        if res.name.endswith(".toml"):
            _read_manifest(res.read_text(), res.name, specs)
    for f, _, _ in user_files:
        path = Path(f)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ZooError(f"--zoo {path}: cannot read the zoo file ({err.strerror or err})") from None
        _read_manifest(text, str(path), specs)
    return specs


def names() -> list[str]:
    return sorted(_manifest())


def weight_sources() -> dict[str, list[str]]:
    """Every weight source the manifest names (``weights`` and ``backbone_weights``) → the entries
    naming it, in name order."""
    found: dict[str, list[str]] = {}
    for name, spec in sorted(_manifest().items()):
        for source in (spec.weights, spec.backbone_weights):
            if source and source != "none" and name not in found.get(source, []):
                found.setdefault(source, []).append(name)
    return found


def get_spec(name: str) -> ModelSpec:
    """The spec of a zoo entry with its class names resolved."""
    specs = _manifest()
    if name not in specs:
        close = [n for n in specs if name.split("-")[-1] in n][:6]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ZooError(f"unknown model '{name}'{hint}; `kdcli zoo list` shows all names")
    spec = specs[name]
    if isinstance(spec.classes, str):
        spec = replace(spec, classes=class_names(spec.classes, spec.task))
    return spec


def raw_spec(name: str) -> ModelSpec:
    """The manifest entry as written (class set by name), for listing without importing torch."""
    if name not in _manifest():
        get_spec(name)
    return _manifest()[name]


@dataclass
class ModelRef:
    """A model named on the command line: a zoo entry, a run folder or an exported folder."""

    spec: ModelSpec
    weights: Path | None  # local file, or None (build from scratch / source resolved later)
    source: str  # what the user named


def load_model_config(path: Path) -> ModelSpec:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ZooError(f"{path}: cannot read model config ({err})") from None
    return ModelSpec.from_dict(data.get("model", data), str(path))


# role → the flag named in a "not fetched" error; "full" roles need the entry's full weights
ROLES = {"model": "", "student": "", "teacher": "--teacher", "eval": "kdcli eval",
         "student-zoo": "--student-weights zoo: --student"}


# Reference schemes resolved by higher layers, registered when those are imported (kdcli.hub: ``hf-hub:``):
# the zoo looks them up here instead of importing upwards.
_SCHEMES: dict[str, Callable[[str], ModelRef]] = {}
_FETCHERS: dict[str, Callable[..., Path]] = {}


def register_scheme(prefix: str, resolve: Callable[[str], ModelRef], fetch: Callable[..., Path] | None = None) -> None:
    """``resolve(ref)`` for references starting with ``prefix``; ``fetch(ref, command=...)`` downloads one."""
    _SCHEMES[prefix] = resolve
    if fetch is not None:
        _FETCHERS[prefix] = fetch


def scheme_fetch(prefix: str) -> Callable[..., Path]:
    if prefix not in _FETCHERS:
        raise ZooError(f"{prefix} downloads are made by kdcli.hub: import kdcli.api (or kdcli.hub) first")
    return _FETCHERS[prefix]


def resolve_ref(ref: str, role: str = "model") -> ModelRef:
    """Zoo name → spec (+ weights source); run folder or export folder → spec + local weights;
    ``hf-hub:org/name[@rev]`` → a pushed kdcli model from the Hugging Face cache (no download).

    ``role``: ``teacher``, ``eval`` and ``student-zoo`` (``--student-weights zoo``) need a zoo
    entry's full weights. For an entry whose weights are an OpenMMLab release (``convert``), that is
    the converted folder ``kdcli zoo fetch`` cached (its own spec: the mmdet/mmseg layout), or a
    one-line error naming the fetch command and the download size. ``student``/``model``: the
    manifest's spec (torchvision layout), whatever is cached."""
    for prefix, resolve in _SCHEMES.items():
        if ref.startswith(prefix):
            return resolve(ref)
    if ref.startswith("hf-hub:"):
        raise ZooError(f"{ref}: hf-hub references are resolved by kdcli.hub: import kdcli.api (or kdcli.hub) first")
    p = Path(ref)
    if p.exists():
        if p.is_dir():
            for cfg, w in (
                ("model.json", "weights/best.safetensors"),  # run folder (also has a config.json)
                ("config.json", "model.safetensors"),  # exported folder
            ):
                if (p / cfg).is_file():
                    weights = p / w
                    if not weights.is_file():
                        raise ZooError(f"{weights}: missing weights file in {p}")
                    return ModelRef(load_model_config(p / cfg), weights, ref)
            raise ZooError(
                f"{p}: not a kdcli run folder (model.json) or exported model (config.json)"
            )
        raise ZooError(f"{p}: expected a run or export folder, or a zoo name")
    if "/" in ref or ref.startswith("."):  # zoo names have no slash: this was meant as a folder
        raise ZooError(f"{ref}: no such folder (a run or exported model folder; zoo names: `kdcli zoo list`)")
    spec = get_spec(ref)
    if ROLES.get(role) and spec.convert:
        from ..weights import converted_model

        folder = converted_model(spec, ROLES[role])
        converted = replace(load_model_config(folder / "config.json"), name=spec.name)
        return ModelRef(converted, folder / "model.safetensors", ref)
    return ModelRef(spec, None, ref)
