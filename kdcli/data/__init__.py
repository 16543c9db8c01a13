"""Data sets, transforms and collate functions behind ``--data``.

``--data`` forms: ``shapes`` (embedded synthetic set), ``coco:/path`` (COCO instances tree, detection)
and ``semantic:/path`` (Cityscapes-style tree with labelTrainIds, segmentation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .coco import CocoDetection
from .semantic import CITYSCAPES_CLASSES, SemanticFolder
from .shapes import ensure_shapes, write_shapes
from .transforms import IGNORE_INDEX, build_transforms

SHAPES_SEG_CLASSES = ["background", "circle", "square", "triangle"]
DATA_FORMS = "shapes, coco:/path/to/coco or semantic:/path/to/cityscapes-style-tree"
TASKS = ("detection", "segmentation")

__all__ = [
    "CocoDetection",
    "SemanticFolder",
    "Subset",
    "build_dataset",
    "build_transforms",
    "collate_detection",
    "collate_segmentation",
    "ensure_shapes",
    "read_classes",
    "subset",
    "write_shapes",
]


def read_classes(root: Path) -> list[str] | None:
    """Class names from ``root/classes.txt`` (one per line, blank lines skipped), or None if absent."""
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names (expected one name per line)")
    return names


def _parse_spec(spec: str) -> tuple[str, Path | None]:
    if spec == "shapes":
        return "shapes", None
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("coco", "semantic") or not rest:
        raise DataError(f"--data: unknown data spec '{spec}' (expected {DATA_FORMS})")
    path = Path(rest).expanduser()
    if not path.is_dir():
        raise DataError(f"--data {spec}: folder {path} does not exist (expected {DATA_FORMS})")
    return kind, path


def build_dataset(spec: str, task: str, split: str, size: int, train: bool) -> Dataset:
    """Data set for ``--data spec``; every one exposes ``classes`` and ``num_classes``.

    ``size`` is the segmentation crop/eval size; for ``shapes`` it is also the image size written.
    Detection ``classes`` are foreground only and ``num_classes`` counts background too; segmentation
    ``classes`` include class 0 and ``num_classes == len(classes)``.
    """
    if task not in TASKS:
        raise ConfigError(f"--task: unknown task '{task}' (expected {' or '.join(TASKS)})")
    kind, path = _parse_spec(spec)
    tf = build_transforms(task, train, size)
    if kind == "shapes":
        root = ensure_shapes(size=size)
        if task == "detection":
            return CocoDetection(root / "coco", split, transforms=tf)
        return SemanticFolder(root / "cityscapes", split, classes=SHAPES_SEG_CLASSES, transforms=tf)
    assert path is not None
    if kind == "coco":
        if task != "detection":
            raise DataError(f"--data {spec}: coco data is for detection; use semantic:/path for segmentation")
        return CocoDetection(path, split, transforms=tf)
    if task != "segmentation":
        raise DataError(f"--data {spec}: semantic data is for segmentation; use coco:/path for detection")
    classes = read_classes(path) or CITYSCAPES_CLASSES
    return SemanticFolder(path, split, classes=classes, transforms=tf)


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


def subset(ds: Dataset, n: int) -> Subset:
    """The first ``n`` items of ``ds`` (all of them if it is shorter)."""
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    return Subset(ds, list(range(min(n, len(ds)))))


def collate_detection(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Detection models take lists (images of different sizes), so nothing is stacked. Images are
    unwrapped to plain tensors; target boxes stay ``BoundingBoxes`` (a Tensor subclass) for later
    box-aware code."""
    return [img.as_subclass(Tensor) for img, _ in batch], [target for _, target in batch]


def collate_segmentation(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack to ``(N,3,H,W) float``, ``(N,H,W) int64``; differently sized samples are padded at the
    bottom/right to the largest (image with 0, mask with ignore) so eval batches of mixed aspect work."""
    h = max(int(img.shape[-2]) for img, _ in batch)
    w = max(int(img.shape[-1]) for img, _ in batch)
    images, masks = [], []
    for img, mask in batch:
        img = img.as_subclass(Tensor)
        if not img.is_floating_point():
            img = img.float() / 255  # untransformed uint8 input
        mask = mask.as_subclass(Tensor).to(torch.int64)
        pad = (0, w - int(img.shape[-1]), 0, h - int(img.shape[-2]))
        images.append(F.pad(img, pad, value=0.0))
        masks.append(F.pad(mask, pad, value=IGNORE_INDEX))
    return torch.stack(images), torch.stack(masks)
