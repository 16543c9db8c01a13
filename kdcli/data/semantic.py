"""Cityscapes-style semantic segmentation loader.

Layout: ``leftImg8bit/{split}/{city}/<stem>_leftImg8bit.png`` paired with
``gtFine/{split}/{city}/<stem><label_suffix>`` (single-channel 8-bit label images).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..errors import DataError
from .coco import decode_rgb, first_line

IMAGE_SUFFIX = "_leftImg8bit.png"

# Cityscapes trainId class names (used when a Cityscapes tree has no classes.txt).
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]  # fmt: skip


def build_lut(id_map: dict[int, int] | None, ignore_index: int) -> np.ndarray | None:
    """256-entry uint8 lookup table: raw id -> train id, unmapped ids -> ignore_index."""
    if id_map is None:
        return None
    lut = np.full(256, ignore_index, dtype=np.uint8)
    for raw, train in id_map.items():
        if not (0 <= int(raw) <= 255 and 0 <= int(train) <= 255):
            raise DataError(f"id_map entry {raw}->{train}: ids must be in 0..255 (8-bit label images)")
        lut[int(raw)] = int(train)
    return lut


class SemanticFolder(Dataset):
    """Returns ``(tv_tensors.Image uint8 3xHxW, tv_tensors.Mask int64 HxW)``.

    Label values must be class indices ``0..len(classes)-1`` or ``ignore_index`` (after ``id_map``);
    anything else is reported as a DataError naming the file, rather than surfacing later as an
    opaque out-of-range error inside the loss.
    """

    def __init__(
        self,
        root: Path,
        split: str = "train",
        *,
        classes: list[str],
        transforms: Callable | None = None,
        label_suffix: str = "_gtFine_labelTrainIds.png",
        id_map: dict[int, int] | None = None,
        ignore_index: int = 255,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.classes = list(classes)
        self.transforms = transforms
        self.label_suffix = label_suffix
        self.ignore_index = ignore_index
        self._lut = build_lut(id_map, ignore_index)
        if not self.classes:
            raise DataError(f"{self.root}: no class names given for the segmentation data set")

        img_root = self.root / "leftImg8bit" / split
        gt_root = self.root / "gtFine" / split
        layout = f"expected {img_root}/<city>/*{IMAGE_SUFFIX} and {gt_root}/<city>/*{label_suffix}"
        if not self.root.is_dir():
            raise DataError(f"segmentation folder {self.root} does not exist ({layout})")
        if not img_root.is_dir():
            raise DataError(f"image folder {img_root} not found ({layout})")
        images = sorted(img_root.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise DataError(f"no *{IMAGE_SUFFIX} images in {img_root}/<city>/ ({layout})")
        self.items: list[tuple[Path, Path]] = []
        for img in images:
            stem = img.name[: -len(IMAGE_SUFFIX)]
            label = gt_root / img.parent.name / f"{stem}{label_suffix}"
            if not label.is_file():
                raise DataError(f"label file {label} not found for image {img}")
            self.items.append((img, label))

    @property
    def num_classes(self) -> int:
        """All classes, background included: class 0 is a real class for segmentation."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def _read_label(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                # 'P' (palette) images keep their indices: converting would turn them into colours.
                if im.mode not in ("L", "P"):
                    raise DataError(
                        f"{path}: label image must be single-channel 8-bit (L or P), got mode {im.mode}"
                    )
                label = np.array(im, dtype=np.uint8)
        except DataError:
            raise
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot decode label image ({first_line(err)})") from None
        if self._lut is not None:
            label = self._lut[label]
        return label

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img_path, label_path = self.items[index]
        image = decode_rgb(img_path)
        label = torch.from_numpy(self._read_label(label_path)).to(torch.int64)
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise DataError(
                f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but image {img_path.name} is "
                f"{image.shape[-1]}x{image.shape[-2]}"
            )
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if bool(bad.any()):
            raise DataError(
                f"{label_path}: label value {int(label[bad][0])} is not a class index "
                f"(0..{self.num_classes - 1}) or ignore ({self.ignore_index})"
            )
        img, mask = tv_tensors.Image(image), tv_tensors.Mask(label)
        if self.transforms is not None:
            img, mask = self.transforms(img, mask)
        return img, mask
