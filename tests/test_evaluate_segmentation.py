"""Segmentation evaluation at the label's full resolution, and sliding-window inference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from kdcli.data import collate_segmentation
from kdcli.data.transforms import build_transforms
from kdcli.engine.evaluate_model import evaluate_segmentation, infer_slide, infer_whole, parse_slide
from kdcli.errors import ConfigError


def colour_model(num_classes: int):
    """A 'model' that reads the class off the red channel (class k drawn as k/10), at stride 2:
    logits = 10 x one-hot of the pooled colour. Deterministic, so metrics are hand-checkable."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        cls = (F.avg_pool2d(x[:, :1], 2) * 10).round().long().clamp(0, num_classes - 1)[:, 0]
        return F.one_hot(cls, num_classes).permute(0, 3, 1, 2).float() * 10

    return fn


def _sample(label: torch.Tensor, draw: torch.Tensor) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    img = (draw.float() / 10).expand(3, -1, -1).clone()
    return tv_tensors.Image((img * 255).round().to(torch.uint8)), tv_tensors.Mask(label)


def test_miou_at_full_resolution() -> None:
    """GT 40x80: left half class 0 with a 1-pixel row of class 2, right half class 1; the image shows
    only the halves. Evaluated at 20 px, the prediction is upsampled to 40x80 and every labelled
    pixel is counted once: IoU0 = 1560/1600, IoU1 = 1, IoU2 = 0."""
    label = torch.zeros(40, 80, dtype=torch.int64)
    label[:, 40:] = 1
    label[11, :40] = 2
    label[0, 0] = 255  # an ignored pixel
    draw = (label == 1).long()
    tf = build_transforms("segmentation", train=False, size=20)
    samples = [tf(*_sample(label, draw)) for _ in range(2)]
    assert samples[0][0].shape[-2:] == (20, 40) and samples[0][1].shape == (40, 80)
    loader = [collate_segmentation(samples)]
    assert isinstance(loader[0][0], list)  # full-resolution masks come as lists
    ds = SimpleNamespace(classes=["a", "b", "c"])
    res = evaluate_segmentation(colour_model(3), loader, ds, torch.device("cpu"))
    iou0 = (1600 - 40 - 1) / (1600 - 1)
    assert res["per_class_iou"] == pytest.approx([iou0, 1.0, 0.0])
    assert res["mIoU"] == pytest.approx((iou0 + 1.0) / 3)
    assert res["pixel_acc"] == pytest.approx((3200 - 41) / 3199)


def test_stacked_batches_and_slide_agree() -> None:
    label = torch.randint(0, 4, (2, 30, 44), generator=torch.Generator().manual_seed(0))
    label = label.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 2x2 blocks: the stride-2 model is exact
    images = (label[:, None].float() / 10).expand(-1, 3, -1, -1)
    ds = SimpleNamespace(classes=list("abcd"))
    whole = evaluate_segmentation(colour_model(4), [(images, label)], ds, torch.device("cpu"))
    assert whole["mIoU"] == pytest.approx(1.0)
    slide = evaluate_segmentation(colour_model(4), [(images, label)], ds, torch.device("cpu"),
                                  slide=((16, 24), (10, 14)))
    assert slide["mIoU"] == pytest.approx(1.0)


def test_slide_equals_whole_for_a_pixelwise_model() -> None:
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.rand(2, 3, 37, 53, generator=g)
    fn = conv.requires_grad_(False)
    ref = infer_whole(fn, x)
    for window in (((16, 24), (10, 15)), ((37, 53), (20, 20)), ((64, 64), (30, 30)), ((8, 53), (8, 53))):
        torch.testing.assert_close(infer_slide(fn, x, window), ref, rtol=1e-5, atol=1e-5)


def test_slide_averages_overlapping_windows() -> None:
    """A model that outputs 1 everywhere gives 1 everywhere after averaging (no window double
    counted, none missing), and a model that outputs its input width sees crop-sized inputs."""
    x = torch.zeros(1, 3, 20, 30)
    ones = infer_slide(lambda t: torch.ones(t.shape[0], 1, t.shape[2], t.shape[3]), x, ((12, 12), (5, 7)))
    assert torch.equal(ones, torch.ones(1, 1, 20, 30))
    width = infer_slide(lambda t: torch.full((t.shape[0], 1, t.shape[2], t.shape[3]), float(t.shape[3])), x,
                        ((12, 12), (5, 7)))
    assert torch.equal(width, torch.full((1, 1, 20, 30), 12.0))


def test_parse_slide() -> None:
    assert parse_slide("512x1024") == ((512, 1024), (341, 683))  # mmseg's Cityscapes setting
    assert parse_slide("512x1024:256x512") == ((512, 1024), (256, 512))
    assert parse_slide("96") == ((96, 96), (64, 64))
    for bad in ("axb", "0x4", "16x16:32x8"):
        with pytest.raises(ConfigError, match="--slide"):
            parse_slide(bad)
