"""Run a model over a validation loader and score it: COCO box (and mask) AP, or mIoU.

Detection follows torchvision's reference evaluation: the detector resizes each image itself, one
image per forward (no image is padded to another's size, so the score does not depend on the batch
size or the number of processes), and maps boxes (and pasted masks) back to the original image;
results go to faster-coco-eval against the annotation file. Segmentation follows mmseg/torchvision:
one confusion matrix over the whole split, at each label's full resolution. Logits are computed on
the evaluation-size input, either in one pass over the whole image (``slide=None``) or averaged over
overlapping windows (``slide=((crop_h, crop_w), (stride_h, stride_w))``, mmseg's ``mode='slide'``),
then bilinearly upsampled to the label's size before the argmax.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models import TapModel

Window = tuple[tuple[int, int], tuple[int, int]]  # ((crop_h, crop_w), (stride_h, stride_w))


@torch.no_grad()
def evaluate_model(
    model: TapModel, loader: Any, dataset: Any, device: torch.device, out_dir: Path | None = None,
    amp: str = "none", shard: Any = None, *, per_class: bool = False, slide: Window | None = None,
    label_ids_dir: Path | None = None, progress: bool = True, label: str = "eval",
) -> dict[str, Any]:
    """``shard`` (a :class:`~kdcli.engine.distributed.EvalShard`): ``loader`` holds this rank's share of
    the images; results are merged across ranks and every rank returns the same metrics.
    ``per_class`` adds per-category AP (detection); ``label_ids_dir`` writes Cityscapes labelId
    PNGs of the predictions (segmentation, single process). ``progress``: a bar on a terminal, a
    line every 30 s in a log (:func:`kdcli.progress.track`)."""
    from ..progress import track
    from ..runtime import autocast_ctx

    if progress and (shard is None or shard.is_main):
        loader = _Tracked(loader, track, label)

    was = model.training
    model.eval()
    try:
        if model.task == "detection":
            return _detection(model, loader, dataset, device, out_dir, amp, autocast_ctx, shard, per_class)
        fn = seg_logits_fn(model, device, amp, autocast_ctx)
        return evaluate_segmentation(fn, loader, dataset, device, shard, slide, label_ids_dir)
    finally:
        model.train(was)


class _Tracked:
    """``loader`` iterated with a progress display; its length unchanged."""

    def __init__(self, loader: Any, track: Callable[..., Any], label: str = "eval") -> None:
        self.loader, self.track, self.label = loader, track, label

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        return iter(self.track(self.loader, self.label))


def _detection(model: TapModel, loader: Any, dataset: Any, device: torch.device, out_dir: Path | None,
               amp: str, autocast_ctx: Any, shard: Any = None, per_class: bool = False) -> dict[str, Any]:
    from .evaluate import coco_evaluate, detections_to_coco

    results: list[dict] = []
    ids: list[int] = []
    with_masks = False
    for images, targets in loader:
        # one image per forward: a batch pads every image to the largest one, and the padding changes the
        # features near the borders, so the score would depend on --batch-size and on how images fall into
        # batches (and ranks); alone, each image is padded only to its own size divisor (torchvision's
        # reference evaluation also runs one image at a time)
        dets = []
        for im in images:
            batch = model.preprocess([im.to(device, non_blocking=True)])
            with autocast_ctx(device, amp):
                out = model(batch, losses=False, predict=True)
            dets += [{k: v.float() if v.is_floating_point() else v for k, v in d.items()}
                     for d in out.extras["detections"]]
        with_masks = with_masks or any("masks" in d for d in dets)
        image_ids = [int(t["image_id"]) for t in targets]
        ids.extend(image_ids)
        results.extend(detections_to_coco(dets, image_ids, dataset.label_to_cat_id, masks=with_masks))
    if shard is not None:
        results, ids = shard.gather_detections(results, ids)  # rank 0 scores; the others wait for its numbers
        if not shard.is_main:
            return shard.share(None)
    out_json = out_dir / "predictions.json" if out_dir is not None else None
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in results] if with_masks else results
    metrics = coco_evaluate(boxes, dataset.ann_file, out_json, image_ids=ids, per_class=per_class)
    if with_masks:
        # mask results without "bbox", as the reference passes them: loadRes then takes the area
        # from the mask, which decides the area range of unmatched detections
        segm = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        segm_json = out_dir / "predictions_segm.json" if out_dir is not None else None
        m = coco_evaluate(segm, dataset.ann_file, segm_json, iou_type="segm", image_ids=ids, per_class=per_class)
        metrics.update({f"mask_{k}": v for k, v in m.items()})
    return shard.share(metrics) if shard is not None else metrics


def seg_logits_fn(model: TapModel, device: torch.device, amp: str, autocast_ctx: Any) -> Callable[[Tensor], Tensor]:
    """``x (N,3,H,W) in [0,1] -> logits (N,C,h,w)`` float32, for any input size."""

    def fn(x: Tensor) -> Tensor:
        batch = model.preprocess(x)
        with autocast_ctx(device, amp):
            out = model(batch, need={"seg_logits"}, losses=False)
        return out.taps["seg_logits"].float()

    return fn


def infer_whole(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Logits for the whole input in one pass, upsampled to the input's size."""
    return F.interpolate(fn(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def infer_slide(fn: Callable[[Tensor], Tensor], x: Tensor, window: Window, max_batch: int = 8) -> Tensor:
    """Logits averaged over overlapping ``crop`` windows placed every ``stride`` (the last window of
    a row/column is shifted back to end at the border, as mmseg's slide inference)."""
    (ch, cw), (sh, sw) = window
    n, _, h, w = x.shape
    ys = sorted({max(min(i * sh, h - ch), 0) for i in range(max(h - ch + sh - 1, 0) // sh + 1)})
    xs = sorted({max(min(j * sw, w - cw), 0) for j in range(max(w - cw + sw - 1, 0) // sw + 1)})
    boxes = [(y, xx, min(y + ch, h), min(xx + cw, w)) for y in ys for xx in xs]
    crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])  # windows are all one size
    outs = torch.cat([infer_whole(fn, c) for c in crops.split(max_batch)])
    logits = None
    count = torch.zeros((1, 1, h, w), device=x.device)
    for k, (y1, x1, y2, x2) in enumerate(boxes):
        part = outs[k * n:(k + 1) * n]
        if logits is None:
            logits = torch.zeros((n, part.shape[1], h, w), device=x.device)
        logits[:, :, y1:y2, x1:x2] += part
        count[:, :, y1:y2, x1:x2] += 1
    assert logits is not None
    return logits / count


def _groups(images: list[Tensor]) -> list[list[int]]:
    """Indices of same-sized images, in order of first appearance (each group is one forward)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault((int(im.shape[-2]), int(im.shape[-1])), []).append(i)
    return list(by_size.values())


@torch.no_grad()
def evaluate_segmentation(
    fn: Callable[[Tensor], Tensor], loader: Any, dataset: Any, device: torch.device, shard: Any = None,
    slide: Window | None = None, label_ids_dir: Path | None = None,
) -> dict[str, Any]:
    """mIoU of ``fn`` over ``loader`` from one confusion matrix, at each label's resolution."""
    from .evaluate import ConfusionMatrix

    if label_ids_dir is not None:
        from ..data.cityscapes import CITYSCAPES_CLASSES, label_ids_path, write_label_ids

        if list(dataset.classes) != CITYSCAPES_CLASSES:
            raise ConfigError("--write-labelids: the data set's classes are not the 19 Cityscapes trainIds")
        if shard is not None:
            raise ConfigError("--write-labelids: run the evaluation in one process")
    cm = ConfusionMatrix(len(dataset.classes))
    position = 0
    for images, masks in loader:
        if isinstance(images, Tensor):  # stacked: labels at the input's size
            images, masks = list(images), list(masks)
        for group in _groups(images):
            x = torch.stack([images[i] for i in group]).to(device, non_blocking=True)
            logits = infer_whole(fn, x) if slide is None else infer_slide(fn, x, slide)
            for row, i in enumerate(group):
                target = masks[i].to(device, non_blocking=True)
                lg = logits[row:row + 1]
                if lg.shape[-2:] != target.shape[-2:]:
                    lg = F.interpolate(lg, size=target.shape[-2:], mode="bilinear", align_corners=False)
                pred = lg[0].argmax(0)
                cm.update(pred, target)
                if label_ids_dir is not None:
                    write_label_ids(pred, label_ids_path(label_ids_dir, dataset.image_path(position + i)))
        position += len(images)
    if shard is not None:
        cm.load(shard.reduce_confusion(cm.state))
    res = cm.compute()
    # NaN (class absent from GT and prediction) is not valid JSON: store null
    res["per_class_iou"] = [None if v != v else float(v) for v in res["per_class_iou"]]
    return res


def parse_slide(text: str) -> Window:
    """``"512x1024"`` or ``"512x1024:341x683"`` -> ((crop_h, crop_w), (stride_h, stride_w)); the
    default stride is 2/3 of the crop, rounded (mmseg's Cityscapes setting is 512x1024:341x683)."""

    def pair(s: str) -> tuple[int, int]:
        h, sep, w = s.lower().partition("x")
        try:
            hw = (int(h), int(w)) if sep else (int(h), int(h))
        except ValueError:
            raise ConfigError(f"--slide {text}: expected CROP[:STRIDE] as HxW, e.g. 512x1024") from None
        if min(hw) <= 0:
            raise ConfigError(f"--slide {text}: sizes must be positive")
        return hw

    crop_s, _, stride_s = text.partition(":")
    crop = pair(crop_s)
    stride = pair(stride_s) if stride_s else (round(crop[0] * 2 / 3), round(crop[1] * 2 / 3))
    if stride[0] > crop[0] or stride[1] > crop[1]:
        raise ConfigError(f"--slide {text}: the stride must not exceed the crop (windows would leave gaps)")
    return crop, stride
