"""mmdetection RetinaNet / FCOS / Faster R-CNN (ResNet + FPN) → kdcli's torchvision detectors.

Key layouts (mmdet 2.x and 3.x share them; read from mmdet's ``ResNet``, ``FPN``, ``RetinaHead``,
``FCOSHead``/``AnchorFreeHead``, ``RPNHead`` and ``Shared2FCBBoxHead``):

- ``backbone.*``: torchvision's ResNet names → ``backbone.body.*``.
- ``neck.lateral_convs.{i}.conv`` → ``backbone.fpn.inner_blocks.{i}.0``; ``neck.fpn_convs.{i}.conv``
  → ``layer_blocks.{i}.0`` for the backbone levels, then ``extra_blocks.p6`` / ``p7``. A P6 conv
  with C5's input width is mmdet's ``add_extra_convs='on_input'``, with the FPN width
  ``'on_output'``; ``relu_before_extra_convs`` (from the checkpoint's config, else the mmdet
  default of the architecture) picks ``p6p7-from-*`` or ``p6p7-from-*-norelu``.
- RetinaNet: ``bbox_head.{cls,reg}_convs.{i}.conv`` → ``head.{classification,regression}_head.conv.{i}.0``;
  ``retina_cls`` → ``cls_logits``, ``retina_reg`` → ``bbox_reg`` (same anchor-major layout).
- FCOS: ``{cls,reg}_convs.{i}.conv`` / ``.gn`` → ``conv.{3i}`` / ``conv.{3i+1}`` (mmdet's convs have
  no bias under GroupNorm: zeros); ``conv_cls|fcos_cls``, ``conv_reg|fcos_reg``,
  ``conv_centerness|fcos_centerness``; ``scales.{i}.scale`` → ``head.scales[i]``.
- Faster R-CNN: ``rpn_head.rpn_conv/rpn_cls/rpn_reg`` → ``rpn.head.conv.0.0/cls_logits/bbox_pred``;
  ``roi_head.bbox_head.shared_fcs.0/1`` → ``roi_heads.box_head.fc6/fc7``; ``fc_cls`` (background
  last) → ``cls_score`` (background first); ``fc_reg`` (4 per class, or 4 class-agnostic, copied to
  every class) → ``bbox_pred``. mmdet's box coder stds (0.1, 0.1, 0.2, 0.2) are torchvision's
  weights (10, 10, 5, 5).

Class slots: mmdet class c is kdcli label c + 1 (background 0), or COCO category slot with
``classes="coco"`` (torchvision's 91-slot layout); see :func:`kdcli.convert.class_slots`.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ..errors import ZooError
from .common import KeyMap, map_resnet, slot_rows


def _count(src: dict[str, Tensor], pattern: str) -> int:
    return len({m.group(1) for k in src if (m := re.match(pattern, k))})


def map_fpn(m: KeyMap, relu_before_extra: bool) -> tuple[str, int]:
    """mmdet FPN → torchvision FPN. Returns (extra_levels, number of backbone levels)."""
    n_lat = _count(m.src, r"neck\.lateral_convs\.(\d+)\.")
    n_out = _count(m.src, r"neck\.fpn_convs\.(\d+)\.")
    if n_lat == 0:
        raise ZooError(f"{m.where}: no neck.lateral_convs.* keys: not an FPN detector")
    for i in range(n_lat):
        m.conv(f"neck.lateral_convs.{i}.conv", f"backbone.fpn.inner_blocks.{i}.0")
        m.conv(f"neck.fpn_convs.{i}.conv", f"backbone.fpn.layer_blocks.{i}.0")
    if n_out == n_lat:
        return "pool", n_lat  # num_outs 5 without extra convs: max-pooled P6 (R-CNN)
    if n_out != n_lat + 2:
        raise ZooError(f"{m.where}: {n_out - n_lat} extra FPN convs; kdcli supports P6+P7 (2) or none")
    p6 = m.src[f"neck.fpn_convs.{n_lat}.conv.weight"]
    fpn_width = m.src["neck.lateral_convs.0.conv.weight"].shape[0]
    source = "p5" if p6.shape[1] == fpn_width else "c5"
    m.conv(f"neck.fpn_convs.{n_lat}.conv", "backbone.fpn.extra_blocks.p6")
    m.conv(f"neck.fpn_convs.{n_lat + 1}.conv", "backbone.fpn.extra_blocks.p7")
    return f"p6p7-from-{source}" + ("" if relu_before_extra else "-norelu"), n_lat


def map_retina_head(m: KeyMap, slots: list[int], num_slots: int) -> int:
    n = _count(m.src, r"bbox_head\.cls_convs\.(\d+)\.")
    if n != 4 or _count(m.src, r"bbox_head\.reg_convs\.(\d+)\.") != 4:
        raise ZooError(f"{m.where}: RetinaHead with {n} stacked convs; torchvision's RetinaNet head has 4")
    if any(k.startswith("bbox_head.cls_convs.0.gn") or k.startswith("bbox_head.cls_convs.0.bn") for k in m.src):
        raise ZooError(f"{m.where}: a RetinaHead with normalisation layers is not supported "
                       "(torchvision's v1 head has none)")
    for i in range(4):
        m.conv(f"bbox_head.cls_convs.{i}.conv", f"head.classification_head.conv.{i}.0")
        m.conv(f"bbox_head.reg_convs.{i}.conv", f"head.regression_head.conv.{i}.0")
    reg = m.take("bbox_head.retina_reg.weight")
    anchors = reg.shape[0] // 4
    if anchors != 9:
        raise ZooError(f"{m.where}: {anchors} anchors per location; kdcli's RetinaNet has 9 (3 scales x 3 ratios)")
    m.conv("bbox_head.retina_reg", "head.regression_head.bbox_reg")
    w, b = m.take("bbox_head.retina_cls.weight"), m.take("bbox_head.retina_cls.bias")
    w, b = slot_rows(w, b, anchors, w.shape[0] // anchors, slots, num_slots)
    m.put("head.classification_head.cls_logits.weight", w, "bbox_head.retina_cls.weight")
    m.put("head.classification_head.cls_logits.bias", b, "bbox_head.retina_cls.bias")
    return anchors


def retina_classes(src: dict[str, Tensor]) -> int:
    return src["bbox_head.retina_cls.weight"].shape[0] // (src["bbox_head.retina_reg.weight"].shape[0] // 4)


def _fcos_name(src: dict[str, Tensor], kind: str) -> str:
    for name in (f"bbox_head.conv_{kind}", f"bbox_head.fcos_{kind}"):  # fcos_* before mmdet 2.4's rename
        if f"{name}.weight" in src:
            return name
    raise ZooError(f"missing bbox_head.conv_{kind}: not an mmdet FCOS checkpoint")


def fcos_classes(src: dict[str, Tensor]) -> int:
    return src[f"{_fcos_name(src, 'cls')}.weight"].shape[0]


def map_fcos_head(m: KeyMap, slots: list[int], num_slots: int) -> None:
    import torch

    n = _count(m.src, r"bbox_head\.cls_convs\.(\d+)\.")
    if n != 4:
        raise ZooError(f"{m.where}: FCOS head with {n} stacked convs; torchvision's has 4")
    if not m.has("bbox_head.cls_convs.0.gn.weight"):
        raise ZooError(f"{m.where}: an FCOS head without GroupNorm; torchvision's FCOS head has GroupNorm(32)")
    if any(".conv_offset" in k for k in m.src if k.startswith("bbox_head.")):
        raise ZooError(f"{m.where}: deformable convs in the FCOS head (dcn_on_last_conv) are not supported")
    for branch, dst in (("cls", "classification_head"), ("reg", "regression_head")):
        for i in range(4):
            src = f"bbox_head.{branch}_convs.{i}"
            w = m.take(f"{src}.conv.weight")
            m.put(f"head.{dst}.conv.{3 * i}.weight", w, f"{src}.conv.weight")
            if m.has(f"{src}.conv.bias"):
                m.copy(f"{src}.conv.bias", f"head.{dst}.conv.{3 * i}.bias")
            else:  # mmdet's conv_bias='auto': no bias before GroupNorm; zero is the same function
                m.put(f"head.{dst}.conv.{3 * i}.bias", w.new_zeros(w.shape[0]), f"{src}.conv.weight")
            m.norm(f"{src}.gn", f"head.{dst}.conv.{3 * i + 1}")
    cls = _fcos_name(m.src, "cls")
    w, b = slot_rows(m.take(f"{cls}.weight"), m.take(f"{cls}.bias"), 1, m.src[f"{cls}.weight"].shape[0], slots,
                     num_slots)
    m.put("head.classification_head.cls_logits.weight", w, f"{cls}.weight")
    m.put("head.classification_head.cls_logits.bias", b, f"{cls}.bias")
    m.conv(_fcos_name(m.src, "reg"), "head.regression_head.bbox_reg")
    m.conv(_fcos_name(m.src, "centerness"), "head.regression_head.bbox_ctrness")
    n_scales = _count(m.src, r"bbox_head\.scales\.(\d+)\.")
    if n_scales != 5:
        raise ZooError(f"{m.where}: {n_scales} FCOS scales; kdcli's FCOS has 5 levels (P3-P7)")
    scales = torch.stack([m.take(f"bbox_head.scales.{i}.scale").reshape(()) for i in range(5)])
    m.put("head.scales", scales, "bbox_head.scales.*.scale")


def faster_classes(src: dict[str, Tensor]) -> int:
    return src["roi_head.bbox_head.fc_cls.weight"].shape[0] - 1  # softmax over classes + background (last)


def map_faster_heads(m: KeyMap, slots: list[int], num_slots: int) -> None:
    import torch

    if m.has("rpn_head.rpn_conv.0.conv.weight"):
        raise ZooError(f"{m.where}: an RPN head with several convs; torchvision's RPN head has one")
    m.conv("rpn_head.rpn_conv", "rpn.head.conv.0.0")
    m.conv("rpn_head.rpn_cls", "rpn.head.cls_logits")
    m.conv("rpn_head.rpn_reg", "rpn.head.bbox_pred")
    if m.src["rpn_head.rpn_cls.weight"].shape[0] != 3:
        raise ZooError(f"{m.where}: rpn_cls has {m.src['rpn_head.rpn_cls.weight'].shape[0]} outputs; kdcli's RPN "
                       "has 3 anchors per location with a sigmoid (mmdet use_sigmoid=True)")
    n_fcs = _count(m.src, r"roi_head\.bbox_head\.shared_fcs\.(\d+)\.")
    if n_fcs != 2 or m.has("roi_head.bbox_head.shared_convs.0.conv.weight"):
        raise ZooError(f"{m.where}: only Shared2FCBBoxHead (two shared fc layers) maps onto torchvision's TwoMLPHead")
    m.conv("roi_head.bbox_head.shared_fcs.0", "roi_heads.box_head.fc6")
    m.conv("roi_head.bbox_head.shared_fcs.1", "roi_heads.box_head.fc7")
    cw, cb = m.take("roi_head.bbox_head.fc_cls.weight"), m.take("roi_head.bbox_head.fc_cls.bias")
    k = cw.shape[0] - 1
    # mmdet: classes 0..K-1 then background K; torchvision: background 0
    cw = torch.cat([cw[k:], cw[:k]])
    cb = torch.cat([cb[k:], cb[:k]])
    w, b = slot_rows(cw, cb, 1, k + 1, [0] + list(slots), num_slots)
    m.put("roi_heads.box_predictor.cls_score.weight", w, "roi_head.bbox_head.fc_cls.weight")
    m.put("roi_heads.box_predictor.cls_score.bias", b, "roi_head.bbox_head.fc_cls.bias")
    rw, rb = m.take("roi_head.bbox_head.fc_reg.weight"), m.take("roi_head.bbox_head.fc_reg.bias")
    if rw.shape[0] == 4:  # reg_class_agnostic: the same deltas for every class
        rw, rb = rw.repeat(k, 1), rb.repeat(k)
    if rw.shape[0] != 4 * k:
        raise ZooError(f"{m.where}: fc_reg has {rw.shape[0]} outputs for {k} classes")
    # per class 4 deltas; the background slot (and unused slots) regress nothing
    w4, b4 = rw.view(k, 4, -1), rb.view(k, 4)
    outw = rw.new_zeros((num_slots, 4, rw.shape[1]))
    outb = rb.new_zeros((num_slots, 4))
    idx = torch.as_tensor(slots)
    outw[idx], outb[idx] = w4, b4
    m.put("roi_heads.box_predictor.bbox_pred.weight", outw.reshape(num_slots * 4, -1),
          "roi_head.bbox_head.fc_reg.weight")
    m.put("roi_heads.box_predictor.bbox_pred.bias", outb.reshape(-1), "roi_head.bbox_head.fc_reg.bias")


def src_classes(src: dict[str, Tensor], arch: str) -> int:
    fn = {"retinanet": retina_classes, "fcos": fcos_classes, "fasterrcnn": faster_classes}[arch]
    try:
        return fn(src)
    except KeyError as err:
        raise ZooError(f"missing {err.args[0]}: not an mmdet {arch} checkpoint (is --arch right?)") from None


def map_detector(m: KeyMap, arch: str, slots: list[int], num_slots: int, relu_before_extra: bool) -> dict[str, Any]:
    """Everything of an mmdet detector; returns the spec fields the layout implies."""
    map_resnet(m, "backbone.", "backbone.body.")
    extra, n_levels = map_fpn(m, relu_before_extra)
    if arch == "retinanet":
        if n_levels != 3 or extra == "pool":
            raise ZooError(f"{m.where}: RetinaNet needs an FPN over C3-C5 plus P6/P7 (start_level=1, num_outs=5)")
        map_retina_head(m, slots, num_slots)
    elif arch == "fcos":
        if n_levels != 3 or extra == "pool":
            raise ZooError(f"{m.where}: FCOS needs an FPN over C3-C5 plus P6/P7 (start_level=1, num_outs=5)")
        map_fcos_head(m, slots, num_slots)
    elif arch == "fasterrcnn":
        if n_levels != 4 or extra != "pool":
            raise ZooError(f"{m.where}: Faster R-CNN needs an FPN over C2-C5 with a max-pooled P6 (num_outs=5)")
        map_faster_heads(m, slots, num_slots)
    return {"extra_levels": extra}
