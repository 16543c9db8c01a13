"""COCO instances loader for detection: ``annotations/instances_{split}2017.json`` + ``{split}2017/``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from ..errors import DataError

_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox")
_CAT_KEYS = ("id", "name")


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_json(path: Path) -> Any:
    """Read a json file, turning I/O and syntax problems into a one-line :class:`DataError`."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or first_line(err)})") from None


def decode_rgb(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 RGB CHW; any decoding failure is a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot decode image ({first_line(err)})") from None


def _check_records(records: Any, section: str, keys: tuple[str, ...], ann_file: Path) -> list[dict]:
    if not isinstance(records, list):
        raise DataError(f"{ann_file}: '{section}' must be a list, got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{ann_file}: {section}[{i}] must be an object, got {type(rec).__name__}")
        missing = [k for k in keys if k not in rec]
        if missing:
            raise DataError(f"{ann_file}: {section}[{i}] is missing required key(s) {', '.join(missing)}")
    return records


class CocoDetection(Dataset):
    """COCO-format detection data set returning ``(tv_tensors.Image uint8 CHW, target dict)``.

    Category ids (possibly non-contiguous, as in COCO) are mapped to contiguous labels 1..K in
    sorted id order; 0 is torchvision's background. Crowd annotations are left out of the training
    targets (COCOeval treats them as "ignore" regions at evaluation time from the json directly).
    The raw annotation dicts stay available per image (:meth:`annotations`) so masks can be
    decoded later without re-reading the json.
    """

    def __init__(
        self,
        root: Path,
        split: str = "train",
        transforms: Callable | None = None,
        keep_empty: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.transforms = transforms
        layout = f"expected {self.root}/annotations/instances_{split}2017.json and {self.root}/{split}2017/"
        if not self.root.is_dir():
            raise DataError(f"COCO folder {self.root} does not exist ({layout})")
        self.ann_file = self.root / "annotations" / f"instances_{split}2017.json"
        self.img_dir = self.root / f"{split}2017"
        if not self.ann_file.is_file():
            raise DataError(f"COCO annotation file {self.ann_file} not found ({layout})")
        if not self.img_dir.is_dir():
            raise DataError(f"COCO image folder {self.img_dir} not found ({layout})")

        doc = load_json(self.ann_file)
        if not isinstance(doc, dict):
            raise DataError(f"{self.ann_file}: expected a JSON object with images, annotations, categories")
        missing = [k for k in ("images", "annotations", "categories") if k not in doc]
        if missing:
            raise DataError(f"{self.ann_file}: missing required key(s) {', '.join(missing)}")
        images = _check_records(doc["images"], "images", _IMAGE_KEYS, self.ann_file)
        anns = _check_records(doc["annotations"], "annotations", _ANN_KEYS, self.ann_file)
        cats = _check_records(doc["categories"], "categories", _CAT_KEYS, self.ann_file)
        if not cats:
            raise DataError(f"{self.ann_file}: 'categories' is empty")

        cats = sorted(cats, key=lambda c: c["id"])
        self.classes: list[str] = [str(c["name"]) for c in cats]
        self.label_to_cat_id: dict[int, int] = {i + 1: int(c["id"]) for i, c in enumerate(cats)}
        self.cat_id_to_label: dict[int, int] = {v: k for k, v in self.label_to_cat_id.items()}
        if len(self.cat_id_to_label) != len(cats):
            raise DataError(f"{self.ann_file}: duplicate category ids in 'categories'")

        self._images: dict[int, dict] = {int(im["id"]): im for im in images}
        self._anns: dict[int, list[dict]] = {i: [] for i in self._images}
        for i, ann in enumerate(anns):
            if ann["image_id"] not in self._anns:
                raise DataError(
                    f"{self.ann_file}: annotations[{i}] refers to unknown image_id {ann['image_id']}"
                )
            if ann["category_id"] not in self.cat_id_to_label:
                raise DataError(
                    f"{self.ann_file}: annotations[{i}] has category_id {ann['category_id']} "
                    "not listed in 'categories'"
                )
            bbox = ann["bbox"]
            numeric = isinstance(bbox, list) and all(isinstance(v, (int, float)) for v in bbox)
            if not (numeric and len(bbox) == 4):
                raise DataError(f"{self.ann_file}: annotations[{i}] bbox must be [x, y, w, h], got {bbox!r}")
            self._anns[ann["image_id"]].append(ann)

        ids = sorted(self._images)
        if not keep_empty:  # torchvision's detection reference drops images without usable boxes for training
            ids = [i for i in ids if any(self._usable(a) for a in self._anns[i])]
        self.ids: list[int] = ids

    @property
    def num_classes(self) -> int:
        """Foreground classes + background (torchvision detection convention)."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def annotations(self, image_id: int) -> list[dict]:
        """The raw json annotations of one image (crowd ones included)."""
        return self._anns[image_id]

    def image_info(self, image_id: int) -> dict:
        return self._images[image_id]

    @staticmethod
    def _usable(ann: dict) -> bool:
        """A training box: not crowd, and at least one pixel wide and tall."""
        return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1

    def _boxes_labels(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [a for a in self._anns[image_id] if self._usable(a)]
        if not rows:
            return torch.zeros((0, 4), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64)
        xywh = torch.tensor([a["bbox"] for a in rows], dtype=torch.float32)
        labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in rows], dtype=torch.int64)
        return torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1), labels

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_id = self.ids[index]
        info = self._images[image_id]
        path = self.img_dir / info["file_name"]
        image = decode_rgb(path)
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if (h, w) != (int(info["height"]), int(info["width"])):
            # Boxes are in the json's pixel frame: a size mismatch would silently misplace them.
            raise DataError(
                f"{path}: image is {w}x{h} but {self.ann_file.name} says {info['width']}x{info['height']}"
            )
        boxes, labels = self._boxes_labels(image_id)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": labels,
            "image_id": image_id,
            "orig_size": (h, w),
            "iscrowd": torch.zeros_like(labels),  # crowd boxes are excluded above
        }
        img = tv_tensors.Image(image)
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target
