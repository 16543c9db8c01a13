"""Semantic segmentation from image files paired with single-channel label PNGs.

:class:`SemanticFolder` reads a Cityscapes-style tree (``leftImg8bit/{split}/{city}/<stem>_leftImg8bit.png``
with ``gtFine/{split}/{city}/<stem><label_suffix>``); :class:`MaskFolder` pairs any image folder with a
mask folder by relative path and suffix (the ``masks`` format of a data file). Both share
:class:`MaskDataset`: the label image is decoded as 8-bit indices, optionally mapped through a
256-entry lookup table (raw id -> class, e.g. Cityscapes labelIds -> trainIds), and checked.
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


class MaskDataset(Dataset):
    """Returns ``(tv_tensors.Image uint8 3xHxW, tv_tensors.Mask int64 HxW)`` for ``self.items``
    (pairs of image path, label path), before ``transforms``.

    Label values must be class indices ``0..len(classes)-1`` or ``ignore_index`` (after the lookup
    table); anything else is reported as a DataError naming the file, rather than surfacing later
    as an opaque out-of-range error inside the loss.
    """

    items: list[tuple[Path, Path]]

    def __init__(self, classes: list[str], transforms: Callable | None, lut: np.ndarray | None,
                 ignore_index: int, where: Path) -> None:
        self.classes = list(classes)
        self.transforms = transforms
        self.ignore_index = ignore_index
        self._lut = lut
        if not self.classes:
            raise DataError(f"{where}: no class names given for the segmentation data set")

    @property
    def num_classes(self) -> int:
        """All classes, background included: class 0 is a real class for segmentation."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, index: int) -> Path:
        return self.items[index][0]

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


class SemanticFolder(MaskDataset):
    """A Cityscapes-style tree: ``leftImg8bit/{split}/<city>/<stem>_leftImg8bit.png`` and
    ``gtFine/{split}/<city>/<stem><label_suffix>`` (default: already trainIds)."""

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
        self.label_suffix = label_suffix
        super().__init__(classes, transforms, build_lut(id_map, ignore_index), ignore_index, self.root)
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
        self.items = []
        for img in images:
            stem = img.name[: -len(IMAGE_SUFFIX)]
            label = gt_root / img.parent.name / f"{stem}{label_suffix}"
            if not label.is_file():
                raise DataError(f"label file {label} not found for image {img}")
            self.items.append((img, label))


class MaskFolder(MaskDataset):
    """Images under ``images`` paired with masks under ``masks`` by relative path:
    ``images/<rel>/<name><image_suffix>`` <-> ``masks/<rel>/<name><mask_suffix>``.

    ``list_file`` (optional) names the samples, one ``<rel>/<name>`` per line (no suffix), as VOC's
    ``ImageSets/Segmentation/*.txt``; without it every ``*<image_suffix>`` under ``images`` is used.
    """

    def __init__(
        self,
        images: Path,
        masks: Path,
        *,
        classes: list[str],
        transforms: Callable | None = None,
        image_suffix: str = ".jpg",
        mask_suffix: str = ".png",
        list_file: Path | None = None,
        id_map: dict[int, int] | None = None,
        ignore_index: int = 255,
        where: str = "",
    ) -> None:
        self.root = Path(images)
        where = where or str(images)
        super().__init__(classes, transforms, build_lut(id_map, ignore_index), ignore_index, Path(where))
        images, masks = Path(images), Path(masks)
        for folder, what in ((images, "images"), (masks, "masks")):
            if not folder.is_dir():
                raise DataError(f"{where}: {what} folder {folder} not found")
        if list_file is not None:
            if not list_file.is_file():
                raise DataError(f"{where}: list file {list_file} not found")
            names = [ln.strip() for ln in list_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
            rels = [Path(n) for n in names]
        else:
            found = sorted(images.rglob(f"*{image_suffix}"))
            rels = [Path(str(p.relative_to(images))[: -len(image_suffix)]) for p in found]
        if not rels:
            raise DataError(f"{where}: no *{image_suffix} images in {images}")
        self.items = []
        for rel in rels:
            img = images / f"{rel}{image_suffix}"
            mask = masks / f"{rel}{mask_suffix}"
            if not img.is_file():
                raise DataError(f"{where}: image {img} not found")
            if not mask.is_file():
                raise DataError(f"{where}: mask {mask} not found for image {img}")
            self.items.append((img, mask))
