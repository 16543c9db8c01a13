"""torchvision DeepLabV3 / FCN / LRASPP (and timm-backbone DeepLabV3) as tap-producing models."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from ..errors import ZooError
from ..zoo import ModelSpec
from .backbones import TimmDilated, fc_in_features, freeze_batchnorm, split_backbone, torchvision_classifier
from .base import Batch, TapModel
from .taps import ModelOutput

IGNORE_INDEX = 255
AUX_WEIGHT = 0.5  # torchvision reference recipe


def _deeplab_head(in_ch: int, num_classes: int, width: int | None) -> nn.Module:
    if width is None:
        return DeepLabHead(in_ch, num_classes)
    # same layout (and key names) as DeepLabHead, narrower: ASPP, 3x3 conv, BN, ReLU, 1x1 classifier
    return nn.Sequential(
        ASPP(in_ch, [12, 24, 36], width),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, num_classes, 1),
    )


def _dilate_mobilenet_v2(features: nn.Sequential, output_stride: int) -> None:
    """torchvision's MobileNetV2 has no ``dilated`` option (V3 has): past ``output_stride``, each
    stride-2 conv becomes stride 1 and every later 3x3 conv dilates by the strides dropped so far.
    This is the exact atrous form (as torchvision's ResNet ``replace_stride_with_dilation``): the
    dilated features, sampled every ``32 / output_stride`` pixels, are the strided network's."""
    stride, dilation = 1, 1
    for block in features:
        for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d)):
            if conv.kernel_size == (3, 3) and dilation > 1:
                conv.dilation = (dilation, dilation)
                conv.padding = (dilation, dilation)
            if conv.stride == (2, 2):
                if stride >= output_stride:
                    conv.stride = (1, 1)
                    dilation *= 2  # from the next conv on
                else:
                    stride *= 2


def _mobilenet_v2_stages(output_stride: int) -> tuple[nn.Module, int, int, int, int]:
    """MobileNetV2's features; ``low`` is the last 96-channel block (stride 16 undilated, the aux
    head's input like ResNet's layer3), ``high`` the final 1x1 conv (1280 channels)."""
    features = torchvision_classifier("mobilenet_v2").get_submodule("features")
    assert isinstance(features, nn.Sequential)
    _dilate_mobilenet_v2(features, output_stride)
    high = len(features) - 1
    low = max(i for i, b in enumerate(features) if getattr(b, "out_channels", 0) == 96)
    return features, low, high, 96, _out_channels(features[high])


def _mobilenet_stages(arch: str, output_stride: int) -> tuple[nn.Module, int, int, int, int]:
    if arch == "mobilenet_v2":
        return _mobilenet_v2_stages(output_stride)
    features = torchvision_classifier(arch, dilated=output_stride <= 16).get_submodule("features")
    assert isinstance(features, nn.Sequential)
    idx = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    low, high = idx[-4], idx[-1]  # stride 8 and the last block (stride 16 when dilated)
    return features, low, high, _out_channels(features[low]), _out_channels(features[high])


def _out_channels(block: nn.Module) -> int:
    """A MobileNet block's output width (torchvision's InvertedResidual and Conv2dNormActivation set it)."""
    width = block.out_channels
    assert isinstance(width, int)
    return width


def build_segmenter(spec: ModelSpec) -> nn.Module:
    if spec.style != "torchvision" or spec.architecture == "pspnet":  # imported mmseg layouts (models/mm.py)
        from .mm import build_mmseg_segmenter

        return build_mmseg_segmenter(spec)
    lib, arch = split_backbone(spec.backbone)
    nc, width = spec.num_classes, spec.head_channels
    if spec.architecture == "lraspp":
        if not arch.startswith("mobilenet_v3"):
            raise ZooError(f"{spec.name}: lraspp takes a MobileNetV3 backbone")
        features, low, high, lc, hc = _mobilenet_stages(arch, spec.output_stride)
        body = IntermediateLayerGetter(features, return_layers={str(low): "low", str(high): "high"})
        net: nn.Module = LRASPP(body, lc, hc, nc, inter_channels=width or 128)
    elif lib == "timm":
        if spec.architecture != "deeplabv3":
            raise ZooError(f"{spec.name}: timm backbones are available for deeplabv3 only")
        body = TimmDilated(arch, spec.output_stride)
        c4, c5 = body.channels
        net = DeepLabV3(body, _deeplab_head(c5, nc, width), FCNHead(c4, nc))
    elif arch.startswith("mobilenet"):
        features, low, high, lc, hc = _mobilenet_stages(arch, spec.output_stride)
        body = IntermediateLayerGetter(features, return_layers={str(high): "out", str(low): "aux"})
        if spec.architecture != "deeplabv3":
            raise ZooError(f"{spec.name}: MobileNet backbones take deeplabv3 (or lraspp, V3 only)")
        net = DeepLabV3(body, _deeplab_head(hc, nc, width), FCNHead(lc, nc))
    else:
        dil = [False, spec.output_stride <= 16, spec.output_stride <= 8]
        resnet = torchvision_classifier(arch, replace_stride_with_dilation=dil)
        body = IntermediateLayerGetter(resnet, return_layers={"layer4": "out", "layer3": "aux"})
        c5 = fc_in_features(resnet)
        c4 = c5 // 2
        if spec.architecture == "deeplabv3":
            net = DeepLabV3(body, _deeplab_head(c5, nc, width), FCNHead(c4, nc))
        elif spec.architecture == "fcn":
            net = FCN(body, FCNHead(c5, nc), FCNHead(c4, nc))
        else:
            raise ZooError(f"{spec.name}: unknown segmentation architecture '{spec.architecture}'")
    return freeze_batchnorm(net) if spec.norm == "frozen" else net


class SegmentationModel(TapModel):
    """Taps: ``c4`` (aux input), ``c5`` (last backbone stage), ``seg_feat``, ``seg_logits``."""

    task = "segmentation"
    net: DeepLabV3 | FCN | LRASPP  # what build_segmenter returns (models/mm.py's are DeepLabV3 and FCN too)

    def dry_run_size(self) -> int:
        return 128

    def preprocess(self, images: list[Tensor] | Tensor, targets: Any = None) -> Batch:
        x = images if isinstance(images, Tensor) else torch.stack(list(images))
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        sizes = [(int(x.shape[-2]), int(x.shape[-1]))] * x.shape[0]
        return Batch((x - mean) / std, sizes, sizes, targets, self.mean, self.std)

    def forward(
        self, batch: Batch, need: set[str] | None = None, losses: bool = True, predict: bool = False
    ) -> ModelOutput:
        x = self.input_for(batch)
        net = self.net
        out = ModelOutput()
        feats = net.backbone(x)
        targets = batch.targets if losses else None
        if isinstance(net, LRASPP):
            low, high = feats["low"], feats["high"]
            out.taps.update(c3=low, c5=high)
            if need is not None and not (need & {"seg_feat", "seg_logits"}) and targets is None and not predict:
                return out
            head = net.classifier
            y = head.cbr(high) * head.scale(high)
            y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
            logits = head.low_classifier(low) + head.high_classifier(y)
            out.taps.update(seg_feat=y, seg_logits=logits)
            aux = None
        else:
            out.taps.update(c4=feats["aux"], c5=feats["out"])
            if need is not None and not (need & {"seg_feat", "seg_logits"}) and targets is None and not predict:
                return out
            layers = list(net.classifier)  # slicing a Sequential subclass would re-instantiate it
            y = feats["out"]
            for layer in layers[:-1]:
                y = layer(y)
            logits = layers[-1](y)
            out.taps.update(seg_feat=y, seg_logits=logits)
            aux = net.aux_classifier(feats["aux"]) if (net.aux_classifier is not None and targets is not None) else None
        size = x.shape[-2:]
        if targets is not None:
            up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            out.losses["ce"] = F.cross_entropy(up.float(), targets, ignore_index=IGNORE_INDEX)
            if aux is not None:
                up_aux = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
                out.losses["aux_ce"] = AUX_WEIGHT * F.cross_entropy(up_aux.float(), targets, ignore_index=IGNORE_INDEX)
        if predict:
            up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            out.extras["pred"] = up.argmax(1)
        return out
