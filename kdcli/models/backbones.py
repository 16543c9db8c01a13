"""Backbones: torchvision ResNet/MobileNet and timm ``features_only`` models behind an FPN or a
dilated segmentation head. Always built without weights (kdcli loads weights itself)."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from ..errors import ZooError

if TYPE_CHECKING:  # timm is imported lazily (slow import)
    from timm.models import FeatureInfo


def split_backbone(name: str) -> tuple[str, str]:
    lib, _, arch = name.partition(":")
    if lib not in ("torchvision", "timm") or not arch:
        raise ZooError(f"backbone '{name}': expected 'torchvision:<name>' or 'timm:<name>'")
    return lib, arch


def torchvision_classifier(arch: str, **kw: object) -> nn.Module:
    import torchvision.models as tvm

    fn = getattr(tvm, arch, None)
    if fn is None:
        raise ZooError(f"backbone 'torchvision:{arch}': torchvision has no such model")
    return fn(weights=None, **kw)


def fc_in_features(net: nn.Module) -> int:
    """The width of a torchvision classifier's ``fc`` input: a ResNet's last-stage channels."""
    fc = net.get_submodule("fc")
    assert isinstance(fc, nn.Linear)
    return fc.in_features


def feature_channels(body: nn.Module) -> list[int]:
    """The output channels of a timm ``features_only`` model, one per returned stage."""
    return list(cast("FeatureInfo", body.feature_info).channels())


def timm_features(arch: str, out_indices: tuple[int, ...], **kw: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, features_only=True, out_indices=out_indices, **kw)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ZooError(f"backbone 'timm:{arch}': {err}") from None


class TimmWithFPN(nn.Module):
    """timm ``features_only`` body + torchvision FPN, with the ``body``/``fpn``/``out_channels``
    attributes torchvision's detectors expect from ``BackboneWithFPN``."""

    def __init__(self, body: nn.Module, out_channels: int, extra_blocks: ExtraFPNBlock | None) -> None:
        super().__init__()
        self.body = body
        in_channels = feature_channels(body)
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))

    def stages(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict((str(i), f) for i, f in enumerate(self.body(x)))


def fpn_backbone(
    backbone: str, fpn_channels: int, extra_levels: str, norm: str, first_stage: int
) -> BackboneWithFPN | TimmWithFPN:
    """ResNet/timm body + FPN. ``first_stage`` 2 → C3..C5 (RetinaNet, FCOS), 1 → C2..C5 (R-CNN)."""
    lib, arch = split_backbone(backbone)
    stages = list(range(first_stage, 5))
    if lib == "torchvision":
        norm_layer = misc_ops.FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
        body = torchvision_classifier(arch, norm_layer=norm_layer)
        if not hasattr(body, "layer4"):
            raise ZooError(f"backbone '{backbone}': FPN detectors here take a ResNet-style backbone")
        widths = [getattr(body, f"layer{i}")[-1] for i in stages]
        in_channels = [_block_out(b) for b in widths]
    else:
        body = timm_features(arch, tuple(stages))
        if norm == "frozen":
            freeze_batchnorm(body)
        in_channels = feature_channels(body)
    c5 = in_channels[-1]
    extra: ExtraFPNBlock
    if extra_levels == "p6p7-from-p5":
        extra = LastLevelP6P7(fpn_channels, fpn_channels)
    elif extra_levels == "p6p7-from-c5":
        extra = LastLevelP6P7(c5, fpn_channels)
    elif extra_levels == "pool":
        extra = LastLevelMaxPool()
    else:
        raise ZooError(f"extra_levels '{extra_levels}': expected p6p7-from-p5, p6p7-from-c5 or pool")
    if lib == "torchvision":
        return_layers = {f"layer{s}": str(i) for i, s in enumerate(stages)}
        return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra)
    return TimmWithFPN(body, fpn_channels, extra)


def _block_out(block: nn.Module) -> int:
    last_bn = [m for m in block.modules() if isinstance(m, (nn.BatchNorm2d, misc_ops.FrozenBatchNorm2d))][-1]
    return int(last_bn.weight.shape[0])


class TimmDilated(nn.Module):
    """timm body with output stride 8/16 returning ``{"aux": C4, "out": C5}`` like torchvision's
    ``IntermediateLayerGetter`` in its segmentation models."""

    def __init__(self, arch: str, output_stride: int) -> None:
        super().__init__()
        self.body = timm_features(arch, (3, 4), output_stride=output_stride)
        self.channels = feature_channels(self.body)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        c4, c5 = self.body(x)
        return OrderedDict([("aux", c4), ("out", c5)])


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace BatchNorm2d by FrozenBatchNorm2d (what torchvision does for pretrained detectors)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = misc_ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module
