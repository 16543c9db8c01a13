"""mmdetection / mmsegmentation checkpoint import (kdcli/convert, kdcli/models/mm.py).

The checkpoints are written here with the real key names and shapes of mmdet's ``ResNet``/``FPN``/
``RetinaHead``/``FCOSHead``/``RPNHead``/``Shared2FCBBoxHead`` and mmseg's ``ResNetV1c``/``ASPPHead``/
``PSPHead``/``FCNHead`` (random values, narrow FPN/head widths where the config allows it, to keep the
tests fast). Each converted model is compared with a reference forward written here, functionally,
from the mmdet/mmseg formulas and the *source* tensors, so the key map, class-slot map, FPN variant,
anchors/points, FCOS scales/regression, RoIAlign, caffe strides, BGR input and heads are all checked
against an implementation that does not share code with kdcli's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from kdcli.convert import coco80, import_checkpoint
from kdcli.errors import ConfigError, ZooError
from kdcli.models import build_model
from kdcli.zoo import CITYSCAPES_CLASSES, resolve_ref

G = torch.Generator().manual_seed(0)


# -- mmdet / mmseg key layouts ----------------------------------------------------------------------
def _conv(d: dict, name: str, cout: int, cin: int, k: int, bias: bool) -> None:
    d[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=G) * math.sqrt(2.0 / (cin * k * k))
    if bias:
        d[f"{name}.bias"] = torch.randn(cout, generator=G) * 0.1


def _bn(d: dict, name: str, c: int) -> None:
    d[f"{name}.weight"] = torch.rand(c, generator=G) * 0.5 + 0.5
    d[f"{name}.bias"] = torch.randn(c, generator=G) * 0.1
    d[f"{name}.running_mean"] = torch.randn(c, generator=G) * 0.1
    d[f"{name}.running_var"] = torch.rand(c, generator=G) * 0.5 + 0.5
    d[f"{name}.num_batches_tracked"] = torch.tensor(1000)


def _gn(d: dict, name: str, c: int) -> None:
    d[f"{name}.weight"] = torch.rand(c, generator=G) * 0.5 + 0.75
    d[f"{name}.bias"] = torch.randn(c, generator=G) * 0.1


def mm_resnet(depth: int, deep_stem: bool = False, prefix: str = "backbone.") -> dict[str, Tensor]:
    """mmcv/mmdet ``ResNet`` (``ResNetV1c`` with ``deep_stem``) state dict."""
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    bottleneck = depth >= 50
    d: dict[str, Tensor] = {}
    if deep_stem:  # conv3x3(3, 32, s2) bn relu conv3x3(32, 32) bn relu conv3x3(32, 64) bn relu
        _conv(d, f"{prefix}stem.0", 32, 3, 3, False)
        _bn(d, f"{prefix}stem.1", 32)
        _conv(d, f"{prefix}stem.3", 32, 32, 3, False)
        _bn(d, f"{prefix}stem.4", 32)
        _conv(d, f"{prefix}stem.6", 64, 32, 3, False)
        _bn(d, f"{prefix}stem.7", 64)
    else:
        _conv(d, f"{prefix}conv1", 64, 3, 7, False)
        _bn(d, f"{prefix}bn1", 64)
    inplanes = 64
    for i, n in enumerate(blocks):
        planes = 64 * 2**i
        out = planes * (4 if bottleneck else 1)
        for b in range(n):
            name = f"{prefix}layer{i + 1}.{b}"
            cin = inplanes if b == 0 else out
            if bottleneck:
                _conv(d, f"{name}.conv1", planes, cin, 1, False)
                _bn(d, f"{name}.bn1", planes)
                _conv(d, f"{name}.conv2", planes, planes, 3, False)
                _bn(d, f"{name}.bn2", planes)
                _conv(d, f"{name}.conv3", out, planes, 1, False)
                _bn(d, f"{name}.bn3", out)
            else:
                _conv(d, f"{name}.conv1", planes, cin, 3, False)
                _bn(d, f"{name}.bn1", planes)
                _conv(d, f"{name}.conv2", planes, planes, 3, False)
                _bn(d, f"{name}.bn2", planes)
            if b == 0 and (i > 0 or inplanes != out):
                _conv(d, f"{name}.downsample.0", out, inplanes, 1, False)
                _bn(d, f"{name}.downsample.1", out)
        inplanes = out
    return d


def mm_fpn(in_channels: list[int], out: int, start_level: int, extra: str | None) -> dict[str, Tensor]:
    """mmdet ``FPN``: ``lateral_convs``/``fpn_convs`` (ConvModule without norm: conv with bias); with
    ``add_extra_convs`` two more ``fpn_convs`` (the first from C5 for 'on_input', from P5 for 'on_output')."""
    d: dict[str, Tensor] = {}
    used = in_channels[start_level:]
    for i, c in enumerate(used):
        _conv(d, f"neck.lateral_convs.{i}.conv", out, c, 1, True)
        _conv(d, f"neck.fpn_convs.{i}.conv", out, out, 3, True)
    if extra:
        _conv(d, f"neck.fpn_convs.{len(used)}.conv", out, used[-1] if extra == "on_input" else out, 3, True)
        _conv(d, f"neck.fpn_convs.{len(used) + 1}.conv", out, out, 3, True)
    return d


def mm_retina_head(nc: int, ch: int) -> dict[str, Tensor]:
    d: dict[str, Tensor] = {}
    for i in range(4):
        _conv(d, f"bbox_head.cls_convs.{i}.conv", ch, ch, 3, True)
        _conv(d, f"bbox_head.reg_convs.{i}.conv", ch, ch, 3, True)
    _conv(d, "bbox_head.retina_cls", 9 * nc, ch, 3, True)
    _conv(d, "bbox_head.retina_reg", 9 * 4, ch, 3, True)
    return d


def mm_fcos_head(nc: int, ch: int, old_names: bool = False) -> dict[str, Tensor]:
    """mmdet ``FCOSHead``: GN convs without bias (conv_bias='auto'), ``conv_*`` (``fcos_*`` before 2.4), scales."""
    d: dict[str, Tensor] = {}
    for i in range(4):
        for br in ("cls", "reg"):
            _conv(d, f"bbox_head.{br}_convs.{i}.conv", ch, ch, 3, False)
            _gn(d, f"bbox_head.{br}_convs.{i}.gn", ch)
    p = "fcos" if old_names else "conv"
    _conv(d, f"bbox_head.{p}_cls", nc, ch, 3, True)
    _conv(d, f"bbox_head.{p}_reg", 4, ch, 3, True)
    _conv(d, f"bbox_head.{p}_centerness", 1, ch, 3, True)
    for i in range(5):
        d[f"bbox_head.scales.{i}.scale"] = torch.tensor(0.5 + 0.25 * i)
    return d


def mm_faster_heads(nc: int, ch: int, agnostic: bool = False) -> dict[str, Tensor]:
    d: dict[str, Tensor] = {}
    _conv(d, "rpn_head.rpn_conv", ch, ch, 3, True)
    _conv(d, "rpn_head.rpn_cls", 3, ch, 1, True)
    _conv(d, "rpn_head.rpn_reg", 12, ch, 1, True)
    for name, cout, cin in (("shared_fcs.0", 1024, ch * 49), ("shared_fcs.1", 1024, 1024),
                            ("fc_cls", nc + 1, 1024), ("fc_reg", 4 if agnostic else 4 * nc, 1024)):
        d[f"roi_head.bbox_head.{name}.weight"] = torch.randn(cout, cin, generator=G) / math.sqrt(cin)
        d[f"roi_head.bbox_head.{name}.bias"] = torch.randn(cout, generator=G) * 0.1
    return d


def mmseg_heads(nc: int, kind: str, ch: int, cin: int = 2048, aux_cin: int = 1024) -> dict[str, Tensor]:
    d: dict[str, Tensor] = {}
    if kind == "aspp":
        _conv(d, "decode_head.image_pool.1.conv", ch, cin, 1, False)
        _bn(d, "decode_head.image_pool.1.bn", ch)
        for i, dil in enumerate((1, 12, 24, 36)):
            _conv(d, f"decode_head.aspp_modules.{i}.conv", ch, cin, 1 if dil == 1 else 3, False)
            _bn(d, f"decode_head.aspp_modules.{i}.bn", ch)
        _conv(d, "decode_head.bottleneck.conv", ch, 5 * ch, 3, False)
    else:
        for i in range(4):
            _conv(d, f"decode_head.psp_modules.{i}.1.conv", ch, cin, 1, False)
            _bn(d, f"decode_head.psp_modules.{i}.1.bn", ch)
        _conv(d, "decode_head.bottleneck.conv", ch, cin + 4 * ch, 3, False)
    _bn(d, "decode_head.bottleneck.bn", ch)
    _conv(d, "decode_head.conv_seg", nc, ch, 1, True)
    _conv(d, "auxiliary_head.convs.0.conv", aux_cin // 4, aux_cin, 3, False)
    _bn(d, "auxiliary_head.convs.0.bn", aux_cin // 4)
    _conv(d, "auxiliary_head.conv_seg", nc, aux_cin // 4, 1, True)
    return d


def save_ckpt(path: Path, state: dict[str, Tensor], config: str = "", classes: list[str] | None = None) -> Path:
    """mmdet 2.x layout: {'meta': {config text, CLASSES, versions}, 'state_dict': ...}."""
    meta = {"mmdet_version": "2.28.2", "config": config}
    if classes is not None:
        meta["CLASSES"] = tuple(classes)
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


# -- functional references (mmdet/mmseg semantics, from the source tensors) -------------------------
def ref_conv(s: dict, name: str, x: Tensor, stride: int = 1, padding: int = 0, dilation: int = 1) -> Tensor:
    return F.conv2d(x, s[f"{name}.weight"], s.get(f"{name}.bias"), stride, padding, dilation)


def ref_bn(s: dict, name: str, x: Tensor) -> Tensor:
    return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                        s[f"{name}.bias"], False, 0.0, 1e-5)


def ref_fpn(s: dict, cs: list[Tensor], extra: str | None, relu_extra: bool) -> list[Tensor]:
    lat = [ref_conv(s, f"neck.lateral_convs.{i}.conv", c) for i, c in enumerate(cs)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
    outs = [ref_conv(s, f"neck.fpn_convs.{i}.conv", t, padding=1) for i, t in enumerate(lat)]
    n = len(outs)
    if extra is None:
        return outs + [F.max_pool2d(outs[-1], 1, stride=2)]
    src = cs[-1] if extra == "on_input" else outs[-1]
    outs.append(ref_conv(s, f"neck.fpn_convs.{n}.conv", src, stride=2, padding=1))
    p6 = F.relu(outs[-1]) if relu_extra else outs[-1]
    outs.append(ref_conv(s, f"neck.fpn_convs.{n + 1}.conv", p6, stride=2, padding=1))
    return outs


def ref_mmdet_anchors(sizes_hw: list[tuple[int, int]], strides: list[int], base_sizes: list[float],
                      scales: list[float], ratios: list[float], offset: float = 0.0) -> Tensor:
    """mmdet ``AnchorGenerator.gen_single_level_base_anchors`` + ``single_level_grid_priors``."""
    out = []
    for (h, w), stride, base in zip(sizes_hw, strides, base_sizes, strict=True):
        r = torch.tensor(ratios)
        sc = torch.tensor(scales)
        h_ratios = torch.sqrt(r)
        w_ratios = 1 / h_ratios
        ws = (base * w_ratios[:, None] * sc[None, :]).view(-1)
        hs = (base * h_ratios[:, None] * sc[None, :]).view(-1)
        cx = cy = offset * stride
        basea = torch.stack([cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs], dim=-1)
        sx = torch.arange(0, w) * stride
        sy = torch.arange(0, h) * stride
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        shifts = torch.stack([xx.reshape(-1), yy.reshape(-1)] * 2, dim=-1).float()
        out.append((basea[None] + shifts[:, None]).view(-1, 4))
    return torch.cat(out)


def flat(t: Tensor, c: int) -> Tensor:
    """(N, A*C, H, W) → (N, H*W*A, C) (anchor-major within a location, as both frameworks)."""
    n, _, h, w = t.shape
    return t.view(n, -1, c, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, c)


def at_size(spec, x: Tensor):
    """The spec with detection resizing switched off for ``x`` (min/max size = its own), so the
    references can run on the same pixels."""
    from dataclasses import replace

    if spec.task != "detection":
        return spec
    h, w = x.shape[-2:]
    return replace(spec, preprocess={**spec.preprocess, "min_size": min(h, w), "max_size": max(h, w)})


def run(model, x: Tensor, **kw):
    model.eval()
    with torch.no_grad():
        batch = model.preprocess([x] if model.task == "detection" else x[None])
        return batch, model(batch, losses=False, **kw)


# -- RetinaNet ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retina(tmp_path_factory: pytest.TempPathFactory) -> dict:
    state = {**mm_resnet(18), **mm_fpn([64, 128, 256, 512], 64, 1, "on_input"), **mm_retina_head(80, 64)}
    cfg = ("model = dict(type='RetinaNet', neck=dict(type='FPN', in_channels=[128, 256, 512], out_channels=64, "
           "start_level=1, add_extra_convs='on_input', num_outs=5))\n"
           "img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)\n")
    path = save_ckpt(tmp_path_factory.mktemp("retina") / "retinanet_r18_fpn_1x_coco-abcdef12.pth", state, cfg,
                     coco80())
    return {"state": state, "path": path}


@pytest.mark.parametrize("layout", ["contiguous", "coco"])
def test_retinanet_matches_mmdet_reference(retina: dict, tmp_path: Path, layout: str) -> None:
    src = retina["state"]
    res = import_checkpoint(retina["path"], "retinanet", tmp_path / "out", classes="coco" if layout == "coco" else None,
                            metric={"box_map": 31.7}, log=lambda _m: None)
    spec = res.spec
    assert spec.extra_levels == "p6p7-from-c5-norelu" and spec.style == "mmdet" and spec.fpn_channels == 64
    assert spec.preprocess["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert spec.preprocess["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert not res.notes  # everything came from the checkpoint's config
    ref = resolve_ref(str(res.folder))  # an import folder is a model reference like an export
    assert ref.spec.metric == {"box_map": 31.7}
    x = torch.rand(3, 100, 140, generator=G)
    model = build_model(at_size(ref.spec, x), ref.weights)
    batch, out = run(model, x)
    cs = [out.taps[k] for k in ("c3", "c4", "c5")]
    ps = ref_fpn(src, cs, "on_input", relu_extra=False)
    for k, p in zip(("p3", "p4", "p5", "p6", "p7"), ps, strict=True):
        torch.testing.assert_close(out.taps[k], p, rtol=1e-4, atol=1e-4)
    # head: 4 x (conv + ReLU), retina_cls; class c of mmdet at its slot
    logits, deltas = [], []
    for p in ps:
        f, g = p, p
        for i in range(4):
            f = F.relu(ref_conv(src, f"bbox_head.cls_convs.{i}.conv", f, padding=1))
            g = F.relu(ref_conv(src, f"bbox_head.reg_convs.{i}.conv", g, padding=1))
        logits.append(flat(ref_conv(src, "bbox_head.retina_cls", f, padding=1), 80))
        deltas.append(flat(ref_conv(src, "bbox_head.retina_reg", g, padding=1), 4))
    want = torch.cat(logits, 1)
    got = out.taps["cls_logits"]
    slots = [i + 1 for i in range(80)] if layout == "contiguous" else \
        [[n for n in ref.spec.classes].index(c) + 1 for c in coco80()]
    assert got.shape[-1] == (81 if layout == "contiguous" else 91)
    torch.testing.assert_close(got[..., slots], want, rtol=1e-4, atol=1e-4)
    empty = [i for i in range(got.shape[-1]) if i not in slots]
    assert (got[..., empty] <= -19).all()  # background / N/A slots never fire
    torch.testing.assert_close(out.extras["head"]["bbox_regression"], torch.cat(deltas, 1), rtol=1e-4, atol=1e-4)
    # anchors: octave base scale 4, 3 scales per octave, ratios 0.5/1/2, strides 8..128, centre offset 0
    sizes = [tuple(p.shape[-2:]) for p in ps]
    anchors = ref_mmdet_anchors(sizes, [8, 16, 32, 64, 128], [8 * 4.0, 16 * 4.0, 32 * 4.0, 64 * 4.0, 128 * 4.0],
                                [2 ** (i / 3) for i in range(3)], [0.5, 1.0, 2.0])
    torch.testing.assert_close(out.extras["anchors"][0], anchors)


def test_torchvision_style_retinanet_unchanged() -> None:
    """The mmdet parts are opt-in: a zoo RetinaNet still has torchvision's rounded anchors and ReLU P7."""
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from kdcli.models.mm import ExactAnchorGenerator, LastLevelP6P7NoReLU
    from kdcli.zoo import get_spec

    net = build_model(get_spec("shapes-r18-retina")).net
    assert type(net.anchor_generator) is not ExactAnchorGenerator
    assert type(net.backbone.fpn.extra_blocks) is LastLevelP6P7
    assert not isinstance(net.backbone.fpn.extra_blocks, LastLevelP6P7NoReLU)


# -- FCOS (caffe-style ResNet-50, BGR input, exp regression, centerness on the cls tower, old names) ---
def test_fcos_caffe_bgr_matches_mmdet_reference(tmp_path: Path) -> None:
    src = {**mm_resnet(50), **mm_fpn([256, 512, 1024, 2048], 64, 1, "on_output"),
           **mm_fcos_head(80, 64, old_names=True)}
    cfg = ("model = dict(type='FCOS', backbone=dict(type='ResNet', depth=50, style='caffe'), "
           "neck=dict(type='FPN', add_extra_convs='on_output', relu_before_extra_convs=True), "
           "bbox_head=dict(type='FCOSHead', num_classes=80))\n"
           "img_norm_cfg = dict(mean=[102.9801, 115.9465, 122.7717], std=[1.0, 1.0, 1.0], to_rgb=False)\n")
    path = save_ckpt(tmp_path / "fcos_r50_caffe_fpn_gn-head_1x_coco.pth", src, cfg)  # no CLASSES: 80 → COCO
    res = import_checkpoint(path, "fcos", tmp_path / "fcos", log=lambda _m: None)
    spec = res.spec
    assert (spec.resnet_style, spec.fcos_regression, spec.extra_levels) == ("caffe", "exp", "p6p7-from-p5")
    assert spec.classes == coco80()
    assert not res.notes  # centerness_on_reg / norm_on_bbox absent from the stored config: mmdet's False
    assert spec.fcos_centerness == "cls"
    x = torch.rand(3, 96, 128, generator=G)
    model = build_model(at_size(spec, x), res.folder / "model.safetensors")
    batch, out = run(model, x)
    # BGR 0-255 minus the caffe mean, through the mmdet conv1 == kdcli's RGB [0,1] through its conv1
    body = model.net.backbone.body
    bgr = x.flip(0) * 255 - torch.tensor([102.9801, 115.9465, 122.7717]).view(3, 1, 1)
    want = F.conv2d(bgr[None], src["backbone.conv1.weight"], stride=2, padding=3)
    with torch.no_grad():
        got = body.conv1(batch.images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    # caffe style: the stride sits in the first 1x1 conv of each downsampling bottleneck
    assert body.layer2[0].conv1.stride == (2, 2) and body.layer2[0].conv2.stride == (1, 1)
    assert body.layer1[0].conv1.stride == (1, 1)
    ps = ref_fpn(src, [out.taps[k] for k in ("c3", "c4", "c5")], "on_output", relu_extra=True)
    for k, p in zip(("p3", "p4", "p5", "p6", "p7"), ps, strict=True):
        torch.testing.assert_close(out.taps[k], p, rtol=1e-4, atol=1e-4)
    strides = [8, 16, 32, 64, 128]
    cls_all, box_all, ctr_all = [], [], []
    for lvl, (p, stride) in enumerate(zip(ps, strides, strict=True)):
        f, g = p, p
        for i in range(4):
            f = F.relu(F.group_norm(ref_conv(src, f"bbox_head.cls_convs.{i}.conv", f, padding=1), 32,
                                    src[f"bbox_head.cls_convs.{i}.gn.weight"], src[f"bbox_head.cls_convs.{i}.gn.bias"]))
            g = F.relu(F.group_norm(ref_conv(src, f"bbox_head.reg_convs.{i}.conv", g, padding=1), 32,
                                    src[f"bbox_head.reg_convs.{i}.gn.weight"], src[f"bbox_head.reg_convs.{i}.gn.bias"]))
        cls_all.append(flat(ref_conv(src, "bbox_head.fcos_cls", f, padding=1), 80))
        ctr_all.append(flat(ref_conv(src, "bbox_head.fcos_centerness", f, padding=1), 1))  # on the cls tower
        dist = flat((ref_conv(src, "bbox_head.fcos_reg", g, padding=1) * src[f"bbox_head.scales.{lvl}.scale"]).exp(), 4)
        h, w = p.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pts = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).float() * stride + stride // 2  # cell centres
        box_all.append(torch.cat([pts - dist[0, :, :2], pts + dist[0, :, 2:]], -1))
    head = out.extras["head"]
    torch.testing.assert_close(out.taps["cls_logits"][..., 1:], torch.cat(cls_all, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head["bbox_ctrness"], torch.cat(ctr_all, 1), rtol=1e-4, atol=1e-4)
    boxes = out.extras["decode"](head["bbox_regression"])[0]
    torch.testing.assert_close(boxes, torch.cat(box_all), rtol=1e-4, atol=1e-3)


# -- Faster R-CNN ------------------------------------------------------------------------------------
def test_faster_rcnn_matches_mmdet_reference(tmp_path: Path) -> None:
    src = {**mm_resnet(18), **mm_fpn([64, 128, 256, 512], 64, 0, None), **mm_faster_heads(80, 64, agnostic=True)}
    path = save_ckpt(tmp_path / "faster_rcnn_r18_fpn_1x_coco.pth", src, "", coco80())
    res = import_checkpoint(path, "fasterrcnn", tmp_path / "frcnn", log=lambda _m: None)
    assert res.spec.extra_levels == "pool" and len(res.notes) == 2  # channel order and mean/std assumed
    x = torch.rand(3, 96, 128, generator=G)
    model = build_model(at_size(res.spec, x), res.folder / "model.safetensors").eval()
    batch, out = run(model, x, predict=True)
    ps = ref_fpn(src, [out.taps[k] for k in ("c2", "c3", "c4", "c5")], None, False)
    for k, p in zip(("p2", "p3", "p4", "p5", "p6"), ps, strict=True):
        torch.testing.assert_close(out.taps[k], p, rtol=1e-4, atol=1e-4)
    net = model.net
    with torch.no_grad():
        obj, reg = net.rpn.head(ps)
        for p, o, r in zip(ps, obj, reg, strict=True):
            t = F.relu(ref_conv(src, "rpn_head.rpn_conv", p, padding=1))
            torch.testing.assert_close(o, ref_conv(src, "rpn_head.rpn_cls", t), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(r, ref_conv(src, "rpn_head.rpn_reg", t), rtol=1e-4, atol=1e-4)
        # RPN anchors: scale 8 x strides 4..64, ratios 0.5/1/2, unrounded
        from torchvision.models.detection.image_list import ImageList

        anchors = net.rpn.anchor_generator(ImageList(batch.images, batch.image_sizes), ps)[0]
        sizes = [tuple(p.shape[-2:]) for p in ps]
        torch.testing.assert_close(anchors, ref_mmdet_anchors(sizes, [4, 8, 16, 32, 64], [4, 8, 16, 32, 64], [8.0],
                                                              [0.5, 1.0, 2.0]))
        # RoIAlign as mmcv: level floor(log2(sqrt(wh)/56)), aligned=True, adaptive sampling
        boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [0.0, 0.0, 120.0, 90.0], [10.0, 10.0, 250.0, 240.0]])
        feats = dict(zip(("0", "1", "2", "3"), ps[:4], strict=True))
        pooled = net.roi_heads.box_roi_pool(feats, [boxes], [tuple(batch.images.shape[-2:])])
        lvl = torch.floor(torch.log2(torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) / 56 + 1e-6))
        for i, lv in enumerate(lvl.clamp(0, 3).long().tolist()):
            roi = torch.cat([torch.zeros(1), boxes[i]])[None]
            want = roi_align(ps[lv], roi, 7, spatial_scale=1 / 2 ** (lv + 2), sampling_ratio=0, aligned=True)
            torch.testing.assert_close(pooled[i:i + 1], want, rtol=1e-5, atol=1e-5)
        # box head: shared fcs, softmax with background last (mmdet) == background first (torchvision)
        feat = torch.randn(5, 64 * 49, generator=G)
        h = F.relu(F.linear(F.relu(F.linear(feat, src["roi_head.bbox_head.shared_fcs.0.weight"],
                                             src["roi_head.bbox_head.shared_fcs.0.bias"])),
                            src["roi_head.bbox_head.shared_fcs.1.weight"], src["roi_head.bbox_head.shared_fcs.1.bias"]))
        mm_logits = F.linear(h, src["roi_head.bbox_head.fc_cls.weight"], src["roi_head.bbox_head.fc_cls.bias"])
        mm_prob = mm_logits.softmax(-1)
        mm_reg = F.linear(h, src["roi_head.bbox_head.fc_reg.weight"], src["roi_head.bbox_head.fc_reg.bias"])
        scores, deltas = net.roi_heads.box_predictor(net.roi_heads.box_head(feat.view(5, 64, 7, 7)))
        tv_prob = scores.softmax(-1)
        torch.testing.assert_close(tv_prob[:, 0], mm_prob[:, 80], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tv_prob[:, 1:], mm_prob[:, :80], rtol=1e-5, atol=1e-6)
        for c in (0, 17, 79):  # class-agnostic regression: every class gets the same deltas
            torch.testing.assert_close(deltas[:, 4 * (c + 1):4 * (c + 2)], mm_reg, rtol=1e-5, atol=1e-5)
    assert net.roi_heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)  # mmdet target_stds 0.1, 0.1, 0.2, 0.2


# -- mmseg DeepLabV3 / PSPNet --------------------------------------------------------------------------
def ref_convmodule(s: dict, name: str, x: Tensor, padding: int = 0, dilation: int = 1) -> Tensor:
    return F.relu(ref_bn(s, f"{name}.bn", ref_conv(s, f"{name}.conv", x, padding=padding, dilation=dilation)))


@pytest.mark.parametrize("arch", ["deeplabv3", "pspnet"])
def test_mmseg_matches_reference(tmp_path: Path, arch: str) -> None:
    src = {**mm_resnet(50, deep_stem=True), **mmseg_heads(19, "aspp" if arch == "deeplabv3" else "psp", 32)}
    cfg = ("norm_cfg = dict(type='SyncBN', requires_grad=True)\n"
           "model = dict(backbone=dict(type='ResNetV1c', style='pytorch'))\n")
    path = save_ckpt(tmp_path / f"{arch}_r50-d8_512x1024_80k_cityscapes.pth", src, cfg,
                     list(CITYSCAPES_CLASSES))
    res = import_checkpoint(path, arch, tmp_path / arch, metric={"miou": 79.0}, log=lambda _m: None)
    assert res.spec.backbone == "timm:resnet50c" and res.spec.head_channels == 32 and res.spec.output_stride == 8
    model = build_model(res.spec, res.folder / "model.safetensors")
    x = torch.rand(3, 64, 64, generator=G)
    batch, out = run(model, x)
    # the deep stem (ResNetV1c): 3 x (conv, BN, ReLU), from the mmseg tensors
    t = batch.images
    for i, (c, b) in enumerate((("stem.0", "stem.1"), ("stem.3", "stem.4"), ("stem.6", "stem.7"))):
        t = ref_conv(src, f"backbone.{c}", t, stride=2 if i == 0 else 1, padding=1)
        t = F.relu(ref_bn(src, f"backbone.{b}", t))
    stem = model.net.backbone.body.body
    with torch.no_grad():
        got = stem.act1(stem.bn1(stem.conv1(batch.images)))
    torch.testing.assert_close(got, t, rtol=1e-4, atol=1e-4)
    c4, c5 = out.taps["c4"], out.taps["c5"]
    assert c5.shape[-1] == 8  # output stride 8: layer3/4 dilated
    if arch == "deeplabv3":
        pooled = ref_convmodule(src, "decode_head.image_pool.1", F.adaptive_avg_pool2d(c5, 1))
        parts = [F.interpolate(pooled, size=c5.shape[-2:], mode="bilinear", align_corners=False)]
        for i, d in enumerate((1, 12, 24, 36)):
            pad = 0 if d == 1 else d
            parts.append(ref_convmodule(src, f"decode_head.aspp_modules.{i}", c5, padding=pad, dilation=d))
        feat = ref_convmodule(src, "decode_head.bottleneck", torch.cat(parts, 1), padding=1)
    else:
        parts = [c5]
        for i, s in enumerate((1, 2, 3, 6)):
            y = ref_convmodule(src, f"decode_head.psp_modules.{i}.1", F.adaptive_avg_pool2d(c5, s))
            parts.append(F.interpolate(y, size=c5.shape[-2:], mode="bilinear", align_corners=False))
        feat = ref_convmodule(src, "decode_head.bottleneck", torch.cat(parts, 1), padding=1)
    torch.testing.assert_close(out.taps["seg_feat"], feat, rtol=1e-4, atol=1e-4)
    logits = ref_conv(src, "decode_head.conv_seg", feat)
    torch.testing.assert_close(out.taps["seg_logits"], logits, rtol=1e-4, atol=1e-4)
    aux = ref_conv(src, "auxiliary_head.conv_seg", ref_convmodule(src, "auxiliary_head.convs.0", c4, padding=1))
    with torch.no_grad():
        torch.testing.assert_close(model.net.aux_classifier(c4), aux, rtol=1e-4, atol=1e-4)


# -- refusals -------------------------------------------------------------------------------------------
def test_unmapped_key_is_refused_with_its_name(retina: dict, tmp_path: Path) -> None:
    state = dict(retina["state"])
    state["bbox_head.cls_convs.0.conv.conv_offset.weight"] = torch.zeros(18, 64, 3, 3)  # a DCN offset
    state["neck.extra_attention.weight"] = torch.zeros(3)
    path = save_ckpt(tmp_path / "dcn.pth", state, "", coco80())
    with pytest.raises(ZooError, match=r"2 key\(s\) the --arch retinanet converter does not map: "
                                       r".*conv_offset\.weight.*neck\.extra_attention\.weight"):
        import_checkpoint(path, "retinanet", tmp_path / "x", log=lambda _m: None)
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_wrong_arch_and_missing_keys_are_refused(retina: dict, tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="not an mmdet FCOS checkpoint"):
        import_checkpoint(retina["path"], "fcos", tmp_path / "x", log=lambda _m: None)
    state = {k: v for k, v in retina["state"].items() if k != "bbox_head.reg_convs.3.conv.bias"}
    path = save_ckpt(tmp_path / "holes.pth", state, "", coco80())
    with pytest.raises(ZooError, match="missing key bbox_head.reg_convs.3.conv.bias"):
        import_checkpoint(path, "retinanet", tmp_path / "y", log=lambda _m: None)
    with pytest.raises(ConfigError, match="--arch maskrcnn"):
        import_checkpoint(retina["path"], "maskrcnn", tmp_path / "z")


class _Evil:
    def __reduce__(self):  # would run code on a full unpickle
        return (print, ("unpickled!",))


def test_checkpoint_with_python_objects_is_not_unpickled(retina: dict, tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"meta": {"hook": _Evil()}, "state_dict": retina["state"]}, path, pickle_protocol=2)
    with pytest.raises(ZooError, match=r"refused by torch.load\(weights_only=True\)"):
        import_checkpoint(path, "retinanet", tmp_path / "x", log=lambda _m: None)
    assert "unpickled!" not in capsys.readouterr().out


def test_cli_import_then_teacher_reference(retina: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kdcli.cli import app

    out = tmp_path / "r18-retina-mmdet"
    r = CliRunner().invoke(app, ["zoo", "import", str(retina["path"]), "--arch", "retinanet", "--out", str(out),
                                 "--metric", "box_map=31.7", "--set", "relu_before_extra_convs=true"])
    assert r.exit_code == 0, r.output
    spec = resolve_ref(str(out)).spec
    assert spec.extra_levels == "p6p7-from-c5"  # --set overrides the checkpoint's config
    assert spec.metric == {"box_map": 31.7} and spec.name == "retinanet_r18_fpn_1x_coco-abcdef12"
    bad = CliRunner().invoke(app, ["zoo", "import", str(retina["path"]), "--arch", "retinanet", "--set", "colour=red"])
    assert bad.exit_code != 0 and isinstance(bad.exception, ConfigError)
    assert "unknown import option" in str(bad.exception)
