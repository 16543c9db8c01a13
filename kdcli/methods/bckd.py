r"""BCKD — Binary Classification Distillation + IoU-based localisation distillation for sigmoid
detection heads (Yang et al., "Bridging Cross-task Protocol Inconsistency for Distillation in
Dense Object Detection", ICCV 2023, arXiv 2308.14286). kdcli's recommended logit method for
RetinaNet/FCOS. Method page: docs/methods/bckd.md.

Official code: github.com/TinyTigerPan/BCKD (mmdet 2.28.2), ``NovelKDLoss`` / ``novel_kd_loss``
(``mmdet/models/losses/kd_loss.py``), ``LDHead.loss_single`` and ``LDHead.loss``
(``mmdet/models/dense_heads/ld_head.py``), ``GIoULoss`` (``mmdet/models/losses/iou_loss.py``),
``weight_reduce_loss`` (``mmdet/models/losses/utils.py``); config
``configs/bckd/bckd_r50_gflv1_r101_fpn_coco_1x.py``. For every location ``l`` and class ``c`` of the
``(N, L, C)`` cls logits, with ``p = σ(z_t)``, ``q = σ(z_s)``::

    BCD   = w_cls · Σ_{l,c} v_l · BCE(z_s[l,c], p[l,c]) · |p[l,c] − q[l,c]|^β   / D
    BoxKD = w_box · Σ_l  v_l · max_c |p[l,c] − q[l,c]| · (1 − GIoU(b_s[l], b_t[l]))   / D
    D     = Σ_images max(#pos_i, 1) + ε_32,   ε_32 = torch.finfo(torch.float32).eps ≈ 1.19e-7

- ``v_l`` is the label weight: 1, or 0 at locations the student's matcher ignores (RetinaNet:
  IoU with every box in [0.4, 0.5)); FCOS ignores none. With ``skip_empty_levels=true`` (official
  behaviour) every location of an FPN level that has no positive in the batch gets ``v_l = 0``:
  the official head computes both terms inside a per-level "this level has positives" branch.
- ``#pos_i``: positive locations of the student's assignment in image ``i`` (RetinaNet: IoU ≥ 0.5
  plus each box's best anchors; FCOS: centre sampling within 1.5 strides and the level's scale
  range; read from ``extras["match"]``, see :func:`kdcli.models.detection.match_locations`).
- ``D`` is the official divisor, quirks kept (:func:`~kdcli.methods._logits.avg_factor_divisor`):
  ``LDHead.get_targets`` counts ``Σ_i max(#pos_i, 1)`` (an image without positives adds 1), and
  mmdet's ``weight_reduce_loss`` divides by ``avg_factor + ε_32`` (its guard against 0, redundant
  here), which makes both terms ~1.2e-7/D relative smaller.
- The modulating factor ``|p − q|^β`` is **not** detached (gradient flows through it, as in the
  official code and quality focal loss); the box weight ``max_c |p − q|`` **is** detached.
- BCE against the teacher's probability is the cross-entropy form (not 0 for identical logits:
  the factor ``|p − q|`` is, so the whole BCD term is 0 there).
- Boxes: ``b_s``, ``b_t`` are the student's and teacher's regression outputs decoded on the
  **student's** anchors/locations (``extras["decode"]``: RetinaNet anchor deltas, FCOS ltrb
  distances), teacher boxes detached.
- GIoU is mmdet's (``GIoULoss(eps=1e-6)`` → ``bbox_overlaps(mode="giou", is_aligned=True)``), quirk
  kept: the union and the enclosing area are **clamped** below at 1e-6 (``max(·, 1e-6)``), not
  shifted by an ε as in torchvision's ``generalized_box_iou_loss`` (+1e-7 on both denominators, which
  moves every location's 1 − GIoU by up to ~1e-7 relative). See :func:`giou_loss`.
- GFL decodes integral distributions and measures boxes in stride units, kdcli in input pixels. With
  power-of-two strides the two frames differ by an exact binary scaling, so every GIoU is the same
  floating-point number; only the 1e-6 clamp acts on px² here and on stride² there (union or hull
  below 1e-6 px² here, below 1e-6·stride² there: sub-pixel, degenerate boxes only).
- Defaults: loss weights 1.0 (BCD) and 4.0 (box), β = 1, no temperature (``NovelKDLoss`` takes a
  ``T`` it never uses). The config's LD/VLR terms have weight 0 and are not implemented.
- ``D`` counts the local batch; the official code averages it over GPUs (``reduce_mean``).

Teacher and student must share the head geometry (anchors per location, FPN levels, classes):
location ``l`` has to mean the same prior in both, otherwise a MethodError asks for a feature
method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, MethodError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo
from . import register
from ._logits import avg_factor_divisor, level_index, matched_locations, row_chunks
from .base import Method
from .common import float32_region, upcast


def binary_kd(zs: Tensor, zt: Tensor, beta: float) -> Tensor:
    """Element-wise ``BCE(z_s, σ(z_t)) · |σ(z_t) − σ(z_s)|^β`` (BCKD's ``novel_kd_loss`` before Σ_c)."""
    p = torch.sigmoid(zt)
    gap = (p - torch.sigmoid(zs)).abs()
    return F.binary_cross_entropy_with_logits(zs, p, reduction="none") * (gap if beta == 1 else gap.pow(beta))


class _BinaryKDTotal(torch.autograd.Function):
    """Σ_rows v_row · Σ_c :func:`binary_kd` without the element-wise graph (RetinaNet at 800×1333: ≈ 200 k
    anchors × 91 classes per image, about a dozen float32 copies kept for backward otherwise). Both passes run
    chunk by chunk from ``z_s`` and ``z_t``; with p = σ(z_t), q = σ(z_s), gap = |p − q|, BCE = BCE(z_s, p)::

        ∂/∂z_s [BCE · gap^β] = (q − p) · gap^β + BCE · β · gap^(β−1) · sign(q − p) · q (1 − q)

    (the second term is 0 where gap = 0)."""

    @staticmethod
    def forward(ctx: Any, zs: Tensor, zt: Tensor, v: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(zs, zt, v)
        ctx.beta = beta
        acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc, device=zs.device)
        for idx in row_chunks(zs.shape):
            total += (binary_kd(upcast(zs[idx]), upcast(zt[idx]), beta).sum(-1) * v[idx]).sum(dtype=acc)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        zs, zt, v = ctx.saved_tensors
        beta = ctx.beta
        out = torch.empty(zs.shape, dtype=zs.dtype, device=zs.device)
        for idx in row_chunks(zs.shape):
            s_, t_ = upcast(zs[idx]), upcast(zt[idx])
            p, q = torch.sigmoid(t_), torch.sigmoid(s_)
            gap = (p - q).abs()
            bce = F.binary_cross_entropy_with_logits(s_, p, reduction="none")
            mod = gap if beta == 1 else gap.pow(beta)
            dmod = torch.sign(q - p) * q * (1 - q)  # ∂gap/∂z_s
            if beta != 1:
                dmod = torch.where(gap > 0, beta * gap.pow(beta - 1) * dmod, torch.zeros_like(dmod))
            out[idx] = (((q - p) * mod + bce * dmod) * (v[idx][..., None] * grad)).to(out.dtype)
        return out, None, None, None


def binary_kd_total(zs: Tensor, zt: Tensor, v: Tensor, beta: float) -> Tensor:
    """``(binary_kd(z_s, z_t, β).sum(-1) * v).sum()`` for ``(N, L, C)`` logits and ``(N, L)`` location weights,
    equal to it up to float rounding (tested, values and gradients) with a fraction of the memory; ``z_s``,
    ``z_t`` may be bf16/fp16 (each chunk is upcast). Neither ``z_t`` nor ``v`` gets a gradient."""
    return _BinaryKDTotal.apply(zs, zt.detach(), v.detach(), float(beta))


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 − GIoU`` of aligned ``(..., 4)`` x1y1x2y2 boxes, as mmdet's ``bbox_overlaps(mode="giou",
    is_aligned=True, eps)`` evaluates it: union and enclosing area clamped below at ``eps`` (not
    ε-shifted), ``GIoU = I/U − (E − U)/E`` in that order of operations."""
    p_lt, p_rb, t_lt, t_rb = pred[..., :2], pred[..., 2:], target[..., :2], target[..., 2:]
    area_p = (pred[..., 2] - pred[..., 0]) * (pred[..., 3] - pred[..., 1])
    area_t = (target[..., 2] - target[..., 0]) * (target[..., 3] - target[..., 1])
    inter_wh = (torch.minimum(p_rb, t_rb) - torch.maximum(p_lt, t_lt)).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = (area_p + area_t - inter).clamp(min=eps)
    hull_wh = (torch.maximum(p_rb, t_rb) - torch.minimum(p_lt, t_lt)).clamp(min=0)
    hull = (hull_wh[..., 0] * hull_wh[..., 1]).clamp(min=eps)
    return 1 - (inter / union - (hull - union) / hull)


@register
class BCKD(Method):
    """Binary classification KD + GIoU box KD for sigmoid heads (module docstring)."""

    name = "bckd"
    paper = "Yang et al., Bridging Cross-task Protocol Inconsistency for Distillation in Dense Detection (ICCV 2023)"
    evidence = "parity-tested"
    tasks = ("detection",)
    needs_targets = True
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # configs/bckd/bckd_r50_gflv1_r101_fpn_coco_1x.py: NovelKDLoss 1.0, GIoULoss 4.0, β = 1
        "detection": {"taps": "cls_logits", "weight": 1.0, "box_weight": 4.0, "beta": 1.0,
                      "skip_empty_levels": True},
    }

    @dataclass
    class Config:
        """Options of ``bckd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('cls_logits', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        weight: float = opt(1.0, 'loss weight per tap')
        box_weight: float = opt(4.0, 'weight of the box term (0: off)')
        beta: float = opt(1.0, 'focusing exponent β of the binary KD')
        skip_empty_levels: bool = opt(True, 'leave out FPN levels without a positive location')

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
            # v and the divisor in the dtype upcast gives (float32; float64 in the tests)
            v, divisor = self._location_weights(s, targets, zs, upcast(zs[:0]).dtype)
            # the raw (possibly bf16) logits: the chunked loss upcasts chunk by chunk
            out = {f"{self.name}.cls_logits": self.weight * binary_kd_total(zs, zt, v, self.beta) / divisor}
            zs, zt = upcast(zs), upcast(zt.detach())
            if self.box_weight > 0:
                out[f"{self.name}.boxes"] = self.box_weight * self._box_loss(s, t, zs, zt, v) / divisor
        return out

    def _location_weights(self, s: ModelOutput, targets: Any, zs: Tensor, dtype: torch.dtype
                          ) -> tuple[Tensor, Tensor]:
        """``v`` (N, L) and the divisor ``D`` (module docstring) in ``dtype``, from the student's assignment."""
        matched = matched_locations(self.name, s, targets)
        if matched.shape != zs.shape[:2]:
            raise MethodError(f"method 'bckd': the student's assignment {tuple(matched.shape)} does not cover its "
                              f"{tuple(zs.shape[:2])} locations")
        pos = matched >= 0
        v = (matched != -2).to(dtype)
        if self.skip_empty_levels:
            level, n_levels = level_index(s, zs.shape[1], zs.device)
            per_level = torch.zeros(n_levels, dtype=dtype, device=zs.device).index_add_(
                0, level, pos.to(dtype).sum(0))
            v = v * (per_level > 0).to(dtype)[level]
        return v, avg_factor_divisor(pos, dtype)

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
        return (giou_loss(boxes_s, boxes_t.to(boxes_s)) * w).sum()
