r"""PKD — Pearson-correlation KD (Cao et al., "PKD: General Distillation Framework for
Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022, arXiv 2207.02039). Official
code: open-mmlab/mmrazor ``mmrazor/models/losses/pkd_loss.py`` (``PKDLoss``) and
``configs/distill/mmdet/pkd/*``, followed exactly. Method page: docs/methods/pkd.md.

Equations implemented, per tap (the paper's recipe: standardise each channel, then imitate with
an MSE, which equals 1 − r for the Pearson correlation r)::

    F̂(n, c, h, w) = ( F(n, c, h, w) − μ_c ) / ( σ_c + 1e-6 )                             (1)
        μ_c, σ_c: mean and **unbiased** (n−1) standard deviation of channel c over (N, H, W)
    L_tap = w · ½ · mean_{n,c,h,w} ( F̂_S − F̂_T )²                                          (2)

Both maps are standardised per channel over the whole batch (not per sample). The ½ is the
official one (``F.mse_loss(norm_S, norm_T) / 2``): a ``weight`` of 10 is an effective 5 on the
plain MSE. With σ ≫ 1e-6, ½·mean(F̂_S − F̂_T)² = (M−1)/M · mean_c(1 − r_c), M = N·H·W, r_c the
Pearson correlation of channel c — the paper's 1 − r. The loss is parameter-free: per channel,
(1) removes any affine change a·F + b with a > 0, so the student is free in scale and offset
and only the correlation pattern is imitated.

Presets:

- detection (official configs): neck outputs 0..3 (``taps="fpn:4"``: P3–P6 for RetinaNet/FCOS,
  P2–P5 for Faster R-CNN), w = 10 per level — mmrazor ``pkd_fpn_retina_x101_retina_r50_2x_coco.py``
  (also the FCOS-X101 → RetinaNet-R50 config). The Faster R-CNN R101 → R50 config uses w = 6
  (``--set weight=6``).
- segmentation (**our choice**: the paper and mmrazor have no PKD segmentation config): the last
  backbone stage ``c5`` (the tap of the mmseg-based feature methods, e.g. CanKD, MGD), w = 10 —
  the detection weight; CanKD's instance-normalised MSE with the same built-in ½ also uses 10 at
  ``c5``.

``resize_stu`` (official option, default True): when the spatial sizes differ the student map is
resized to the teacher's (bilinear, ``align_corners=False``); False resizes the teacher to the
student's instead.

Implementation notes: the per-channel statistics are one vectorised ``std_mean`` over dims
(0, 2, 3) instead of the official permute/reshape (same values); everything runs in float32
with autocast disabled.

Deviations:

- The official code compares only the heights to decide on resizing (and then asserts equal
  shapes); here any difference in H or W triggers the resize.
- A channel with a single value (N·H·W = 1, e.g. P6 of a tiny single image) has an undefined
  unbiased σ: the official code returns NaN; here that channel standardises to 0.

Heterogeneous pairs: if the channel counts differ, a connector — mmrazor ``ConvModuleConnector``
style: 1×1 conv student→teacher channels with bias, no norm/activation, Kaiming-normal (fan_out,
ReLU gain) weights, zero bias (``adapter_init="default"`` for PyTorch's init) — maps the student
first (no official PKD config needs one: all pairs have 256-channel FPNs). Because (1) cancels a
per-channel affine map, the connector's bias and any per-output-channel scale are irrelevant;
only the channel mixing it learns matters. Equal channel counts: no connector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..hparams import opt
from ..models.taps import TapInfo
from . import register
from .base import Method
from .common import build_adapter, match_spatial

EPS = 1e-6


def pearson_norm(x: Tensor, eps: float = EPS) -> Tensor:
    """Eq. (1): standardise each channel of an (N, C, H, W) map over (N, H, W), unbiased σ, σ + eps."""
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        return x - x  # one value per channel: σ undefined (official: NaN); documented deviation
    std, mean = torch.std_mean(x, dim=(0, 2, 3), keepdim=True, correction=1)
    return (x - mean) / (std + eps)


@register
class PKD(Method):
    """PKD (Cao et al., NeurIPS 2022): L = w·½·mean(F̂_S − F̂_T)², F̂ = (F − μ_c)/(σ_c + 1e-6) over (N, H, W).

    σ is the unbiased std. Presets (segmentation is our choice), connector and deviations: module docstring.
    """

    name = "pkd"
    paper = (
        "Cao et al., PKD: General Distillation Framework for Object Detectors via Pearson Correlation "
        "Coefficient (NeurIPS 2022)"
    )
    evidence = "parity-tested"
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # mmrazor configs/distill/mmdet/pkd/pkd_fpn_retina_x101_retina_r50_2x_coco.py: fpn0..3, w 10
        "detection": {"taps": "fpn:4", "weight": 10.0, "resize_stu": True, "adapter_init": "kaiming"},
        # our choice (no official PKD segmentation config): last backbone stage, w 10
        "segmentation": {"taps": "c5", "weight": 10.0, "resize_stu": True, "adapter_init": "kaiming"},
    }

    @dataclass
    class Config:
        """Options of ``pkd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('fpn:4', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        weight: float = opt(10.0, 'loss weight per tap')
        resize_stu: bool = opt(True, "resize the student to the teacher's size (else the teacher to the student's)")
        adapter_init: Literal["default", "kaiming"] = opt('kaiming', 'adapter init: PyTorch default or kaiming (mmcv)')

    def __init__(
        self,
        student: dict[str, TapInfo],
        teacher: dict[str, TapInfo],
        task: str,
        **hp: Any,
    ) -> None:
        super().__init__(student, teacher, task, **hp)
        self.resize_stu = bool(hp["resize_stu"])
        self.connectors = nn.ModuleDict()
        for tap in self.taps:
            cs, ct = student[tap].channels, teacher[tap].channels
            if cs != ct:
                self.connectors[tap] = build_adapter(cs, ct, bias=True, init=str(hp["adapter_init"]))

    def tap_loss(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        """The weighted loss of one tap: connector, resize, Eq. (1) on both maps, Eq. (2)."""
        if tap in self.connectors:
            fs = self.connectors[tap](fs)
        if self.resize_stu:
            fs = match_spatial(fs, ft)
        else:
            ft = match_spatial(ft, fs)
        diff = pearson_norm(fs) - pearson_norm(ft)
        return self.weight * 0.5 * diff.pow(2).mean()
