"""Every zoo architecture builds with no weights and exposes the documented taps."""

from __future__ import annotations

import pytest
import torch

from kdcli.errors import ZooError
from kdcli.models import build_model
from kdcli.models.taps import fpn_taps
from kdcli.zoo import get_spec, names, resolve_ref

ONE_STAGE = ["shapes-r18-retina", "shapes-r18-fcos", "timm-r18d-fcos"]


def _det_batch(model, n=2, size=64):
    images = [torch.rand(3, size, size) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])} for _ in range(n)]
    return model.preprocess(images, targets)


def test_manifest_has_required_entries():
    required = {"r18-retina", "r50-retina", "r101-retina", "r50-fcos", "r101-fcos", "mbv3-fasterrcnn",
                "r50-fasterrcnn", "r50-maskrcnn", "r18-deeplabv3", "r50-deeplabv3", "r101-deeplabv3",
                "mbv3-deeplabv3", "mbv3-lraspp"}
    assert required <= set(names())
    assert any(get_spec(n).backbone.startswith("timm:") and get_spec(n).task == "detection" for n in names())
    assert any(get_spec(n).backbone.startswith("timm:") and get_spec(n).task == "segmentation" for n in names())


def test_unknown_model_is_one_line_error():
    with pytest.raises(ZooError, match="unknown model 'r999-retina'"):
        resolve_ref("r999-retina")


@pytest.mark.parametrize("name", names())
def test_taps_of_every_entry(name):
    spec = get_spec(name)
    model = build_model(spec)
    info = model.tap_info
    if spec.task == "detection":
        levels = fpn_taps(info)
        assert len(levels) >= 3
        assert all(info[p].channels == spec.fpn_channels for p in levels)
        strides = [info[p].stride for p in levels]
        assert strides == sorted(strides)
        if spec.architecture in ("retinanet", "fcos"):
            assert levels == ["p3", "p4", "p5", "p6", "p7"]
            assert info["cls_logits"].channels == spec.num_classes
        elif spec.backbone.startswith("torchvision:resnet"):
            assert levels == ["p2", "p3", "p4", "p5", "p6"]
    else:
        assert {"c5", "seg_feat", "seg_logits"} <= set(info)
        assert info["seg_logits"].channels == spec.num_classes
        assert info["seg_logits"].stride in (8, 16)


@pytest.mark.parametrize("name", ONE_STAGE)
def test_one_stage_losses_equal_torchvision_forward(name):
    """Running the parts explicitly gives exactly the losses of ``model(images, targets)``."""
    torch.manual_seed(0)
    model = build_model(get_spec(name))
    model.train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    batch = model.preprocess(images, [dict(t) for t in targets])
    ours = model(batch).losses
    # BatchNorm in train mode: the reference pass sees the same batch, so statistics agree
    ref = model.net(images, [dict(t) for t in targets])
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)


def test_teacher_stops_after_the_neck_when_only_fpn_is_needed():
    model = build_model(get_spec("shapes-r18-retina")).eval()
    batch = _det_batch(model)
    with torch.no_grad():
        out = model(batch, need={"p3", "p4"}, losses=False)
    assert "p3" in out.taps and "cls_logits" not in out.taps and not out.losses


def test_eval_predictions_in_original_image_size():
    model = build_model(get_spec("shapes-r18-fcos")).eval()
    images = [torch.rand(3, 50, 70)]
    batch = model.preprocess(images)
    with torch.no_grad():
        out = model(batch, losses=False, predict=True)
    det = out.extras["detections"][0]
    assert set(det) >= {"boxes", "scores", "labels"}
    if len(det["boxes"]):
        assert float(det["boxes"][:, 2].max()) <= 70 + 1e-3 and float(det["boxes"][:, 3].max()) <= 50 + 1e-3


def test_two_stage_losses_in_train_mode():
    model = build_model(get_spec("mbv3-fasterrcnn").with_classes(["a", "b"]))
    model.train()
    out = model(_det_batch(model, size=96))
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} == set(out.losses)
    assert all(torch.isfinite(v) for v in out.losses.values())


@pytest.mark.parametrize("name", ["shapes-r18-deeplabv3", "shapes-mbv3-lraspp", "r50-fcn"])
def test_segmentation_loss_ignores_255(name):
    spec = get_spec(name).with_classes(["bg", "a", "b"])
    model = build_model(spec).train()
    x = torch.rand(2, 3, 64, 64)
    target = torch.full((2, 64, 64), 255, dtype=torch.long)
    target[:, :8, :8] = 1
    out = model(model.preprocess(x, target))
    # CE over the labelled 8x8 corner only: the 255 pixels contribute nothing
    up = torch.nn.functional.interpolate(out.taps["seg_logits"], size=(64, 64), mode="bilinear", align_corners=False)
    corner = up[:, :, :8, :8].permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.nn.functional.cross_entropy(corner.float(), torch.ones(corner.shape[0], dtype=torch.long))
    torch.testing.assert_close(out.losses["ce"], expected)


def test_teacher_input_renormalised_when_statistics_differ():
    a = build_model(get_spec("shapes-r18-fcos"))
    batch = _det_batch(a)
    from dataclasses import replace

    spec_b = replace(get_spec("shapes-r18-fcos"), preprocess={"min_size": 128, "max_size": 128,
                                                                   "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    b = build_model(spec_b)
    raw = batch.images * torch.tensor(a.std).view(1, 3, 1, 1) + torch.tensor(a.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(b.input_for(batch), (raw - 0.5) / 0.5)
    assert a.input_for(batch) is batch.images


def test_detector_tap_names_do_not_depend_on_a_small_first_input() -> None:
    # at 64 px P6 and P7 are both 1x1: names taken from that input would be p6a/p6b
    from dataclasses import replace

    spec = get_spec("shapes-r18-fcos")
    spec = replace(spec, preprocess={**spec.preprocess, "min_size": 64, "max_size": 64})
    model = build_model(spec, None).eval()
    batch = model.preprocess([torch.rand(3, 64, 64)])
    with torch.no_grad():
        out = model(batch, need=None, losses=False)
    assert [k for k in out.taps if k.startswith("p")] == ["p3", "p4", "p5", "p6", "p7"]


def test_strided_convolutions_run_float32_on_narrow_maps_under_cpu_autocast():
    """oneDNN's CPU bf16 stride-2 convolution is wrong on maps 1–2 px wide (kdcli/models/narrow_conv.py): every
    strided convolution of a built model computes those in float32 (the float32 result exactly), the rest in bf16
    under autocast, and its state dict loads into a plain nn.Conv2d."""
    from kdcli.models.narrow_conv import NarrowSafeConv2d

    model = build_model(get_spec("shapes-r18-fcos"))
    strided = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d) and max(m.stride) > 1]
    assert strided and all(type(m) is NarrowSafeConv2d for m in strided if max(m.kernel_size) > 1)
    assert all(type(m) is torch.nn.Conv2d for m in model.net.modules()  # stride 1 and 1×1 convolutions untouched
               if type(m) in (torch.nn.Conv2d, NarrowSafeConv2d) and (max(m.stride) == 1 or max(m.kernel_size) == 1))
    conv = model.net.backbone.fpn.extra_blocks.p7  # P6 → P7, 3×3 stride 2
    torch.manual_seed(0)
    for width, want in ((1, torch.float32), (2, torch.float32), (3, torch.bfloat16)):
        x = torch.randn(2, conv.in_channels, 17, width)
        ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        assert y.dtype == want
        if want == torch.float32:
            assert torch.equal(y, ref)
        else:
            torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    assert torch.equal(conv(x), ref)  # no autocast: the plain convolution
    # its weights load strictly into a plain nn.Conv2d (checkpoints are interchangeable)
    plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=2, padding=1)
    plain.load_state_dict(conv.state_dict(), strict=True)
    assert torch.equal(plain(x), ref)


@pytest.mark.parametrize("name", ["shapes-r18-fcos", "shapes-r18-retina"])
def test_bf16_autocast_keeps_anchors_and_task_losses_in_float32_past_1024_px(name):
    """bf16 holds integers exactly only up to 256: anchors built in the features' dtype past 1024 px got a
    height of 0 (FCOS: infinite regression target, NaN centerness). They are built in float32 now. The 32 px width
    also gives 1–2 px wide maps in layer4, P6 and P7, where CPU bf16 strided convolutions are wrong on AMX CPUs
    (NaN losses in 8 of 12 runs before kdcli/models/narrow_conv.py)."""
    from kdcli.models import Batch

    torch.manual_seed(0)
    model = build_model(get_spec(name)).train()
    h, w = 1056, 32  # a tall input, as COCO portrait images are at 800/1333
    x = torch.randn(1, 3, h, w)
    boxes = torch.tensor([[2.0, 1020.0, 30.0, 1050.0], [4.0, 1030.0, 20.0, 1044.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])}]
    batch = Batch(x, [(h, w)], [(h, w)], targets)
    ref = model(batch).extras["anchors"][0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    anchors = out.extras["anchors"][0]
    assert anchors.dtype == torch.float32 and torch.equal(anchors, ref)
    assert (anchors[:, 3] - anchors[:, 1]).min() > 0
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values()), out.losses


def test_bf16_autocast_runs_the_two_stage_heads_in_float32_past_1024_px():
    from dataclasses import replace

    from kdcli.models import Batch

    torch.manual_seed(0)
    spec = replace(get_spec("shapes-r18-fcos"), architecture="fasterrcnn", extra_levels="pool")
    model = build_model(spec).train()
    h, w = 1056, 32
    x = torch.randn(1, 3, h, w)
    targets = [{"boxes": torch.tensor([[2.0, 1020.0, 30.0, 1050.0]]), "labels": torch.tensor([1])}]
    seen: list[torch.dtype] = []
    hook = model.net.rpn.anchor_generator.register_forward_hook(lambda m, i, o: seen.extend(a.dtype for a in o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(Batch(x, [(h, w)], [(h, w)], targets)).losses
    hook.remove()
    assert seen == [torch.float32]
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"} <= set(losses)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses


@pytest.mark.parametrize("variant", ["shapes-r18-retina", "shapes-r18-fcos", "mmdet-fcos"])
def test_teacher_runs_only_the_classification_branch_for_cls_logits(variant: str):
    # a logit method's teacher (KD, SAMKD's SLD) gets the same class logits without the box branch
    import dataclasses

    spec = get_spec("shapes-r18-fcos" if variant == "mmdet-fcos" else variant)
    if variant == "mmdet-fcos":  # kdcli/models/mm.py's ScaledFCOSHead (imported mmdet layouts)
        spec = dataclasses.replace(spec, style="mmdet", fcos_centerness="cls", fcos_regression="exp")
    torch.manual_seed(0)
    model = build_model(spec).eval()
    batch = _det_batch(model)
    calls: list[str] = []
    with torch.no_grad():
        _ = model.tap_info  # the naming dry run, before counting
        hook = model.net.head.regression_head.conv.register_forward_hook(lambda *a: calls.append("reg"))
        full = model(batch, need={"cls_logits", "head"}, losses=False)
        assert calls == ["reg"] * len(full.extras["num_anchors_per_level"]) and "head" in full.extras
        calls.clear()
        only = model(batch, need={"p3", "cls_logits"}, losses=False)
    hook.remove()
    assert calls == []  # the second call never ran the box branch
    assert "head" not in only.extras and "anchors" not in only.extras and "p3" in only.taps
    torch.testing.assert_close(only.taps["cls_logits"], full.taps["cls_logits"], rtol=0, atol=0)
