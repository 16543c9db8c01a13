"""Data sets, transforms and collate functions behind ``--data``.

``--data`` forms (options after ``?``, joined by ``&``):

- ``shapes``: the embedded synthetic set (both tasks).
- ``coco:/path[?labels=auto|category-id|contiguous&empty=drop|keep]``: a COCO instances tree
  (``annotations/instances_{split}2017.json`` + ``{split}2017/``), detection.
- ``cityscapes:/path[?labels=ids|trainids]``: a Cityscapes tree (``leftImg8bit`` + ``gtFine``
  ``*_labelIds.png`` mapped to the 19 trainIds), segmentation.
- ``semantic:/path``: a Cityscapes-style tree whose labels are already class indices
  (``*_gtFine_labelTrainIds.png``; class names from ``classes.txt``, else Cityscapes').
- ``path/to/data.toml`` or ``.yaml``: a data file (:mod:`kdcli.data.datafile`).
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict, cast
from urllib.parse import parse_qsl

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .cityscapes import CITYSCAPES_CLASSES, CityscapesSegmentation
from .coco import CocoDetection
from .datafile import DataFile, is_data_file, read_data_file
from .semantic import MaskFolder, SemanticFolder
from .shapes import ensure_shapes, write_shapes
from .transforms import IGNORE_INDEX, build_transforms

SHAPES_SEG_CLASSES = ["background", "circle", "square", "triangle"]
DATA_FORMS = ("shapes, coco:/path/to/coco, cityscapes:/path/to/cityscapes, semantic:/path/to/tree "
              "or a data file (.toml/.yaml)")
TASKS = ("detection", "segmentation")
KINDS = {"coco": "detection", "cityscapes": "segmentation", "semantic": "segmentation"}
OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "coco": {"labels": ("auto", "category-id", "contiguous"), "empty": ("drop", "keep")},
    "cityscapes": {"labels": ("ids", "trainids")},
    "semantic": {},
}

__all__ = [
    "CITYSCAPES_CLASSES",
    "CityscapesSegmentation",
    "CocoDetection",
    "DataHints",
    "MaskFolder",
    "SemanticFolder",
    "Subset",
    "build_dataset",
    "build_transforms",
    "collate_detection",
    "collate_segmentation",
    "data_hints",
    "ensure_shapes",
    "parse_spec",
    "read_classes",
    "subset",
    "write_shapes",
]


@dataclass(frozen=True)
class DataHints:
    """What the models want from the data: their class list (the COCO label space is chosen to
    match it), instance masks (Mask R-CNN), and the detector's resize sizes (done in workers)."""

    classes: list[str] | None = None
    masks: bool = False
    min_size: int | None = None
    max_size: int | None = None
    # the model's head is trained (a teacher, evaluated weights): COCO data whose categories are a
    # subset of the model's (same ids and names) keep the model's category slots
    fixed_head: bool = False


def data_hints(student: Any, teacher: Any = None, image_size: int = 0, fixed_head: bool = False) -> DataHints:
    """Hints from the student's (and teacher's) ModelSpec. The teacher's classes win: a teacher
    with weights cannot change its label space, a student built from scratch can."""
    ref = teacher if teacher is not None else student
    pp = dict(student.preprocess)
    min_size = image_size or pp.get("min_size")
    max_size = image_size or pp.get("max_size")
    return DataHints(classes=list(ref.classes), masks=student.architecture == "maskrcnn",
                     min_size=int(min_size) if min_size else None, max_size=int(max_size) if max_size else None,
                     fixed_head=fixed_head or teacher is not None)


def read_classes(root: Path) -> list[str] | None:
    """Class names from ``root/classes.txt`` (one per line, blank lines skipped), or None if absent."""
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names (expected one name per line)")
    return names


def parse_spec(spec: str) -> tuple[str, Path | None, dict[str, str]]:
    """``--data`` string -> (kind, path, options); kind is shapes, coco, cityscapes, semantic or file."""
    if spec == "shapes":
        return "shapes", None, {}
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS and rest:
        where, _, query = rest.partition("?")
        opts: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            allowed = OPTIONS[kind]
            if key not in allowed:
                valid = ", ".join(allowed) or "none"
                raise DataError(f"--data {spec}: unknown option '{key}' for {kind} (valid: {valid})")
            if value not in allowed[key]:
                raise DataError(f"--data {spec}: {key}={value}: expected {' or '.join(allowed[key])}")
            opts[key] = value
        path = Path(where).expanduser()
        if not path.is_dir():
            raise DataError(f"--data {spec}: folder {path} does not exist (expected {DATA_FORMS})")
        return kind, path, opts
    if is_data_file(spec):
        return "file", Path(spec).expanduser(), {}
    raise DataError(f"--data: unknown data spec '{spec}' (expected {DATA_FORMS})")


class _CocoHints(TypedDict):
    """The :class:`DataHints` that :class:`CocoDetection` takes, as its keyword arguments."""

    label_hint: list[str] | None
    masks: bool
    hint_subsets: bool


class _ImagePaths(Protocol):
    def image_path(self, index: int) -> Path: ...


def build_dataset(spec: str, task: str, split: str, size: int, train: bool,
                  hints: DataHints | None = None) -> Dataset:
    """Data set for ``--data spec``; every one exposes ``classes`` and ``num_classes``.

    ``size`` is the segmentation crop/eval size; for ``shapes`` it is also the image size written.
    Detection ``classes`` are foreground only and ``num_classes`` counts background too; segmentation
    ``classes`` include class 0 and ``num_classes == len(classes)``. ``hints`` (:func:`data_hints`)
    pick the COCO label space and detection extras; without them the defaults apply.
    """
    if task not in TASKS:
        raise ConfigError(f"--task: unknown task '{task}' (expected {' or '.join(TASKS)})")
    hints = hints or DataHints()
    kind, path, opts = parse_spec(spec)
    df = read_data_file(path) if kind == "file" else None  # type: ignore[arg-type]
    what, data_task = (df.format, df.task) if df else (kind, KINDS.get(kind, task))
    if data_task != task:
        raise DataError(f"--data {spec}: {what} data is for {data_task}, but the model does {task}")
    if task == "detection" and hints.min_size:
        tf = build_transforms(task, train, hints.min_size, hints.max_size, det_resize=True)
    else:
        tf = build_transforms(task, train, size)
    coco_kw = _CocoHints(label_hint=hints.classes, masks=hints.masks, hint_subsets=hints.fixed_head)
    if kind == "shapes":
        root = ensure_shapes(size=size)
        if task == "detection":
            return CocoDetection(root / "coco", split, transforms=tf, keep_empty=not train, **coco_kw)
        return SemanticFolder(root / "cityscapes", split, classes=SHAPES_SEG_CLASSES, transforms=tf)
    if df is not None:
        return _from_file(df, split, tf, train, coco_kw)
    assert path is not None
    if kind == "coco":
        keep = not train or opts.get("empty", "drop") == "keep"  # val always keeps every image
        return CocoDetection(path, split, transforms=tf, keep_empty=keep, labels=opts.get("labels", "auto"),
                             **coco_kw)
    if kind == "cityscapes":
        return CityscapesSegmentation(path, split, transforms=tf, labels=opts.get("labels", "ids"))
    classes = read_classes(path) or CITYSCAPES_CLASSES
    return SemanticFolder(path, split, classes=classes, transforms=tf)


def _from_file(df: DataFile, split: str, tf: Callable, train: bool, coco_kw: _CocoHints) -> Dataset:
    paths = df.split(split)
    o = df.options
    if df.format == "coco":
        keep = not train or o.get("empty", "drop") == "keep"
        ds = CocoDetection(None, split, transforms=tf, keep_empty=keep, ann_file=paths["annotations"],
                           img_dir=paths["images"], labels=o.get("labels", "auto"), **coco_kw)
        if "classes" in o and o["classes"] != list(ds.categories.values()):
            raise DataError(f"{df.path}: classes {o['classes'][:4]}... differ from the category names of "
                            f"{paths['annotations']} ({list(ds.categories.values())[:4]}...)")
        return ds
    return MaskFolder(paths["images"], paths["masks"], classes=o["classes"], transforms=tf,
                      image_suffix=o.get("image_suffix", ".jpg"), mask_suffix=o.get("mask_suffix", ".png"),
                      list_file=paths.get("list"), id_map=o.get("id_map"), ignore_index=o.get("ignore_index", 255),
                      where=str(df.path))


class Subset(torch.utils.data.Subset):
    """A ``torch.utils.data.Subset`` that forwards attribute access (``classes``, ``ann_file``...) to
    the wrapped data set, and restricts ``ids`` to the images it keeps so evaluation can be limited
    to them."""

    def __getattr__(self, name: str) -> Any:
        # Guard: during unpickling in DataLoader workers ``dataset`` is not set yet.
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        if name == "ids" and hasattr(self.dataset, "ids"):
            return [self.dataset.ids[i] for i in self.indices]
        return getattr(self.dataset, name)

    def image_path(self, index: int) -> Path:
        return cast(_ImagePaths, self.dataset).image_path(self.indices[index])


def subset(ds: Dataset, n: int) -> Subset:
    """The first ``n`` items of ``ds`` (all of them if it is shorter)."""
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    # every kdcli data set is map-style with a length (torch's Dataset does not declare __len__)
    return Subset(ds, list(range(min(n, len(cast(Sized, ds))))))


def collate_detection(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Detection models take lists (images of different sizes), so nothing is stacked. Images are
    unwrapped to plain tensors; target boxes stay ``BoundingBoxes`` (a Tensor subclass) for later
    box-aware code."""
    return [img.as_subclass(Tensor) for img, _ in batch], [target for _, target in batch]


def collate_segmentation(batch: list[tuple[Tensor, Tensor]]) -> tuple[Any, Any]:
    """Training samples (image and mask of one size) stack to ``(N,3,H,W) float``, ``(N,H,W) int64``;
    differently sized samples are padded at the bottom/right to the largest (image with 0, mask
    with ignore). Evaluation samples whose mask kept its full resolution while the image was resized
    come back as two lists (the evaluator batches the images and scores at each mask's size)."""
    images = [_as_float(img) for img, _ in batch]
    masks = [mask.as_subclass(Tensor).to(torch.int64) for _, mask in batch]
    if any(tuple(i.shape[-2:]) != tuple(m.shape[-2:]) for i, m in zip(images, masks, strict=True)):
        return images, masks
    h = max(int(img.shape[-2]) for img in images)
    w = max(int(img.shape[-1]) for img in images)
    pads = [(0, w - int(img.shape[-1]), 0, h - int(img.shape[-2])) for img in images]
    return (torch.stack([F.pad(i, p, value=0.0) for i, p in zip(images, pads, strict=True)]),
            torch.stack([F.pad(m, p, value=IGNORE_INDEX) for m, p in zip(masks, pads, strict=True)]))


def _as_float(img: Tensor) -> Tensor:
    img = img.as_subclass(Tensor)
    return img.float() / 255 if not img.is_floating_point() else img  # untransformed uint8 input
