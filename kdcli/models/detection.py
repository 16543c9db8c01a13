"""torchvision RetinaNet / FCOS / Faster R-CNN / Mask R-CNN as tap-producing models.

The forward runs the detector's parts explicitly (transform once, backbone body, FPN, head,
anchors, losses), so taps come out without hooks and the task losses equal
``model(images, targets)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from ..errors import ZooError
from ..zoo import ModelSpec
from .backbones import fpn_backbone, freeze_batchnorm, split_backbone
from .base import Batch, TapModel
from .taps import ModelOutput, TapInfo


def build_detector(spec: ModelSpec) -> nn.Module:
    pp = spec.preprocess
    common: dict[str, Any] = dict(
        min_size=int(pp.get("min_size", 800)),
        max_size=int(pp.get("max_size", 1333)),
        image_mean=list(pp.get("mean", (0.485, 0.456, 0.406))),
        image_std=list(pp.get("std", (0.229, 0.224, 0.225))),
    )
    lib, arch = split_backbone(spec.backbone)
    if lib == "torchvision" and arch.startswith("mobilenet"):
        if spec.architecture != "fasterrcnn":
            raise ZooError(f"{spec.name}: MobileNet backbones are available for fasterrcnn only")
        from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

        net = fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=spec.num_classes, **common
        )
        return freeze_batchnorm(net) if spec.norm == "frozen" else net
    from .mm import build_mm_detector, needs_mm

    if needs_mm(spec):  # layouts of imported mmdet checkpoints (kdcli/models/mm.py, docs/import.md)
        return build_mm_detector(spec, common)
    first = 1 if spec.architecture in ("fasterrcnn", "maskrcnn") else 2
    backbone = fpn_backbone(spec.backbone, spec.fpn_channels, spec.extra_levels, spec.norm, first)
    nc = spec.num_classes
    if spec.architecture == "retinanet":
        base = spec.anchor_sizes or [32, 64, 128, 256, 512]
        # three scales per octave and three aspect ratios, as torchvision/mmdet RetinaNet
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in base)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        return RetinaNet(backbone, nc, anchor_generator=anchors, **common)
    if spec.architecture == "fcos":
        base = spec.anchor_sizes or [8, 16, 32, 64, 128]
        anchors = AnchorGenerator(tuple((s,) for s in base), ((1.0,),) * len(base))
        return FCOS(backbone, nc, anchor_generator=anchors, **common)
    if spec.architecture == "fasterrcnn":
        return FasterRCNN(backbone, nc, **common)
    if spec.architecture == "maskrcnn":
        return MaskRCNN(backbone, nc, **common)
    raise ZooError(f"{spec.name}: unknown detection architecture '{spec.architecture}'")


def _level_name(stride: int, prefix: str) -> str:
    return f"{prefix}{int(round(math.log2(stride)))}"


def _unique(names: list[str]) -> list[str]:
    """Two outputs at one stride (MobileNetV3's last two stages) get ``a``, ``b``... suffixes."""
    out = []
    for i, n in enumerate(names):
        same = [j for j, m in enumerate(names) if m == n]
        out.append(n if len(same) == 1 else f"{n}{'abcdefgh'[same.index(i)]}")
    return out


def detector_family(net: nn.Module) -> str:
    """``fcos`` | ``retinanet`` | ``maskrcnn`` | ``fasterrcnn`` (MaskRCNN subclasses FasterRCNN: tested first)."""
    for cls, name in ((FCOS, "fcos"), (RetinaNet, "retinanet"), (MaskRCNN, "maskrcnn"), (FasterRCNN, "fasterrcnn")):
        if isinstance(net, cls):
            return name
    return ""


class DetectionModel(TapModel):
    task = "detection"
    net: RetinaNet | FCOS | FasterRCNN  # what build_detector returns (MaskRCNN is a FasterRCNN)

    def __init__(self, spec: ModelSpec, net: nn.Module) -> None:
        super().__init__(spec, net)
        self.one_stage = isinstance(net, (RetinaNet, FCOS))
        self.family = detector_family(net)
        self._names: tuple[list[str], list[str]] | None = None

    @property
    def tap_info(self) -> dict[str, TapInfo]:
        """The taps of the dry run, each tagged with the detector family (FGD picks its recipe by it)."""
        info = super().tap_info
        if any(i.family != self.family for i in info.values()):
            self._tap_info = info = {k: replace(i, family=self.family) for k, i in info.items()}
        return info

    def dry_run_size(self) -> int:
        return 256

    def preprocess(self, images: list[Tensor], targets: Any = None) -> Batch:
        orig = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        il, targets = self.net.transform(list(images), targets)
        return Batch(il.tensors, list(il.image_sizes), orig, targets, self.mean, self.std)

    def _tap_names(self, x: Tensor, stages: OrderedDict[str, Tensor], levels: dict[str, Tensor]) -> None:
        h = x.shape[-2]
        self._names = (
            _unique([_level_name(h // f.shape[-2], "c") for f in stages.values()]),
            _unique([_level_name(h // f.shape[-2], "p") for f in levels.values()]),
        )

    def _names_for(self, x: Tensor, stages: Any, levels: Any) -> tuple[list[str], list[str]]:
        if self._names is None and x.shape[-2] < self.dry_run_size():
            # a small first input (64 px: P6 and P7 are both 1x1) cannot tell strides apart;
            # the dry run at a stride-exact size names the taps instead
            _ = self.tap_info
        if self._names is None:
            # names come from strides on the first call; padded inputs keep them exact
            # because transform pads to a multiple of 32 (the coarsest backbone stride).
            self._tap_names(x, stages, levels)
        assert self._names is not None
        return self._names

    def forward(
        self, batch: Batch, need: set[str] | None = None, losses: bool = True, predict: bool = False
    ) -> ModelOutput:
        x = self.input_for(batch)
        backbone = self.net.backbone
        stages = (backbone.stages(x) if hasattr(backbone, "stages") else backbone.body(x))
        levels = backbone.fpn(stages)
        stage_names, level_names = self._names_for(x, stages, levels)
        out = ModelOutput()
        # methods that map boxes to levels (FGD) need the resized sizes inside the padded input
        out.extras.update(image_sizes=batch.image_sizes, input_shape=(int(x.shape[-2]), int(x.shape[-1])))
        out.taps.update(zip(stage_names, stages.values(), strict=True))
        out.taps.update(zip(level_names, levels.values(), strict=True))
        targets = batch.targets if losses else None
        head_needed = need is None or "cls_logits" in need or targets is not None or predict
        if not head_needed:
            return out
        feats = list(levels.values())
        if self.one_stage and need is not None and "head" not in need and targets is None and not predict:
            # a teacher read for its dense class logits only (logit KD, SAMKD's SLD): the classification
            # branch alone — no box branch, anchors or assignment; a method that reads the teacher's box
            # outputs (extras["head"]) asks for "head"
            out.taps["cls_logits"] = self.net.head.classification_head(feats)
            return out
        images = ImageList(x, batch.image_sizes)
        if self.one_stage:
            self._one_stage(out, images, feats, targets, predict, batch)
        else:
            self._two_stage(out, images, levels, targets, predict, batch)
        return out

    def _one_stage(
        self, out: ModelOutput, images: ImageList, feats: list[Tensor], targets: Any, predict: bool, batch: Batch
    ) -> None:
        net = self.net
        head = net.head(feats)
        out.taps["cls_logits"] = head["cls_logits"]
        # Anchors, matching, box coding and the task losses in float32. Under autocast torchvision's
        # AnchorGenerator takes the features' dtype: bf16 rounds coordinates past 256 px, and past 1024 px
        # stride-8 anchors get a width or height of 0 or 16 (FCOS: a positive location on a zero-height
        # anchor gives an infinite regression target and a NaN centerness loss); FCOS also decodes boxes in
        # the head's dtype. The generator reads only the shape, dtype and device of the features.
        anchors = net.anchor_generator(images, [torch.empty((), device=f.device).expand(f.shape) for f in feats])
        per_level = [f.shape[-2] * f.shape[-1] for f in feats]
        a = head["cls_logits"].shape[1] // sum(per_level)
        per_level = [n * a for n in per_level]
        out.extras.update(head=head, anchors=anchors, num_anchors_per_level=per_level)
        # the student's own assignment and box decoding, for logit methods (BCKD, DKD/NKD at positives)
        out.extras.update(match=partial(match_locations, net, anchors, [n // a for n in per_level]),
                          decode=partial(decode_boxes, net, anchors))
        head32 = {k: v.float() for k, v in head.items()}
        with torch.autocast(images.tensors.device.type, enabled=False):
            if targets is not None:
                if isinstance(net, FCOS):
                    out.losses.update(net.compute_loss(targets, head32, anchors, [n // a for n in per_level]))
                else:
                    out.losses.update(net.compute_loss(targets, head32, anchors))
            if predict:
                split_head = {k: list(v.split(per_level, dim=1)) for k, v in head32.items()}
                split_anchors = [list(t.split(per_level)) for t in anchors]
                dets = net.postprocess_detections(split_head, split_anchors, images.image_sizes)
                out.extras["detections"] = net.transform.postprocess(dets, images.image_sizes, batch.original_sizes)

    def _two_stage(
        self, out: ModelOutput, images: ImageList, levels: dict[str, Tensor], targets: Any, predict: bool,
        batch: Batch,
    ) -> None:
        net = self.net
        # RPN and RoI heads in float32 with autocast off: their anchors take the features' dtype and their
        # box coders decode in the deltas' dtype, and bf16 rounds coordinates past 256 px (zero-height
        # anchors past 1024 px), as in _one_stage. Backbone and FPN keep the autocast precision.
        levels = {k: v.float() for k, v in levels.items()}
        with torch.autocast(images.tensors.device.type, enabled=False):
            # torchvision's RPN and RoI heads compute losses in train mode and detections in eval mode
            proposals, rpn_losses = net.rpn(images, levels, targets if self.training else None)
            dets, roi_losses = net.roi_heads(levels, proposals, images.image_sizes,
                                             targets if self.training else None)
        if targets is not None and self.training:
            out.losses.update(rpn_losses)
            out.losses.update(roi_losses)
        if predict and not self.training:
            out.extras["detections"] = net.transform.postprocess(dets, images.image_sizes, batch.original_sizes)


def empty_detections(n: int, device: torch.device) -> list[dict[str, Tensor]]:
    return [
        {"boxes": torch.zeros(0, 4, device=device), "scores": torch.zeros(0, device=device),
         "labels": torch.zeros(0, dtype=torch.int64, device=device)}
        for _ in range(n)
    ]


def match_locations(net: RetinaNet | FCOS, anchors: list[Tensor], locations_per_level: list[int],
                    targets: list[dict[str, Tensor]]) -> Tensor:
    """The one-stage detector's own assignment of every anchor/location to a ground-truth box.

    Returns ``(N, L)`` int64: the matched box index (``>= 0``: positive), ``-1`` background, ``-2``
    ignored (RetinaNet only). Same rules as torchvision's ``compute_loss`` (checked in the tests):

    - RetinaNet: the model's ``proposal_matcher`` on IoU(box, anchor): positive at IoU >= 0.5 (plus
      each box's best anchors, ``allow_low_quality_matches``), background below 0.4, ignored between.
    - FCOS: a location is positive for a box when its centre lies inside the box, within
      ``center_sampling_radius`` x stride of the box centre (per axis), and its largest ltrb distance
      lies in the level's range (4s, 8s) (first level from 0, last level unbounded); the box of
      smallest area wins. Everything else is background; nothing is ignored.
    """
    out = []
    for a, t in zip(anchors, targets, strict=True):
        boxes = t["boxes"]
        if boxes.numel() == 0:
            out.append(torch.full((a.shape[0],), -1, dtype=torch.int64, device=a.device))
        elif isinstance(net, FCOS):
            out.append(_fcos_match(a, boxes, locations_per_level, float(net.center_sampling_radius)))
        else:
            out.append(net.proposal_matcher(box_iou(boxes, a)))
    return torch.stack(out)


def _fcos_match(anchors: Tensor, boxes: Tensor, per_level: list[int], radius: float) -> Tensor:
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # (L, 2)
    size = anchors[:, 2] - anchors[:, 0]  # the level's stride x anchor scale (torchvision's rule)
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2)
    near = (centres[:, None] - box_centres[None]).abs().amax(-1) < radius * size[:, None]
    ltrb = torch.cat([centres[:, None] - boxes[None, :, :2], boxes[None, :, 2:] - centres[:, None]], -1)
    inside = ltrb.amin(-1) > 0
    lo, hi = size * 4, size * 8
    lo[: per_level[0]] = 0
    hi[-per_level[-1]:] = float("inf")
    reach = ltrb.amax(-1)
    ok = near & inside & (reach > lo[:, None]) & (reach < hi[:, None])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    score = ok.float() * (1e8 - area[None])  # smallest box wins among the matches
    best, idx = score.max(1)
    return torch.where(best < 1e-5, torch.full_like(idx, -1), idx)


def decode_boxes(net: RetinaNet | FCOS, anchors: list[Tensor], regression: Tensor) -> Tensor:
    """``(N, L, 4)`` head regression → ``(N, L, 4)`` x1y1x2y2 boxes in the (resized) input frame, float32.

    RetinaNet: anchor deltas (``BoxCoder`` weights 1, dw/dh clamped at log(1000/16)); FCOS: ltrb
    distances normalised by the anchor size (``BoxLinearCoder``)."""
    reg = regression if regression.dtype == torch.float64 else regression.float()
    ref = torch.stack(anchors).to(reg)
    if isinstance(net, FCOS):
        return net.box_coder.decode(reg, ref)
    return net.box_coder.decode_single(reg.reshape(-1, 4), ref.reshape(-1, 4)).view_as(reg)

