"""Train/eval transforms (torchvision.transforms.v2) for detection and semantic segmentation.

They follow the torchvision reference recipes (``references/detection/presets.py``,
``references/segmentation/presets.py``); boxes and masks move with the image because v2 transforms
act on ``tv_tensors`` together.

- Detection, train: resize so the shorter side is ``min_size`` and the longer at most ``max_size``
  (the rule of torchvision's ``GeneralizedRCNNTransform``, done here in the loader's worker
  processes when the model's sizes are known), horizontal flip, drop degenerate boxes.
- Detection, eval: no resize here. The detector's own transform resizes and maps its boxes and
  masks back to the original image exactly, which is how the reference evaluates.
- Segmentation, train: shorter side drawn from [0.5, 2.0] x ``size``, random crop ``size``
  (padding: image 0, mask ignore), horizontal flip.
- Segmentation, eval: the image's shorter side to ``size``; the label stays at full resolution
  and predictions are upsampled to it (metrics at the label's resolution, as mmseg/torchvision).
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import ConfigError

IGNORE_INDEX = 255


def labels_and_crowd(inputs: Any) -> tuple[torch.Tensor, ...]:
    """SanitizeBoundingBoxes labels_getter: drop ``labels`` and ``iscrowd`` together with their boxes.

    A module-level function (not a lambda) so the transform pickles into DataLoader workers.
    """
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(target[k] for k in ("labels", "iscrowd") if k in target)


class ShorterSideResize(v2.RandomShortestSize):
    """Scale by ``min(min_size / shorter, max_size / longer)`` (truncating, as the detector's own
    interpolate does). A fixed scale: unlike ``RandomShortestSize`` it draws no random number, so the
    augmentation's random stream is the flip's alone."""

    def __init__(self, min_size: int, max_size: int | None = None) -> None:
        super().__init__(min_size=min_size, max_size=max_size, antialias=True)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        r = self.min_size[0] / min(h, w)
        if self.max_size is not None:
            r = min(r, self.max_size / max(h, w))
        return {"size": (int(h * r), int(w * r))}


def detection_transforms(train: bool, min_size: int | None = None, max_size: int | None = None) -> v2.Transform:
    to_float = v2.ToDtype(torch.float32, scale=True)  # images only; boxes keep their dtype
    if not train:
        return to_float
    steps: list[v2.Transform] = []
    if min_size:
        # scale = min(min_size / shorter, max_size / longer), the detector transform's own rule, so
        # the model's resize of this image is (up to a pixel of rounding) the identity
        steps.append(ShorterSideResize(min_size, max_size or None))
    return v2.Compose([
        *steps,
        v2.RandomHorizontalFlip(0.5),
        to_float,
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(labels_getter=labels_and_crowd),
    ])


class ResizeImageOnly(v2.Transform):
    """Evaluation: resize the image (shorter side to ``size``) and convert it to float; the mask
    passes through untouched so metrics are computed at the label's own resolution."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.resize = v2.Compose([v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True)])

    def forward(self, *inputs: Any) -> Any:
        image, mask = inputs if len(inputs) == 2 else inputs[0]
        return self.resize(image), mask


def segmentation_transforms(train: bool, size: int) -> v2.Transform:
    if not train:
        return ResizeImageOnly(size)
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    return v2.Compose([
        # Shorter side drawn from [0.5, 2.0] x size, as the torchvision segmentation reference.
        v2.RandomResize(max(1, int(0.5 * size)), int(2.0 * size)),
        v2.RandomCrop(size, pad_if_needed=True, fill=fill),
        v2.RandomHorizontalFlip(0.5),
        v2.ToDtype(torch.float32, scale=True),
    ])


def build_transforms(task: str, train: bool, size: int, max_size: int | None = None,
                     det_resize: bool = False) -> v2.Transform:
    """``task`` is ``"detection"`` or ``"segmentation"``; ``size`` is the segmentation crop/eval size,
    or the detector's ``min_size`` (used for training when ``det_resize``) with ``max_size``."""
    if task == "detection":
        return detection_transforms(train, size if det_resize else None, max_size)
    if task == "segmentation":
        return segmentation_transforms(train, size)
    raise ConfigError(f"--task: unknown task '{task}' (expected detection or segmentation)")
