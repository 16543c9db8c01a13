"""BatchNorm recalibration after training (``--bn-recal``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..models import TapModel


@torch.no_grad()
def recalibrate_bn(model: TapModel, batches: Iterable[Any], n: int, device: torch.device) -> None:
    """Re-estimate BatchNorm running statistics as a plain average over ``n`` training batches.

    Short runs leave running statistics far from the weights' (MobileNetV3 uses momentum 0.01);
    evaluating with them predicts background only. This is part of training, deterministic.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or n <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was = model.training
    model.train()
    for i, (images, _targets) in enumerate(batches):
        if i >= n:
            break
        b = model.preprocess([im.to(device) for im in images] if isinstance(images, list) else images.to(device))
        model(b, need={"seg_logits"} if model.task == "segmentation" else None, losses=False)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.train(was)
