"""Numerical parity of the detection logit losses whose official code reduces with mmdet's conventions.

- ``bckd`` against TinyTigerPan/BCKD (mmdet 2.28.2): ``LDHead.loss`` / ``LDHead.loss_single``
  (``mmdet/models/dense_heads/ld_head.py``), ``NovelKDLoss`` (``mmdet/models/losses/kd_loss.py``),
  ``GIoULoss`` (``mmdet/models/losses/iou_loss.py``), ``bbox_overlaps``
  (``mmdet/core/bbox/iou_calculators/iou2d_calculator.py``), ``weighted_loss`` / ``weight_reduce_loss``
  (``mmdet/models/losses/utils.py``), ``GFLHead``'s ``Integral`` and ``distance2bbox``;
- ``kd`` with ``sample_reduction=avg_factor`` against the same mmdet reduction as jbwang1997/CrossKD
  (mmdet 3.0.0rc6) calls it per level (label weights, ``avg_factor`` = Σ_images max(#pos, 1)).

The ``official_*`` functions re-state that code in its own structure (per-level NCHW maps flattened with
``permute(0, 2, 3, 1)``, the per-level "has positives" branch, GFL boxes in stride units, the
``@weighted_loss`` wrapper, ``avg_factor + finfo(float32).eps``, the GIoU ε clamp). They were written for
these tests from reading those files and share no code with kdcli. kdcli gets the same float64 numbers in
its own layout: ``(N, L, C)`` logits and pixel boxes from an ``extras["decode"]`` written here. Losses and
the gradients with respect to the student's logits and box regression must agree to 1e-13 relative.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcli.methods.bckd import BCKD, giou_loss
from kdcli.methods.kd import KD
from kdcli.models.taps import ModelOutput, TapInfo

RTOL = 1e-13
STRIDES = (8, 16, 32, 64)
SIZES = ((8, 8), (4, 4), (2, 2), (1, 1))  # a 64×64 input
N, C, REG_MAX = 3, 6, 4


# ============================================================================ official (restated)
def official_weight_reduce_loss(loss: Tensor, weight: Tensor | None = None, reduction: str = "mean",
                                avg_factor: float | None = None) -> Tensor:
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return loss.mean() if reduction == "mean" else (loss.sum() if reduction == "sum" else loss)
    if reduction == "mean":
        eps = torch.finfo(torch.float32).eps
        loss = loss.sum() / (avg_factor + eps)
    elif reduction != "none":
        raise ValueError("avg_factor can not be used with reduction='sum'")
    return loss


def official_weighted_loss(loss_func: Callable[..., Tensor]) -> Callable[..., Tensor]:
    @functools.wraps(loss_func)
    def wrapper(pred, target, weight=None, reduction="mean", avg_factor=None, **kwargs):
        loss = loss_func(pred, target, **kwargs)
        return official_weight_reduce_loss(loss, weight, reduction, avg_factor)

    return wrapper


@official_weighted_loss
def official_novel_kd_loss(pred: Tensor, soft_label: Tensor, detach_target: bool = True, beta: float = 1.0) -> Tensor:
    target = soft_label.sigmoid()
    score = pred.sigmoid()
    if detach_target:
        target = target.detach()
    scale_factor = target - score
    kd_loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * scale_factor.abs().pow(beta)
    return kd_loss.sum(dim=1, keepdim=False)


def official_bbox_overlaps_giou_aligned(bboxes1: Tensor, bboxes2: Tensor, eps: float) -> Tensor:
    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])
    lt = torch.max(bboxes1[..., :2], bboxes2[..., :2])
    rb = torch.min(bboxes1[..., 2:], bboxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - overlap
    enclosed_lt = torch.min(bboxes1[..., :2], bboxes2[..., :2])
    enclosed_rb = torch.max(bboxes1[..., 2:], bboxes2[..., 2:])
    eps_t = union.new_tensor([eps])
    union = torch.max(union, eps_t)
    ious = overlap / union
    enclose_wh = (enclosed_rb - enclosed_lt).clamp(min=0)
    enclose_area = enclose_wh[..., 0] * enclose_wh[..., 1]
    enclose_area = torch.max(enclose_area, eps_t)
    return ious - (enclose_area - union) / enclose_area


@official_weighted_loss
def official_giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    return 1 - official_bbox_overlaps_giou_aligned(pred, target, eps)


def official_giou_loss_module(pred: Tensor, target: Tensor, weight: Tensor, avg_factor: float,
                              loss_weight: float, eps: float = 1e-6) -> Tensor:
    """``GIoULoss(eps=1e-6, loss_weight).forward``, with its all-zero-weight early return."""
    if weight is not None and not torch.any(weight > 0):
        if pred.dim() == weight.dim() + 1:
            weight = weight.unsqueeze(1)
        return (pred * weight).sum()
    return loss_weight * official_giou_loss(pred, target, weight, eps=eps, reduction="mean", avg_factor=avg_factor)


def official_integral(x: Tensor, reg_max: int) -> Tensor:
    project = torch.linspace(0, reg_max, reg_max + 1, dtype=x.dtype)
    x = F.softmax(x.reshape(-1, reg_max + 1), dim=1)
    return F.linear(x, project).reshape(-1, 4)


def official_distance2bbox(points: Tensor, distance: Tensor) -> Tensor:
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    return torch.stack([x1, y1, x2, y2], -1)


def official_anchor_center(anchors: Tensor) -> Tensor:
    return torch.stack([(anchors[..., 2] + anchors[..., 0]) / 2, (anchors[..., 3] + anchors[..., 1]) / 2], dim=-1)


def official_bckd_loss_single(anchors: Tensor, cls_score: Tensor, bbox_pred: Tensor, labels: Tensor,
                              label_weights: Tensor, stride: int, soft_targets: Tensor, soft_label: Tensor,
                              num_total_samples: float, num_classes: int) -> tuple[Tensor, Tensor]:
    """The BCKD part of ``LDHead.loss_single`` (``loss_kd`` = NovelKDLoss 1.0, ``loss_score_kd`` = GIoULoss 4.0)."""
    anchors = anchors.reshape(-1, 4)
    cls_score = cls_score.permute(0, 2, 3, 1).reshape(-1, num_classes)
    bbox_pred = bbox_pred.permute(0, 2, 3, 1).reshape(-1, 4 * (REG_MAX + 1))
    soft_targets = soft_targets.permute(0, 2, 3, 1).reshape(-1, 4 * (REG_MAX + 1))
    soft_label = soft_label.permute(0, 2, 3, 1).reshape(-1, num_classes)
    labels = labels.reshape(-1)
    label_weights = label_weights.reshape(-1)
    pos_inds = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
    if len(pos_inds) > 0:
        anchor_centers = official_anchor_center(anchors) / stride
        total_decode_bbox_pred = official_distance2bbox(anchor_centers, official_integral(bbox_pred, REG_MAX))
        total_decode_bbox_pred_t = official_distance2bbox(anchor_centers, official_integral(soft_targets, REG_MAX))
        weight_targets1 = cls_score.detach().sigmoid()
        weight_targets2 = soft_label.detach().sigmoid()
        weight_targets3 = weight_targets2 - weight_targets1
        total_weight_targets = weight_targets3.abs().pow(1.0).max(dim=1)[0] * label_weights
        loss_score_kd = official_giou_loss_module(total_decode_bbox_pred, total_decode_bbox_pred_t.detach(),
                                                  total_weight_targets, num_total_samples, loss_weight=4.0)
        loss_kd = 1.0 * official_novel_kd_loss(cls_score, soft_label, label_weights,
                                               avg_factor=num_total_samples, beta=1.0)
    else:
        loss_score_kd = bbox_pred.sum() * 0
        loss_kd = bbox_pred.sum() * 0
    return loss_kd, loss_score_kd


def official_bckd_loss(anchors: list[Tensor], cls_scores: list[Tensor], bbox_preds: list[Tensor],
                       labels: list[Tensor], label_weights: list[Tensor], soft_label: list[Tensor],
                       soft_target: list[Tensor], pos_inds_list: list[Tensor]) -> Tensor:
    """``LDHead.loss`` on one GPU (``reduce_mean`` is the identity): Σ over levels of both terms."""
    num_total_pos = sum(max(inds.numel(), 1) for inds in pos_inds_list)  # LDHead.get_targets
    num_total_samples = max(float(num_total_pos), 1.0)
    out = [official_bckd_loss_single(a, cs, bp, lb, lw, st, stg, sl, num_total_samples, C)
           for a, cs, bp, lb, lw, st, stg, sl in zip(anchors, cls_scores, bbox_preds, labels, label_weights,
                                                       STRIDES, soft_target, soft_label, strict=True)]
    return sum(kd + box for kd, box in out)


# ============================================================================ shared data
def rnd(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def level_maps(channels: int, seed: int, scale: float) -> list[Tensor]:
    return [rnd(N, channels, h, w, seed=seed + i, scale=scale) for i, (h, w) in enumerate(SIZES)]


def flat(maps: list[Tensor]) -> Tensor:
    """Per-level (N, K, H, W) maps → kdcli's (N, L, K) (torchvision's level-major, row-major order)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], 1)


def assignment() -> Tensor:
    """(N, L): ≥0 positive, −1 background, −2 ignored. Level 2 has no positive (but ignored locations);
    image 1 has one positive, on level 3; image 2 has none (mmdet still counts it as 1)."""
    g = torch.Generator().manual_seed(7)
    parts = []
    for lvl, (h, w) in enumerate(SIZES):
        m = torch.full((N, h * w), -1, dtype=torch.int64)
        m[torch.rand(N, h * w, generator=g) < 0.25] = -2
        if lvl in (0, 1):
            m[0, torch.randperm(h * w, generator=g)[:3]] = 0
        if lvl == 3:
            m[1, 0] = 0
        parts.append(m)
    return torch.cat(parts, 1)


def anchors_per_level() -> list[Tensor]:
    """mmdet ``AnchorGenerator`` (ratio 1, octave_base_scale 8, centre offset 0): (N, H·W, 4) per level."""
    out = []
    for s, (h, w) in zip(STRIDES, SIZES, strict=True):
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) * s, torch.arange(w, dtype=torch.float64) * s,
                                indexing="ij")
        half = 4.0 * s
        a = torch.stack([xs - half, ys - half, xs + half, ys + half], -1).reshape(-1, 4)
        out.append(a.expand(N, -1, -1))
    return out


def kdcli_decode() -> Callable[[Tensor], Tensor]:
    """extras["decode"]: (N, L, 4·(reg_max+1)) edge distributions → x1y1x2y2 in input pixels."""
    centres = torch.cat([official_anchor_center(a[0]) for a in anchors_per_level()])  # (L, 2), pixels
    stride = torch.cat([torch.full((h * w,), float(s), dtype=torch.float64) for s, (h, w) in zip(STRIDES, SIZES,
                                                                                                  strict=True)])
    bins = torch.arange(REG_MAX + 1, dtype=torch.float64)

    def decode(reg: Tensor) -> Tensor:
        dist = (reg.reshape(*reg.shape[:2], 4, REG_MAX + 1).softmax(-1) * bins).sum(-1) * stride[:, None]
        return torch.cat([centres - dist[..., :2], centres + dist[..., 2:]], -1)

    return decode


def bckd_case(seed: int = 0):
    """Teacher/student logits and box distributions as per-level maps, and the assignment."""
    zs, zt = level_maps(C, seed, 2.0), level_maps(C, seed + 10, 3.0)
    rs, rt = level_maps(4 * (REG_MAX + 1), seed + 20, 1.5), level_maps(4 * (REG_MAX + 1), seed + 30, 1.5)
    return zs, zt, rs, rt, assignment()


def official_targets(matched: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """mmdet targets per level: labels (background = C, positives a class), label weights (0 = ignored)."""
    labels_all = torch.where(matched >= 0, (torch.arange(matched.shape[1]) % C).expand_as(matched), C)
    weights_all = (matched != -2).double()
    counts = [h * w for h, w in SIZES]
    pos_inds_list = [(matched[i] >= 0).nonzero().squeeze(1) for i in range(N)]
    return list(labels_all.split(counts, 1)), list(weights_all.split(counts, 1)), pos_inds_list


def infos(c: int) -> dict[str, TapInfo]:
    return {"cls_logits": TapInfo("cls_logits", c, 0, "logits")}


def outputs(zs: Tensor, zt: Tensor, rs: Tensor, rt: Tensor, matched: Tensor) -> tuple[ModelOutput, ModelOutput]:
    s = ModelOutput(taps={"cls_logits": zs}, extras={
        "match": lambda targets: matched, "num_anchors_per_level": [h * w for h, w in SIZES],
        "decode": kdcli_decode(), "head": {"bbox_regression": rs}})
    t = ModelOutput(taps={"cls_logits": zt}, extras={"head": {"bbox_regression": rt}})
    return s, t


TARGETS: list[dict[str, Tensor]] = [{"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64)}] * N


def assert_close(got: Tensor, want: Tensor, what: str) -> None:
    atol = 1e-15 * float(want.detach().abs().max())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


# ============================================================================ BCKD
def test_bckd_equals_official_ld_head_over_levels_with_ignored_and_empty_levels() -> None:
    zs_maps, zt_maps, rs_maps, rt_maps, matched = bckd_case()
    labels, label_weights, pos_inds_list = official_targets(matched)
    counts = [h * w for h, w in SIZES]
    pos_per_level = [int((m >= 0).sum()) for m in matched.split(counts, 1)]
    assert pos_per_level[2] == 0 and min(pos_per_level[:2] + pos_per_level[3:]) > 0
    assert (matched == -2).any() and (matched[1] >= 0).sum() == 1 and (matched[2] < 0).all()

    off_z = [m.clone().requires_grad_() for m in zs_maps]
    off_r = [m.clone().requires_grad_() for m in rs_maps]
    official = official_bckd_loss(anchors_per_level(), off_z, off_r, labels, label_weights, zt_maps, rt_maps,
                                  pos_inds_list)

    zs, rs = flat(zs_maps).requires_grad_(), flat(rs_maps).requires_grad_()
    s, t = outputs(zs, flat(zt_maps), rs, flat(rt_maps), matched)
    m = BCKD(infos(C), infos(C), "detection", **BCKD.resolve_hparams("detection", {}))
    ours = sum(m(s, t, TARGETS).values())

    assert_close(ours, official, "loss")
    g_z, g_r = torch.autograd.grad(ours, [zs, rs])
    o = torch.autograd.grad(official, off_z + off_r, allow_unused=True)
    o = [torch.zeros_like(x) if g is None else g for g, x in zip(o, off_z + off_r, strict=True)]  # empty level
    o_z, o_r = flat(o[:len(SIZES)]), flat(o[len(SIZES):])
    assert o_z.abs().max() > 0 and o_r.abs().max() > 0
    assert_close(g_z, o_z, "grad cls_logits")
    assert_close(g_r, o_r, "grad bbox_regression")
    empty = torch.cat([torch.full((c,), lvl == 2) for lvl, c in enumerate(counts)])
    assert (g_z[:, empty] == 0).all() and (g_z[matched == -2] == 0).all()


@pytest.mark.parametrize("eps_clamped", [False, True])
def test_giou_loss_is_mmdets_with_the_clamp(eps_clamped: bool) -> None:
    if eps_clamped:  # areas of 1e-8: mmdet clamps union and hull to 1e-6 → 1 − 1e-8/1e-6 (torchvision: 1 − 1/11)
        a = torch.tensor([[0.0, 0.0, 1e-4, 1e-4]], dtype=torch.float64)
        assert giou_loss(a, a).item() == pytest.approx(0.99, rel=1e-12)
        return
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    assert giou_loss(a, b).item() == pytest.approx(1 - (1 / 7 - 2 / 9), rel=1e-15)  # I 1, U 7, hull 9
    g = torch.Generator().manual_seed(3)
    lt = torch.rand(2, 50, 2, generator=g, dtype=torch.float64) * 20
    boxes = torch.cat([lt, lt + torch.rand(2, 50, 2, generator=g, dtype=torch.float64) * 10], -1)
    p, q = boxes[0], boxes[1]
    torch.testing.assert_close(giou_loss(p[None], q[None])[0], 1 - official_bbox_overlaps_giou_aligned(p, q, 1e-6),
                               rtol=1e-15, atol=1e-15)


# ============================================================================ KD, sample_reduction=avg_factor
def official_bernoulli_kd_level(cls_score: Tensor, soft_label: Tensor, label_weights: Tensor,
                                avg_factor: float) -> Tensor:
    """A per-location Bernoulli KL (Σ over classes) passed through mmdet's ``@weighted_loss`` the way
    CrossKD's ``pred_mimicking_loss_single`` passes its ``loss_cls_kd``: every level, label weights,
    ``avg_factor`` from ``get_targets`` (Σ_images max(#pos, 1))."""

    @official_weighted_loss
    def bernoulli_kl(pred: Tensor, target: Tensor) -> Tensor:
        p, q = target.sigmoid(), pred.sigmoid()
        return (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(1)

    c = cls_score.shape[1]
    return bernoulli_kl(cls_score.permute(0, 2, 3, 1).reshape(-1, c), soft_label.permute(0, 2, 3, 1).reshape(-1, c),
                        label_weights.reshape(-1), avg_factor=avg_factor)


def test_kd_avg_factor_reduction_is_mmdets() -> None:
    zs_maps, zt_maps, _, _, matched = bckd_case(seed=40)
    _, label_weights, pos_inds_list = official_targets(matched)
    avg_factor = float(sum(max(inds.numel(), 1) for inds in pos_inds_list))  # the empty image counts 1
    off_z = [m.clone().requires_grad_() for m in zs_maps]
    official = sum(official_bernoulli_kd_level(z, t, w, avg_factor)
                   for z, t, w in zip(off_z, zt_maps, label_weights, strict=True))

    zs = flat(zs_maps).requires_grad_()
    s, t = outputs(zs, flat(zt_maps), zs, zs, matched)
    m = KD(infos(C), infos(C), "detection",
           **KD.resolve_hparams("detection", {"drop_ignored": True, "sample_reduction": "avg_factor"}))
    ours = sum(m(s, t, TARGETS).values())
    assert_close(ours, official, "loss")
    (g,) = torch.autograd.grad(ours, [zs])
    assert_close(g, flat(list(torch.autograd.grad(official, off_z))), "grad cls_logits")
    assert (g[matched == -2] == 0).all() and g[2].abs().sum() > 0  # the image without positives still counts
