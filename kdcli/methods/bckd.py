r"""BCKD — Binary Classification Distillation + IoU-based localisation distillation for sigmoid
detection heads (Yang et al., "Bridging Cross-task Protocol Inconsistency for Distillation in
Dense Object Detection", ICCV 2023, arXiv 2308.14286). kdcli's recommended logit method for
RetinaNet/FCOS.

Official code: TinyTigerPan/BCKD, ``NovelKDLoss`` / ``novel_kd_loss``
(``mmdet/models/losses/kd_loss.py``) and ``LDHead.loss_single`` (``mmdet/models/dense_heads/
ld_head.py``); config ``configs/bckd/bckd_r50_gflv1_r101_fpn_coco_1x.py`` (spec:
shared/methods/logit-methods.md §2.8.3). For every location ``l`` and class ``c`` of the
``(N, L, C)`` cls logits, with ``p = σ(z_t)``, ``q = σ(z_s)``::

    BCD   = w_cls · Σ_{l,c} v_l · BCE(z_s[l,c], p[l,c]) · |p[l,c] − q[l,c]|^β   / max(#pos, 1)
    BoxKD = w_box · Σ_l  v_l · max_c |p[l,c] − q[l,c]| · (1 − GIoU(b_s[l], b_t[l]))   / max(#pos, 1)

- ``v_l`` is the label weight: 1, or 0 at locations the student's matcher ignores (RetinaNet:
  IoU with every box in [0.4, 0.5)); FCOS ignores none. With ``skip_empty_levels=true`` (official
  behaviour) every location of an FPN level that has no positive in the batch gets ``v_l = 0``:
  the official head computes both terms inside a per-level "this level has positives" branch.
- ``#pos``: positive locations of the student's assignment in the batch (RetinaNet: IoU ≥ 0.5 plus
  each box's best anchors; FCOS: centre sampling within 1.5 strides and the level's scale range;
  read from ``extras["match"]``, see :func:`kdcli.models.detection.match_locations`).
- The modulating factor ``|p − q|^β`` is **not** detached (gradient flows through it, as in the
  official code and quality focal loss); the box weight ``max_c |p − q|`` **is** detached.
- BCE against the teacher's probability is the cross-entropy form (not 0 for identical logits:
  the factor ``|p − q|`` is, so the whole BCD term is 0 there).
- Boxes: ``b_s``, ``b_t`` are the student's and teacher's regression outputs decoded on the
  **student's** anchors/locations (``extras["decode"]``: RetinaNet anchor deltas, FCOS ltrb
  distances), teacher boxes detached. GIoU is torchvision's ``generalized_box_iou_loss`` (ε = 1e-7
  added to the denominators; mmdet's ``GIoULoss`` clamps them at 1e-6 instead — the two differ only
  for degenerate boxes). GFL decodes integral distributions and measures boxes in stride units;
  GIoU is scale-invariant, so decoding in pixels changes nothing.
- Defaults: loss weights 1.0 (BCD) and 4.0 (box), β = 1, no temperature (``NovelKDLoss`` takes a
  ``T`` it never uses). The config's LD/VLR terms have weight 0 and are not implemented.
- ``#pos`` counts the local batch; the official code averages it over GPUs.

Teacher and student must share the head geometry (anchors per location, FPN levels, classes):
location ``l`` has to mean the same prior in both, otherwise a MethodError asks for a feature
method.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from ..errors import ConfigError, MethodError
from ..models.taps import ModelOutput, TapInfo
from . import register
from ._logits import level_index, matched_locations
from .base import Method
from .common import float32_region, upcast


def binary_kd(zs: Tensor, zt: Tensor, beta: float) -> Tensor:
    """Element-wise ``BCE(z_s, σ(z_t)) · |σ(z_t) − σ(z_s)|^β`` (BCKD's ``novel_kd_loss`` before Σ_c)."""
    p = torch.sigmoid(zt)
    gap = (p - torch.sigmoid(zs)).abs()
    return F.binary_cross_entropy_with_logits(zs, p, reduction="none") * (gap if beta == 1 else gap.pow(beta))


@register
class BCKD(Method):
    """Binary classification KD + GIoU box KD for sigmoid heads (module docstring)."""

    name = "bckd"
    paper = "Yang et al., Bridging Cross-task Protocol Inconsistency for Distillation in Dense Detection (ICCV 2023)"
    tasks = ("detection",)
    needs_targets = True
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # configs/bckd/bckd_r50_gflv1_r101_fpn_coco_1x.py: NovelKDLoss 1.0, GIoULoss 4.0, β = 1
        "detection": {"taps": "cls_logits", "weight": 1.0, "box_weight": 4.0, "beta": 1.0,
                      "skip_empty_levels": True},
    }

    def __init__(self, student: dict[str, TapInfo], teacher: dict[str, TapInfo], task: str, **hp: Any) -> None:
        super().__init__(student, teacher, task, **hp)
        if self.taps != ("cls_logits",):
            raise ConfigError("--set taps: bckd distils the 'cls_logits' of a RetinaNet/FCOS head only")
        self.box_weight = float(hp["box_weight"])
        if self.box_weight > 0:
            self.needs = (*self.taps, "head")  # the teacher's box regression (extras["head"]), not only its logits
        self.beta = float(hp["beta"])
        if self.beta <= 0:
            raise ConfigError(f"--set beta: the modulating exponent must be > 0 (got {self.beta})")
        self.skip_empty_levels = bool(hp["skip_empty_levels"])
        cs, ct = student["cls_logits"].channels, teacher["cls_logits"].channels
        if cs != ct:
            raise MethodError(f"method 'bckd': the student predicts {cs} classes and the teacher {ct}; binary "
                              "KD needs the same class list (use a feature method instead)")

    def forward(self, s: ModelOutput, t: ModelOutput, targets: Any = None) -> dict[str, Tensor]:
        zs, zt = s.taps["cls_logits"], t.taps["cls_logits"]
        if zs.dim() != 3 or zs.shape != zt.shape:
            raise MethodError(
                f"method 'bckd': student cls_logits {tuple(zs.shape)} and teacher {tuple(zt.shape)} differ; "
                "BCKD needs the same anchors per location, FPN levels and classes (use a feature method instead)"
            )
        with float32_region(zs):
            zs, zt = upcast(zs), upcast(zt.detach())
            v, num_pos = self._location_weights(s, targets, zs)
            out = {f"{self.name}.cls_logits": self.weight * (binary_kd(zs, zt, self.beta).sum(-1) * v).sum() / num_pos}
            if self.box_weight > 0:
                out[f"{self.name}.boxes"] = self.box_weight * self._box_loss(s, t, zs, zt, v) / num_pos
        return out

    def _location_weights(self, s: ModelOutput, targets: Any, zs: Tensor) -> tuple[Tensor, Tensor]:
        """``v`` (N, L) and ``max(#pos, 1)`` from the student's assignment."""
        matched = matched_locations(self.name, s, targets)
        if matched.shape != zs.shape[:2]:
            raise MethodError(f"method 'bckd': the student's assignment {tuple(matched.shape)} does not cover its "
                              f"{tuple(zs.shape[:2])} locations")
        pos = matched >= 0
        v = (matched != -2).to(zs.dtype)
        if self.skip_empty_levels:
            level, n_levels = level_index(s, zs.shape[1], zs.device)
            per_level = torch.zeros(n_levels, dtype=zs.dtype, device=zs.device).index_add_(
                0, level, pos.to(zs.dtype).sum(0))
            v = v * (per_level > 0).to(zs.dtype)[level]
        return v, pos.sum().to(zs.dtype).clamp(min=1)

    def _box_loss(self, s: ModelOutput, t: ModelOutput, zs: Tensor, zt: Tensor, v: Tensor) -> Tensor:
        decode = s.extras.get("decode")
        head_s, head_t = s.extras.get("head"), t.extras.get("head")
        if decode is None or not isinstance(head_s, dict) or not isinstance(head_t, dict):
            raise MethodError("method 'bckd': box KD needs the RetinaNet/FCOS head outputs of both models "
                              "(extras['head'], extras['decode']); use --set box_weight=0 to switch it off")
        rs, rt = head_s["bbox_regression"], head_t["bbox_regression"]
        if rs.shape != rt.shape:
            raise MethodError(f"method 'bckd': box regressions differ in shape: student {tuple(rs.shape)}, "
                              f"teacher {tuple(rt.shape)}")
        boxes_s = decode(upcast(rs))
        with torch.no_grad():
            boxes_t = decode(upcast(rt.detach()))
            w = (torch.sigmoid(zt) - torch.sigmoid(zs)).abs().amax(-1) * v
        giou = generalized_box_iou_loss(boxes_s.reshape(-1, 4), boxes_t.reshape(-1, 4).to(boxes_s), reduction="none")
        return (giou * w.reshape(-1)).sum()
