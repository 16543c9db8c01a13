"""The common interface of detection and segmentation models: preprocess once, then taps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..zoo import ModelSpec
from .taps import ModelOutput, TapInfo


@dataclass
class Batch:
    """A preprocessed batch shared by student and teacher."""

    images: Tensor  # (N, 3, H, W), normalised with ``mean``/``std``, padded
    image_sizes: list[tuple[int, int]]  # size of each image inside the padded tensor
    original_sizes: list[tuple[int, int]]
    targets: Any = None  # detection: list of dicts (resized boxes); segmentation: (N, H, W) int64
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        def move(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=True)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, list):
                return [move(v) for v in x]
            return x

        return Batch(move(self.images), self.image_sizes, self.original_sizes, move(self.targets),
                     self.mean, self.std, self.meta)


class TapModel(nn.Module):
    """A torchvision/timm model (``self.net``, plain key names) that returns named taps.

    ``forward(batch, need=None, losses=True, predict=False)``: ``need`` limits the taps to compute
    (a frozen teacher used by a feature method stops after the neck; a one-stage detector asked for
    ``cls_logits`` without ``head`` runs only its classification branch); losses are computed when
    the batch has targets; ``predict`` adds post-processed predictions in original image size.
    """

    task: str = ""

    def __init__(self, spec: ModelSpec, net: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.net = net
        self.mean = tuple(float(v) for v in spec.preprocess.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in spec.preprocess.get("std", (0.229, 0.224, 0.225)))
        self._tap_info: dict[str, TapInfo] | None = None

    # -- to be provided by subclasses ------------------------------------------------------
    def preprocess(self, images: list[Tensor], targets: Any = None) -> Batch:
        raise NotImplementedError

    def forward(
        self, batch: Batch, need: set[str] | None = None, losses: bool = True, predict: bool = False
    ) -> ModelOutput:
        raise NotImplementedError

    def dry_run_size(self) -> int:
        return 256

    # -- shared ------------------------------------------------------------------------------
    @property
    def tap_info(self) -> dict[str, TapInfo]:
        """Names, channels and strides of every tap, from one dry run (cached)."""
        if self._tap_info is None:
            from .taps import infer_tap_info

            size = self.dry_run_size()
            was_training = self.training
            self.eval()
            try:
                with torch.no_grad():
                    dev = next(self.parameters()).device
                    x = torch.zeros(1, 3, size, size, device=dev)
                    b = Batch(x, [(size, size)], [(size, size)], None, self.mean, self.std)
                    out = self.forward(b, need=None, losses=False, predict=False)
            finally:
                self.train(was_training)
            self._tap_info = infer_tap_info(out.taps, size)
        return self._tap_info

    def input_for(self, batch: Batch) -> Tensor:
        """The batch's image tensor in this model's normalisation (teacher and student may differ)."""
        if batch.mean == self.mean and batch.std == self.std:
            return batch.images
        m0 = torch.tensor(batch.mean, device=batch.images.device).view(1, -1, 1, 1)
        s0 = torch.tensor(batch.std, device=batch.images.device).view(1, -1, 1, 1)
        m1 = torch.tensor(self.mean, device=batch.images.device).view(1, -1, 1, 1)
        s1 = torch.tensor(self.std, device=batch.images.device).view(1, -1, 1, 1)
        return (batch.images * s0 + m0 - m1) / s1
