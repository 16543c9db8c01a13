"""COCO instances loader for detection: ``annotations/instances_{split}2017.json`` + ``{split}2017/``.

Label spaces (``labels=``): a detector's class index must mean what the model was trained on.

- ``category-id``: label == COCO category id, classes listed in slots 1..max id with ``"N/A"`` in
  the gaps. This is torchvision's 91-slot layout (``_COCO_CATEGORIES``) that its pretrained COCO
  detectors predict, and the zoo's ``coco`` class set.
- ``contiguous``: labels 1..K in category-id order, 0 = background (torchvision's convention for
  any other data set; mmdetection's 0..K-1 is this minus one, a converter's business).
- ``auto`` (default): the layout whose class list equals the model's (``label_hint``), else
  ``category-id`` when the json holds exactly the 80 standard COCO categories, else ``contiguous``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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


# COCO's instances_train2017.json (448 MB) takes tens of seconds to parse: say so rather than sit silent
ANNOUNCE_BYTES = 50 * 2**20


def load_json(path: Path) -> Any:
    """Read a json file, turning I/O and syntax problems into a one-line :class:`DataError`; a file over
    :data:`ANNOUNCE_BYTES` is announced on stderr first."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    if size > ANNOUNCE_BYTES:
        print(f"reading {path} ({size / 2**20:.0f} MB of annotations; this takes a while)", file=sys.stderr,
              flush=True)
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
    kind = image_kind(path)
    if kind is None:
        raise DataError(f"{path}: not an image (no JPEG, PNG, WebP or GIF signature at its start)")
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as err:
        raise DataError(f"{path}: corrupt {kind} file ({decoder_reason(err)})") from None


# the decoders torchvision.io.decode_image has, by file signature
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"))


def image_kind(path: Path) -> str | None:
    """The image format of ``path`` from its first bytes (None: none torchvision decodes)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or first_line(err)})") from None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for sig, name in _SIGNATURES if head.startswith(sig)), None)


def decoder_reason(err: BaseException) -> str:
    """torchvision's message without its prefix ``function, /build/path/file.cpp:line, ``."""
    text = first_line(err)
    parts = text.split(", ", 2)
    if len(parts) == 3 and (".cpp:" in parts[1] or ".c:" in parts[1]):
        return parts[2]
    return text


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

    The target holds ``boxes`` (XYXY ``BoundingBoxes``), ``labels`` (in the label space above),
    ``image_id``, ``orig_size``, ``iscrowd`` and, with ``masks=True`` (Mask R-CNN), ``masks``
    (``tv_tensors.Mask`` N x H x W uint8 decoded from polygons or RLE). Crowd annotations
    (``iscrowd=1``) and boxes under one pixel wide or tall are left out of the training targets;
    evaluation reads the json itself, where COCOeval treats crowd regions as "ignore". The raw
    annotation dicts stay available per image (:meth:`annotations`). ``keep_empty=False`` drops
    images without a usable box (torchvision's detection reference does so for training).
    """

    def __init__(
        self,
        root: Path | None = None,
        split: str = "train",
        transforms: Callable | None = None,
        keep_empty: bool = True,
        *,
        ann_file: Path | None = None,
        img_dir: Path | None = None,
        labels: str = "auto",
        label_hint: list[str] | None = None,
        masks: bool = False,
        hint_subsets: bool = False,
    ) -> None:
        self.split = split
        self.transforms = transforms
        self.with_masks = masks
        if ann_file is None or img_dir is None:
            if root is None:
                raise ValueError("CocoDetection needs root, or both ann_file and img_dir")
            self.root = Path(root).expanduser()
            layout = f"expected {self.root}/annotations/instances_{split}2017.json and {self.root}/{split}2017/"
            if not self.root.is_dir():
                raise DataError(f"COCO folder {self.root} does not exist ({layout})")
            ann_file = ann_file or self.root / "annotations" / f"instances_{split}2017.json"
            img_dir = img_dir or self.root / f"{split}2017"
        else:
            self.root = Path(img_dir).parent
            layout = "check the paths in the data file"
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
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

        pairs = sorted((int(c["id"]), str(c["name"])) for c in cats)
        if len({i for i, _ in pairs}) != len(pairs):
            raise DataError(f"{self.ann_file}: duplicate category ids in 'categories'")
        self.categories: dict[int, str] = dict(pairs)
        self.label_space = resolve_label_space(labels, pairs, label_hint, self.ann_file, hint_subsets)
        if self.label_space == "category-id":
            self.classes: list[str] = slot_names(pairs)
            if hint_subsets and label_hint is not None and is_id_subset(pairs, label_hint):
                self.classes = list(label_hint)  # a subset of the model's categories: its full slot list
            self.label_to_cat_id: dict[int, int] = {i: i for i, _ in pairs}
        else:
            self.classes = [name for _, name in pairs]
            self.label_to_cat_id = {k + 1: i for k, (i, _) in enumerate(pairs)}
        self.cat_id_to_label: dict[int, int] = {v: k for k, v in self.label_to_cat_id.items()}

        if not images:
            raise DataError(f"{self.ann_file}: 'images' is empty: nothing to train or evaluate on")
        self._images: dict[int, dict] = {}
        first_index: dict[int, int] = {}
        for i, im in enumerate(images):
            image_id = int(im["id"])
            if image_id in self._images:  # two files under one id would share (merge) their boxes
                raise DataError(f"{self.ann_file}: images[{i}] (file_name {im['file_name']!r}) repeats image id "
                                f"{image_id} of images[{first_index[image_id]}]; image ids must be unique")
            self._images[image_id] = im
            first_index[image_id] = i
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
            if bbox[2] < 0 or bbox[3] < 0:  # not a degenerate box but a wrong one: never silently dropped
                raise DataError(f"{self.ann_file}: annotations[{i}] (id {ann['id']}, image_id {ann['image_id']}) "
                                f"has a negative width or height in bbox {bbox!r}; expected [x, y, w, h] "
                                "with w, h >= 0")
            if masks and self._usable(ann) and not ann.get("segmentation"):
                raise DataError(f"{self.ann_file}: annotations[{i}] has no 'segmentation' (needed for masks)")
            self._anns[ann["image_id"]].append(ann)

        ids = sorted(self._images)
        if not keep_empty:  # torchvision's detection reference drops images without usable boxes for training
            ids = [i for i in ids if any(self._usable(a) for a in self._anns[i])]
        self.ids: list[int] = ids

    @property
    def num_classes(self) -> int:
        """Classifier outputs: the classes + background (torchvision detection convention)."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def annotations(self, image_id: int) -> list[dict]:
        """The raw json annotations of one image (crowd ones included)."""
        return self._anns[image_id]

    def image_info(self, image_id: int) -> dict:
        return self._images[image_id]

    def image_path(self, index: int) -> Path:
        return self.img_dir / self._images[self.ids[index]]["file_name"]

    @staticmethod
    def _usable(ann: dict) -> bool:
        """A training box: not crowd, and at least one pixel wide and tall."""
        return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1

    def _targets(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        rows = [a for a in self._anns[image_id] if self._usable(a)]
        if not rows:
            return torch.zeros((0, 4), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64), rows
        xywh = torch.tensor([a["bbox"] for a in rows], dtype=torch.float32)
        labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in rows], dtype=torch.int64)
        return torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1), labels, rows

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
        boxes, labels, rows = self._targets(image_id)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": labels,
            "image_id": image_id,
            "orig_size": (h, w),
            "iscrowd": torch.zeros_like(labels),  # crowd boxes are excluded above
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(decode_masks([a["segmentation"] for a in rows], h, w))
        img = tv_tensors.Image(image)
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target


def decode_masks(segmentations: list[Any], h: int, w: int) -> torch.Tensor:
    """COCO ``segmentation`` fields (polygon lists, uncompressed or compressed RLE) to an (N, H, W)
    uint8 tensor, decoded by faster-coco-eval's C mask API (the same code COCOeval uses)."""
    if not segmentations:
        return torch.zeros((0, h, w), dtype=torch.uint8)
    from faster_coco_eval.core import mask as mask_api

    rles = []
    for segm in segmentations:
        if isinstance(segm, list):  # polygons: one object may have several parts
            rles.append(mask_api.merge(mask_api.frPyObjects(segm, h, w)))
        elif isinstance(segm.get("counts"), list):  # uncompressed RLE
            rles.append(mask_api.frPyObjects(segm, h, w))
        else:
            rles.append(segm)
    decoded = mask_api.decode(rles)  # (H, W, N), Fortran order
    return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)))


def coco80() -> list[tuple[int, str]]:
    """The 80 COCO 2017 categories as (id, name), from torchvision's 91-slot table."""
    from torchvision.models import _meta

    return [(i, n) for i, n in enumerate(_meta._COCO_CATEGORIES) if i > 0 and n != "N/A"]


def slot_names(pairs: list[tuple[int, str]]) -> list[str]:
    """Class list indexed by category id - 1 ("N/A" where no category has that id)."""
    names = ["N/A"] * max(i for i, _ in pairs)
    for i, n in pairs:
        names[i - 1] = n
    return names


def is_id_subset(pairs: list[tuple[int, str]], hint: list[str]) -> bool:
    """Whether every category of the data is the model's category of the same id and name (a COCO
    subset for a COCO-trained model, slot ``id - 1`` of its class list): users distil on subsets."""
    return all(1 <= i <= len(hint) and hint[i - 1] == n and n != "N/A" for i, n in pairs)


def resolve_label_space(requested: str, pairs: list[tuple[int, str]], hint: list[str] | None,
                        where: Path, hint_subsets: bool = False) -> str:
    """``category-id`` or ``contiguous`` for ``labels=requested`` (see the module docstring);
    ``hint_subsets``: a trained head's categories, of which the data may hold a subset."""
    if requested not in LABEL_SPACES:
        raise DataError(f"{where}: labels={requested}: expected {', '.join(LABEL_SPACES)}")
    ids_ok = all(i >= 1 for i, _ in pairs)
    if requested == "category-id" and not ids_ok:
        raise DataError(f"{where}: labels=category-id needs category ids >= 1 (0 is the background label)")
    if requested != "auto":
        return requested
    if hint is not None:
        if ids_ok and (list(hint) == slot_names(pairs) or (hint_subsets and is_id_subset(pairs, hint))):
            return "category-id"
        if list(hint) == [n for _, n in pairs]:
            return "contiguous"
    return "category-id" if pairs == coco80() else "contiguous"


LABEL_SPACES = ("auto", "category-id", "contiguous")
