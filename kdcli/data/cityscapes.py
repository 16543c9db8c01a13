"""Cityscapes semantic segmentation: ``labelIds`` ground truth mapped to the 19 training classes.

Layout (as distributed by cityscapes-dataset.com)::

    leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

The label table (name, id, trainId) is the one of cityscapesScripts ``helpers/labels.py``: 34 ids
(0..33) plus ``license plate`` with id and trainId -1. Ids whose trainId is 255 or -1, and any id
not in the table (e.g. the value 255 that id -1 becomes in an 8-bit PNG), are ignored (255).
The official evaluation script scores predictions written with the regular ids, so
:func:`write_label_ids` maps trainIds back (the first label of each trainId, as ``trainId2label``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import DataError
from .semantic import IMAGE_SUFFIX, SemanticFolder

IGNORE = 255
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"


class CityscapesLabel(NamedTuple):
    name: str
    id: int
    train_id: int


# cityscapesScripts helpers/labels.py: (name, id, trainId). Facts, re-typed; the other columns
# (category, colour...) are not needed here.
LABELS: tuple[CityscapesLabel, ...] = tuple(CityscapesLabel(*row) for row in (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9),
    ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14),
    ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17),
    ("bicycle", 33, 18), ("license plate", -1, -1),
))  # fmt: skip

NUM_CLASSES = 19
CITYSCAPES_CLASSES: list[str] = [
    next(lab.name for lab in LABELS if lab.train_id == t) for t in range(NUM_CLASSES)
]


def id_to_train_lut() -> np.ndarray:
    """256-entry uint8 table: labelId -> trainId; every id without a training class -> 255."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for lab in LABELS:
        if 0 <= lab.id <= 255 and 0 <= lab.train_id < NUM_CLASSES:
            lut[lab.id] = lab.train_id
    return lut


def train_to_id_lut() -> np.ndarray:
    """256-entry uint8 table: trainId -> labelId (the first label of that trainId); 255 -> 0 (unlabeled)."""
    lut = np.zeros(256, dtype=np.uint8)
    for lab in reversed(LABELS):  # reversed so the first label in table order wins
        if 0 <= lab.train_id < NUM_CLASSES:
            lut[lab.train_id] = lab.id
    return lut


def to_train_ids(label_ids: Tensor) -> Tensor:
    """Map a labelId map (any shape, integer) to trainIds (255 = ignore), one table lookup."""
    lut = torch.from_numpy(id_to_train_lut()).to(device=label_ids.device, dtype=torch.int64)
    return lut[label_ids.long().clamp(0, 255)]


def to_label_ids(train_ids: Tensor) -> Tensor:
    """Map a trainId map (predictions, 0..18) back to Cityscapes labelIds (uint8)."""
    lut = torch.from_numpy(train_to_id_lut()).to(train_ids.device)
    if train_ids.numel() and (int(train_ids.min()) < 0 or int(train_ids.max()) > 255):
        raise ValueError("trainIds must be in 0..255")
    return lut[train_ids.long()]


def label_ids_path(out_dir: Path, image: Path) -> Path:
    """Where the prediction for ``image`` goes: ``out_dir/<city>/<city>_<seq>_<frame>_labelIds.png``.

    The official script (``evalPixelLevelSemanticLabeling``) finds a prediction by the pattern
    ``<city>_<seq>_<frame>*.png`` anywhere under its prediction folder."""
    name = image.name
    stem = name[: -len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else image.stem
    return Path(out_dir) / image.parent.name / f"{stem}_labelIds.png"


def write_label_ids(train_ids: Tensor, path: Path) -> Path:
    """Write a full-resolution trainId prediction (H, W) as an 8-bit labelIds PNG."""
    if train_ids.dim() != 2:
        raise ValueError(f"expected an (H, W) prediction, got shape {tuple(train_ids.shape)}")
    ids = to_label_ids(train_ids.cpu()).numpy().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids, "L").save(path)
    return path


class CityscapesSegmentation(SemanticFolder):
    """The Cityscapes tree read through its official ``*_gtFine_labelIds.png`` (mapped to the 19
    trainIds on load), or through pre-converted ``*_gtFine_labelTrainIds.png`` with
    ``labels="trainids"`` (as written by cityscapesScripts ``createTrainIdLabelImgs``)."""

    def __init__(self, root: Path, split: str = "train", *, transforms: Callable | None = None,
                 labels: str = "ids") -> None:
        if labels not in ("ids", "trainids"):
            raise DataError(f"cityscapes labels={labels}: expected ids or trainids")
        suffix = LABEL_IDS_SUFFIX if labels == "ids" else TRAIN_IDS_SUFFIX
        super().__init__(root, split, classes=CITYSCAPES_CLASSES, transforms=transforms, label_suffix=suffix,
                         ignore_index=IGNORE)
        if labels == "ids":
            self._lut = id_to_train_lut()
