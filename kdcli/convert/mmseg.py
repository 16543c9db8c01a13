"""mmsegmentation DeepLabV3 (``ASPPHead``) / PSPNet (``PSPHead``) with an ``FCNHead`` auxiliary →
kdcli segmenters built by :func:`kdcli.models.mm.build_mmseg_segmenter`.

Key layouts (mmseg 0.x and 1.x; read from mmseg's ``ResNetV1c``, ``ASPPHead``, ``PSPHead``,
``FCNHead`` and mmcv's ``ConvModule``, whose ``conv``/``bn`` names kdcli's heads reuse):

- ``backbone.stem.{0,1,3,4,6,7}`` (ResNetV1c deep stem) → timm ``resnet50c``/``resnet101c``'s
  ``conv1.{0,1,3,4,6}`` + ``bn1``; ``backbone.layerX.*`` unchanged. A plain stem (``conv1``/``bn1``)
  maps onto a torchvision ResNet. Both are dilated to output stride 8 with the first block of a
  dilated stage at half the dilation (mmseg ``contract_dilation=True`` = torchvision's and timm's rule).
- ``decode_head.image_pool.1`` / ``aspp_modules.{i}`` / ``psp_modules.{i}.1`` / ``bottleneck`` →
  ``classifier.0.*`` (same names); ``decode_head.conv_seg`` → ``classifier.2``.
- ``auxiliary_head.convs.0.conv`` / ``.bn`` / ``conv_seg`` → ``aux_classifier.0`` / ``.1`` / ``.4``
  (torchvision ``FCNHead``: conv, BN, ReLU, dropout, conv).
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ..errors import ZooError
from .common import KeyMap, deep_stem, map_resnet, resnet_depth


def seg_classes(src: dict[str, Tensor]) -> int:
    if "decode_head.conv_seg.weight" not in src:
        raise ZooError("missing decode_head.conv_seg: not an mmseg checkpoint (is --arch right?)")
    return src["decode_head.conv_seg.weight"].shape[0]


def map_segmenter(m: KeyMap, arch: str) -> dict[str, Any]:
    depth = resnet_depth(m.src)
    if depth < 50:
        raise ZooError(f"{m.where}: a ResNet-{depth} cannot be dilated here; mmseg imports take ResNet-50/101")
    if deep_stem(m.src):
        backbone, body = f"timm:resnet{depth}c", "backbone.body.body."
    else:
        backbone, body = f"torchvision:resnet{depth}", "backbone.body."
    map_resnet(m, "backbone.", body)
    if arch == "deeplabv3":
        if not m.has("decode_head.image_pool.1.conv.weight"):
            raise ZooError(f"{m.where}: no decode_head.image_pool: not an mmseg ASPPHead (DeepLabV3)")
        n = len({k.split(".")[2] for k in m.src if k.startswith("decode_head.aspp_modules.")})
        if n != 4:
            raise ZooError(f"{m.where}: {n} ASPP branches; kdcli's ASPP head has 4 (dilations 1, 12, 24, 36)")
        m.copy_prefix("decode_head.image_pool.", "classifier.0.image_pool.")
        m.copy_prefix("decode_head.aspp_modules.", "classifier.0.aspp_modules.")
    elif arch == "pspnet":
        if not m.has("decode_head.psp_modules.0.1.conv.weight"):
            raise ZooError(f"{m.where}: no decode_head.psp_modules: not an mmseg PSPHead (PSPNet)")
        n = len({k.split(".")[2] for k in m.src if k.startswith("decode_head.psp_modules.")})
        if n != 4:
            raise ZooError(f"{m.where}: {n} pyramid levels; kdcli's PSP head has 4 (bins 1, 2, 3, 6)")
        m.copy_prefix("decode_head.psp_modules.", "classifier.0.psp_modules.")
    m.copy_prefix("decode_head.bottleneck.", "classifier.0.bottleneck.")
    m.conv("decode_head.conv_seg", "classifier.2")
    if not m.has("auxiliary_head.convs.0.conv.weight"):
        raise ZooError(f"{m.where}: no auxiliary_head.convs.0 (an FCNHead on C4); kdcli's segmenters have one")
    n_aux = len({mm.group(1) for k in m.src if (mm := re.match(r"auxiliary_head\.convs\.(\d+)\.", k))})
    if n_aux != 1 or m.has("auxiliary_head.conv_cat.conv.weight"):
        raise ZooError(f"{m.where}: an auxiliary FCNHead with {n_aux} convs or concat_input; kdcli's has one conv")
    m.copy("auxiliary_head.convs.0.conv.weight", "aux_classifier.0.weight")
    m.norm("auxiliary_head.convs.0.bn", "aux_classifier.1")
    m.conv("auxiliary_head.conv_seg", "aux_classifier.4")
    head_channels = m.src["decode_head.conv_seg.weight"].shape[1]
    return {"backbone": backbone, "head_channels": int(head_channels),
            "first_conv": f"{body}conv1.0.weight" if deep_stem(m.src) else f"{body}conv1.weight"}
