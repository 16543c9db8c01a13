"""torchvision models laid out like mmdetection / mmsegmentation ones, so imported checkpoints
(:mod:`kdcli.convert`) compute what they computed in their home framework.

Selected by the zoo spec (``style``, ``resnet_style``, ``extra_levels``, ``fcos_*``; docs/import.md):

- **Anchors** (``style = "mmdet"``): mmdet's ``AnchorGenerator`` keeps exact base sizes
  (``4·2^(i/3)·stride``, no rounding: torchvision truncates the octave scales to integers and rounds
  the base anchors) and places them at fixed strides (torchvision divides the padded image size by
  the grid size, which is not the stride for P6/P7 on most sizes). FCOS points sit at cell centres,
  ``(i + 0.5)·stride`` (mmdet's ``MlvlPointGenerator``, offset 0.5), where torchvision puts them at
  ``i·stride``.
- **P6/P7** (``extra_levels = "p6p7-from-c5-norelu"``): mmdet RetinaNet's FPN (``add_extra_convs=
  'on_input'``, ``relu_before_extra_convs=False``) computes P6 from C5 and P7 from P6 *without* the
  ReLU torchvision's ``LastLevelP6P7`` applies.
- **FCOS head** (``style = "mmdet"``): a learnable scale per level multiplies the regression
  (mmcv ``Scale``); ``fcos_regression = "relu"`` (``norm_on_bbox=True``: distances in strides) or
  ``"exp"`` (``norm_on_bbox=False``: ``exp(s·x)`` pixels, divided here by the stride because
  torchvision's ``BoxLinearCoder`` multiplies by the anchor size); ``fcos_centerness = "cls"`` puts
  centerness on the classification tower (``centerness_on_reg=False``).
- **RoIAlign** (``style = "mmdet"`` Faster R-CNN): mmcv's ``RoIAlign(7, sampling_ratio=0,
  aligned=True)`` instead of torchvision's ``sampling_ratio=2, aligned=False``.
- **Caffe-style ResNet** (``resnet_style = "caffe"``): the stride of a downsampling bottleneck sits
  in its first 1x1 conv, not the 3x3 (mmdet ``style='caffe'``; the BGR/0-255 input of those
  checkpoints is folded into the first conv and ``preprocess`` by the converter).
- **Decode heads** (``style = "mmseg"`` DeepLabV3, and ``pspnet``): mmseg's ``ASPPHead`` (image
  pooling first, four ASPP branches, one 3x3 bottleneck, no 1x1 projection) and ``PSPHead``
  (pyramid pooling 1/2/3/6 + 3x3 bottleneck), each followed by dropout and a 1x1 classifier; the
  auxiliary head is torchvision's ``FCNHead``, which has mmseg ``FCNHead``'s layout.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.segmentation._utils import _SimpleSegmentationModel
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..errors import ZooError
from ..zoo import ModelSpec
from .backbones import (
    TimmDilated,
    fc_in_features,
    fpn_backbone,
    freeze_batchnorm,
    split_backbone,
    torchvision_classifier,
)

STYLES = ("torchvision", "mmdet", "mmseg")


def check_spec(spec: ModelSpec) -> None:
    bad = [(f, v, ok) for f, v, ok in (
        ("style", spec.style, STYLES), ("resnet_style", spec.resnet_style, ("pytorch", "caffe")),
        ("fcos_centerness", spec.fcos_centerness, ("reg", "cls")),
        ("fcos_regression", spec.fcos_regression, ("relu", "exp"))) if v not in ok]
    if bad:
        f, v, ok = bad[0]
        raise ZooError(f"{spec.name}: {f} '{v}' (expected {', '.join(ok)})")


def needs_mm(spec: ModelSpec) -> bool:
    """Whether the spec asks for anything :func:`build_detector` in detection.py does not build."""
    return (spec.style != "torchvision" or spec.resnet_style != "pytorch" or spec.extra_levels.endswith("-norelu")
            or spec.fcos_centerness != "reg" or spec.fcos_regression != "relu")


# -- detection parts ------------------------------------------------------------------------------
class ExactAnchorGenerator(AnchorGenerator):
    """mmdet's anchors: exact base sizes (no rounding), fixed strides, centres at ``(i + offset)·stride``."""

    def __init__(self, sizes: tuple[tuple[float, ...], ...], aspect_ratios: tuple[tuple[float, ...], ...],
                 strides: tuple[int, ...], offset: float = 0.0) -> None:
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)

    def generate_anchors(self, scales: Any, aspect_ratios: Any, dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        # ratio-major, scale-minor: the anchor order of both mmdet and torchvision
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ZooError(f"anchors: {len(feature_maps)} feature maps for {len(self.strides)} strides")
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        self.set_cell_anchors(dtype, device)
        per_level = []
        for fmap, stride, base in zip(feature_maps, self.strides, self.cell_anchors, strict=True):
            h, w = fmap.shape[-2:]
            xs = (torch.arange(w, device=device, dtype=dtype) + self.offset) * stride
            ys = (torch.arange(h, device=device, dtype=dtype) + self.offset) * stride
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((sx.reshape(-1), sy.reshape(-1)) * 2, dim=1)
            per_level.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        all_levels = torch.cat(per_level)
        return [all_levels for _ in image_list.image_sizes]


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """P6 = conv(C5 or P5), P7 = conv(P6): mmdet's extra convs with ``relu_before_extra_convs=False``."""

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        x = p[-1] if self.use_P5 else c[-1]
        p6 = self.p6(x)
        p7 = self.p7(p6)
        return p + [p6, p7], names + ["p6", "p7"]


class ScaledFCOSHead(FCOSHead):
    """torchvision's FCOS head (same key names) plus mmdet's per-level regression scales and its
    centerness/regression variants. Outputs are in torchvision's units: distances divided by the
    anchor size (= the stride here)."""

    def __init__(self, in_channels: int, num_classes: int, strides: tuple[int, ...], centerness: str = "reg",
                 regression: str = "relu", num_convs: int = 4) -> None:
        super().__init__(in_channels, 1, num_classes, num_convs)
        self.scales = nn.Parameter(torch.ones(len(strides)))
        self.strides = tuple(int(s) for s in strides)
        self.centerness = centerness
        self.regression = regression

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        cls_h, reg_h = self.classification_head, self.regression_head
        outs: dict[str, list[Tensor]] = {"cls_logits": [], "bbox_regression": [], "bbox_ctrness": []}
        for i, f in enumerate(x):
            cf, rf = cls_h.conv(f), reg_h.conv(f)
            raw = reg_h.bbox_reg(rf).float() * self.scales[i].float()  # float32 as mmdet: exp overflows in fp16
            reg = F.relu(raw) if self.regression == "relu" else torch.exp(raw) / self.strides[i]
            ctr = reg_h.bbox_ctrness(rf if self.centerness == "reg" else cf)
            for key, t in (("cls_logits", cls_h.cls_logits(cf)), ("bbox_regression", reg), ("bbox_ctrness", ctr)):
                n, c, h, w = t.shape
                outs[key].append(t.permute(0, 2, 3, 1).reshape(n, h * w, c))
        return {k: torch.cat(v, dim=1) for k, v in outs.items()}


class AlignedRoIAlign(MultiScaleRoIAlign):
    """Multi-level RoIAlign with mmcv's settings: ``aligned=True`` (pixel centres at +0.5) and an
    adaptive number of samples per bin (``sampling_ratio=0``). Level mapping is torchvision's
    ``LevelMapper``, which equals mmdet's ``floor(log2(sqrt(wh) / 56))`` clamped to the 4 levels."""

    # set by torchvision's MultiScaleRoIAlign (None until the first call)
    scales: list[float] | None
    map_levels: Callable[[list[Tensor]], Tensor] | None

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales, strict=True)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out


def caffe_strides(resnet: nn.Module) -> int:
    """Move each downsampling bottleneck's stride from its 3x3 conv to its first 1x1 conv (mmdet's
    caffe style). Returns the number of blocks changed."""
    changed = 0
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(resnet, name, None)
        if layer is None:
            continue
        for block in layer:
            conv1, conv2 = getattr(block, "conv1", None), getattr(block, "conv2", None)
            if conv1 is None or conv2 is None or not hasattr(block, "conv3"):
                raise ZooError("resnet_style 'caffe': only bottleneck ResNets (50/101/152) have a caffe style")
            if conv2.stride != (1, 1):
                conv1.stride, conv2.stride = conv2.stride, (1, 1)
                changed += 1
    return changed


def _levels(first_stage: int) -> tuple[int, ...]:
    return tuple(2 ** (first_stage + 1 + i) for i in range(5))  # P3..P7 (8..128) or P2..P6 (4..64)


def build_mm_detector(spec: ModelSpec, common: dict[str, Any]) -> nn.Module:
    """RetinaNet / FCOS / Faster R-CNN with the mmdet-compatible parts the spec asks for."""
    check_spec(spec)
    lib, _ = split_backbone(spec.backbone)
    two_stage = spec.architecture in ("fasterrcnn", "maskrcnn")
    first = 1 if two_stage else 2
    extra = spec.extra_levels.removesuffix("-norelu")
    backbone = fpn_backbone(spec.backbone, spec.fpn_channels, extra, spec.norm, first)
    if spec.extra_levels.endswith("-norelu"):
        old = backbone.fpn.extra_blocks
        if not isinstance(old, LastLevelP6P7):
            raise ZooError(f"{spec.name}: extra_levels '{spec.extra_levels}' needs p6p7 levels")
        backbone.fpn.extra_blocks = LastLevelP6P7NoReLU(old.p6.in_channels, old.p6.out_channels)
    if spec.resnet_style == "caffe":
        if lib != "torchvision":
            raise ZooError(f"{spec.name}: resnet_style 'caffe' needs a torchvision ResNet backbone")
        caffe_strides(backbone.body)
    mmdet = spec.style == "mmdet"
    strides = _levels(first)
    nc = spec.num_classes
    if spec.architecture == "retinanet":
        base = spec.anchor_sizes or [32, 64, 128, 256, 512]
        octave = [2 ** (i / 3) for i in range(3)]
        if mmdet:
            sizes = tuple(tuple(s * o for o in octave) for s in base)
            anchors: AnchorGenerator = ExactAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5, strides)
            # mmdet's test_cfg: max_per_img 100 (torchvision's RetinaNet keeps 300)
            common = {**common, "detections_per_img": 100}
        else:
            sizes = tuple(tuple(int(s * o) for o in octave) for s in base)
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
        return RetinaNet(backbone, nc, anchor_generator=anchors, **common)
    if spec.architecture == "fcos":
        base = spec.anchor_sizes or list(strides)
        if mmdet:
            if list(base) != list(strides):
                raise ZooError(f"{spec.name}: style mmdet FCOS needs anchor_sizes equal to the strides {list(strides)}")
            anchors = ExactAnchorGenerator(tuple((s,) for s in base), ((1.0,),) * 5, strides, offset=0.5)
            head = ScaledFCOSHead(backbone.out_channels, nc, strides, spec.fcos_centerness, spec.fcos_regression)
            # mmdet test_cfg: nms 0.5, 100 per image; its score_thr 0.05 applies to the class score
            # alone, torchvision's to sqrt(class x centerness), see docs/import.md
            return FCOS(backbone, nc, anchor_generator=anchors, head=head, score_thresh=0.05, nms_thresh=0.5,
                        detections_per_img=100, **common)
        if spec.fcos_centerness != "reg" or spec.fcos_regression != "relu":
            raise ZooError(f"{spec.name}: fcos_centerness/fcos_regression variants need style 'mmdet'")
        anchors = AnchorGenerator(tuple((s,) for s in base), ((1.0,),) * len(base))
        return FCOS(backbone, nc, anchor_generator=anchors, **common)
    if spec.architecture == "fasterrcnn":
        kw: dict[str, Any] = {}
        if mmdet:
            kw["rpn_anchor_generator"] = ExactAnchorGenerator(tuple((s,) for s in (32, 64, 128, 256, 512)),
                                                              ((0.5, 1.0, 2.0),) * 5, strides)
            kw["box_roi_pool"] = AlignedRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=0)
        return FasterRCNN(backbone, nc, **kw, **common)
    raise ZooError(f"{spec.name}: style '{spec.style}' is available for retinanet, fcos and fasterrcnn")


# -- segmentation parts ---------------------------------------------------------------------------
class ConvModule(nn.Module):
    """conv (no bias) → BN → ReLU, with mmcv ``ConvModule``'s attribute names (``conv``, ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1) -> None:
        super().__init__()
        pad = 0 if kernel == 1 else dilation
        self.conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class ASPPBody(nn.Module):
    """mmseg ``ASPPHead`` up to its bottleneck (Chen et al. 2017, DeepLabV3 Sec. 3.3): concat(image pool,
    1x1, three dilated 3x3) → 3x3 conv."""

    def __init__(self, cin: int, ch: int, dilations: tuple[int, ...] = (1, 12, 24, 36)) -> None:
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cin, ch, 1))
        self.aspp_modules = nn.ModuleList(ConvModule(cin, ch, 1 if d == 1 else 3, d) for d in dilations)
        self.bottleneck = ConvModule((len(dilations) + 1) * ch, ch, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.bottleneck(torch.cat([pooled, *(m(x) for m in self.aspp_modules)], dim=1))


class PSPBody(nn.Module):
    """mmseg ``PSPHead`` up to its bottleneck (Zhao et al. 2017, PSPNet Sec. 3.2): concat(x, pooled to
    1/2/3/6 bins → 1x1 conv → upsampled) → 3x3 conv."""

    def __init__(self, cin: int, ch: int, pool_scales: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(cin, ch, 1))
                                         for s in pool_scales)
        self.bottleneck = ConvModule(cin + len(pool_scales) * ch, ch, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pyramid = [F.interpolate(m(x), size=size, mode="bilinear", align_corners=False) for m in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pyramid], dim=1))


class MMSegBackbone(nn.Module):
    """A dilated ResNet returning ``{"aux": C4, "out": C5}``: torchvision or timm (``resnet50c``/
    ``resnet101c`` are mmseg's ResNetV1c: 3-conv deep stem)."""

    def __init__(self, backbone: str, output_stride: int) -> None:
        super().__init__()
        lib, arch = split_backbone(backbone)
        if lib == "timm":
            self.body: nn.Module = TimmDilated(arch, output_stride)
            self.channels = list(self.body.channels)
        else:
            dil = [False, output_stride <= 16, output_stride <= 8]
            resnet = torchvision_classifier(arch, replace_stride_with_dilation=dil)
            c5 = fc_in_features(resnet)
            self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "out", "layer3": "aux"})
            self.channels = [c5 // 2, c5]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return OrderedDict(self.body(x))


def build_mmseg_segmenter(spec: ModelSpec) -> nn.Module:
    """DeepLabV3 (mmseg ASPPHead) or PSPNet with an FCN auxiliary head on C4."""
    check_spec(spec)
    if spec.style == "mmdet":
        raise ZooError(f"{spec.name}: style 'mmdet' is for detectors; segmenters take 'torchvision' or 'mmseg'")
    if spec.architecture not in ("deeplabv3", "pspnet"):
        raise ZooError(f"{spec.name}: style 'mmseg' is available for deeplabv3 and pspnet")
    backbone = MMSegBackbone(spec.backbone, spec.output_stride)
    c4, c5 = backbone.channels
    ch = spec.head_channels or 512
    body: nn.Module = ASPPBody(c5, ch) if spec.architecture == "deeplabv3" else PSPBody(c5, ch)
    head = nn.Sequential(body, nn.Dropout2d(0.1), nn.Conv2d(ch, spec.num_classes, 1))
    net = _SimpleSegmentationModel(backbone, head, FCNHead(c4, spec.num_classes))
    return freeze_batchnorm(net) if spec.norm == "frozen" else net


__all__ = ["AlignedRoIAlign", "ASPPBody", "ConvModule", "ExactAnchorGenerator", "LastLevelP6P7NoReLU", "PSPBody",
           "ScaledFCOSHead", "build_mm_detector", "build_mmseg_segmenter", "caffe_strides", "check_spec",
           "needs_mm"]
