"""Taps: the named tensors a model exposes to distillation methods.

A model's ``forward`` on a shared (already preprocessed) input returns a :class:`ModelOutput`:
``taps`` (ordered name → tensor), ``losses`` (task losses, when targets were given) and
``extras`` (task-specific side information a method may use, e.g. the anchors and the
student's matched indices of a dense detector).

Tap names
---------
- ``c2``..``c5``: backbone stages (strides 4..32; dilated segmentation backbones keep stride 8)
- ``p2``..``p7``: FPN levels (stride ``2**k``)
- ``cls_logits``: dense detection classification logits, ``(N, sum_l H_l*W_l*A, C)``
- ``seg_feat``: the segmentation head's last feature map before the classifier
- ``seg_logits``: segmentation logits at the head's resolution, ``(N, C, h, w)``
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class TapInfo:
    """What a tap is without running the model: its channels and stride (0 if not spatial).

    ``family`` names the detector the tap comes from (``retinanet``, ``fcos``, ``fasterrcnn``,
    ``maskrcnn``: the zoo's ``architecture``; set by :class:`~kdcli.models.detection.DetectionModel`
    on every tap), so that a method can pick the official recipe of that detector (FGD) without
    reaching into the model. Empty when unknown or not a detector.
    """

    name: str
    channels: int
    stride: int = 0
    kind: str = "feature"  # feature | logits
    family: str = ""


@dataclass
class ModelOutput:
    taps: dict[str, Tensor] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, object] = field(default_factory=dict)


FPN_LEVELS = ("p2", "p3", "p4", "p5", "p6", "p7")
STAGES = ("c2", "c3", "c4", "c5")


def fpn_taps(info: dict[str, TapInfo]) -> list[str]:
    """The FPN levels a model exposes, finest first (``p5a`` marks a second level at stride 32)."""
    levels = [n for n, i in info.items() if n[:1] == "p" and n[1:2].isdigit() and i.stride > 0]
    return sorted(levels, key=lambda n: (info[n].stride, n))


def infer_tap_info(taps: dict[str, Tensor], input_size: int) -> dict[str, TapInfo]:
    """Tap info from one dry run: channels from dim 1, stride from the input/feature ratio."""
    out: dict[str, TapInfo] = {}
    for name, t in taps.items():
        if t.dim() == 4:
            stride = max(1, round(input_size / t.shape[-1]))
            kind = "logits" if name.endswith("logits") else "feature"
            out[name] = TapInfo(name, int(t.shape[1]), stride, kind)
        else:
            out[name] = TapInfo(name, int(t.shape[-1]), 0, "logits")
    return out


def to_float32(t: Tensor) -> Tensor:
    """Losses are computed in float32 even under autocast."""
    return t.float() if t.dtype != torch.float32 else t
