"""Train/eval transforms (torchvision.transforms.v2) for detection and semantic segmentation.

Detection keeps the original resolution: torchvision detectors resize and normalise inside their own
``GeneralizedRCNNTransform``, so here images only become float in [0, 1]. Segmentation models take
tensors as-is, so resizing/cropping happens here (image bilinear, mask nearest, mask padding = ignore).
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


def detection_transforms(train: bool) -> v2.Transform:
    to_float = v2.ToDtype(torch.float32, scale=True)  # images only; boxes keep their dtype
    if not train:
        return to_float
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        to_float,
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(labels_getter=labels_and_crowd),
    ])


def segmentation_transforms(train: bool, size: int) -> v2.Transform:
    to_float = v2.ToDtype(torch.float32, scale=True)
    if not train:
        # Shorter side to ``size``; v2 always resizes tv_tensors.Mask with nearest neighbour.
        return v2.Compose([v2.Resize(size, antialias=True), to_float])
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    return v2.Compose([
        # Shorter side drawn from [0.5, 2.0] x size, as the torchvision segmentation reference.
        v2.RandomResize(max(1, int(0.5 * size)), int(2.0 * size)),
        v2.RandomCrop(size, pad_if_needed=True, fill=fill),
        v2.RandomHorizontalFlip(0.5),
        to_float,
    ])


def build_transforms(task: str, train: bool, size: int) -> v2.Transform:
    """``task`` is ``"detection"`` or ``"segmentation"``; ``size`` is the segmentation crop/eval size."""
    if task == "detection":
        return detection_transforms(train)
    if task == "segmentation":
        return segmentation_transforms(train, size)
    raise ConfigError(f"--task: unknown task '{task}' (expected detection or segmentation)")
