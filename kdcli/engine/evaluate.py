"""Metrics: COCO box/mask AP through faster-coco-eval, and a confusion matrix for mIoU."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.coco import load_json
from ..errors import DataError

COCO_METRICS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")



def _quiet(*_args: object, **_kw: object) -> None:
    """faster-coco-eval prints its summary table; kdcli reports the numbers itself."""


def coco_evaluate(
    results: list[dict],
    ann_file: Path,
    out_json: Path | None = None,
    iou_type: str = "bbox",
    image_ids: Sequence[int] | None = None,
    per_class: bool = False,
) -> dict[str, Any]:
    """COCO AP/AR of ``results`` (COCO result dicts: image_id, category_id, score, and ``bbox`` xywh
    or ``segmentation`` RLE for ``iou_type="segm"``) against the annotation file itself, so crowd
    regions are "ignore" exactly as COCOeval defines them.

    Evaluates on every image of the ground truth, or only ``image_ids`` when given (e.g. a quick run
    on a subset); images without detections count as misses. Returns the 12 standard numbers
    (:data:`COCO_METRICS`). Empty ``results`` give all zeros. Otherwise an area bucket with no
    ground truth is reported as -1, as pycocotools does. ``per_class`` adds ``per_class``: one
    ``{id, name, AP, AP50}`` per category (AP over IoU 0.50:0.95, all areas, 100 detections;
    None for a category without ground truth).
    """
    from faster_coco_eval import COCO, COCOeval_faster  # heavy C++ extension: import on use

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    ann_file = Path(ann_file)
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results))
    gt = COCO(load_json(ann_file), print_function=_quiet)
    if not results:
        out: dict[str, Any] = dict.fromkeys(COCO_METRICS, 0.0)
        if per_class:
            out["per_class"] = [{"id": c["id"], "name": c["name"], "AP": 0.0, "AP50": 0.0}
                                for c in gt.loadCats(sorted(gt.getCatIds()))]
        return out
    gt_ids = set(gt.getImgIds())
    unknown = sorted({int(r["image_id"]) for r in results} - gt_ids)
    if unknown:
        raise DataError(f"{ann_file}: detections refer to image ids it does not list, e.g. {unknown[:5]}")
    # loadRes adds keys (area, id, segmentation...) to the dicts it gets: give it copies.
    dt = gt.loadRes([dict(r) for r in results])
    ev = COCOeval_faster(gt, dt, iouType=iou_type, print_function=_quiet)
    if image_ids is not None:
        ev.params.imgIds = sorted({int(i) for i in image_ids} & gt_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    out = {name: float(v) for name, v in zip(COCO_METRICS, ev.stats[: len(COCO_METRICS)], strict=True)}
    if per_class:
        out["per_class"] = _per_class_ap(ev, gt)
    return out


def _per_class_ap(ev: Any, gt: Any) -> list[dict[str, Any]]:
    """AP per category from COCOeval's precision array [T, R, K, A, M] (area "all", maxDets 100),
    averaged over the cells that are defined (> -1), as ``summarize`` does for the overall AP."""
    prec = np.asarray(ev.eval["precision"])[:, :, :, 0, -1]  # T x R x K
    t50 = int(np.argmin(np.abs(np.asarray(ev.params.iouThrs) - 0.5)))
    rows = []
    for k, cat_id in enumerate(ev.params.catIds):
        p = prec[:, :, k]
        ap = p[p > -1]
        ap50 = p[t50][p[t50] > -1]
        rows.append({"id": int(cat_id), "name": gt.loadCats([cat_id])[0]["name"],
                     "AP": float(ap.mean()) if ap.size else None, "AP50": float(ap50.mean()) if ap50.size else None})
    return rows


def _label_lut(label_to_cat_id: Mapping[int, int]) -> Tensor:
    if not label_to_cat_id:
        raise ValueError("label_to_cat_id is empty")
    lut = torch.full((max(label_to_cat_id) + 1,), -1, dtype=torch.int64)
    for label, cat_id in label_to_cat_id.items():
        lut[label] = cat_id
    return lut


def detections_to_coco(
    detections: list[dict[str, Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int],
    masks: bool = False,
) -> list[dict]:
    """torchvision detector outputs (``boxes`` xyxy in original-image pixels, ``scores``, ``labels``
    and, with ``masks``, ``masks`` N x 1 x H x W probabilities) to COCO result dicts: xywh boxes,
    labels mapped back to the data set's category ids, masks thresholded at 0.5 and RLE-encoded.

    A label with no category id (background, an ``N/A`` slot of torchvision's 91-slot COCO
    layout) is dropped: COCOeval ignores categories absent from the ground truth anyway.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detection dicts for {len(image_ids)} image ids")
    lut = _label_lut(label_to_cat_id)
    out: list[dict] = []
    for det, image_id in zip(detections, image_ids, strict=True):
        boxes = det["boxes"].detach().float().cpu().reshape(-1, 4)
        if boxes.shape[0] == 0:
            continue
        labels = det["labels"].detach().cpu().long()
        inside = (labels >= 0) & (labels < lut.numel())
        cats = torch.where(inside, lut[labels.clamp(0, lut.numel() - 1)], torch.full_like(labels, -1))
        keep = cats >= 0
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)[keep]
        scores = det["scores"].detach().float().cpu()[keep]
        iid = int(image_id)
        rows = [{"image_id": iid, "category_id": c, "bbox": b, "score": s}
                for b, c, s in zip(xywh.tolist(), cats[keep].tolist(), scores.tolist(), strict=True)]
        if masks:
            for row, rle in zip(rows, masks_to_rle(det["masks"][keep.to(det["masks"].device)]), strict=True):
                row["segmentation"] = rle
        out.extend(rows)
    return out


def masks_to_rle(masks: Tensor, threshold: float = 0.5) -> list[dict]:
    """N x 1 x H x W (or N x H x W) mask probabilities -> compressed COCO RLEs (counts as str)."""
    from faster_coco_eval.core import mask as mask_api

    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.shape[0] == 0:
        return []
    binary = (masks.detach() > threshold).to(torch.uint8).cpu().numpy()
    rles = mask_api.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # H x W x N, column-major
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


class ConfusionMatrix:
    """Pixel confusion matrix (rows = ground truth, columns = prediction) for semantic segmentation.

    mIoU is the mean IoU over the classes whose union (GT pixels + predicted pixels) is non-empty,
    i.e. classes absent from both GT and prediction are skipped (nanmean, as mmseg and the
    torchvision reference do) rather than counted as 0 or 1. ``per_class_iou`` holds NaN for them.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Accumulate a batch of predicted and target class maps (any matching shapes, e.g. N,H,W)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        k = self.num_classes
        keep = target != self.ignore_index
        t = target[keep].long()
        p = pred[keep].long()
        if t.numel() == 0:
            return
        # One range check per batch: an out-of-range id would silently land in another cell.
        lo, hi = torch.aminmax(torch.stack([t.min(), t.max(), p.min(), p.max()]))
        if int(lo) < 0 or int(hi) >= k:
            raise ValueError(
                f"class ids must be in 0..{k - 1} (or ignore {self.ignore_index}), got {int(lo)}..{int(hi)}"
            )
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        if self.mat.device != counts.device:
            self.mat = self.mat.to(counts.device)
        self.mat += counts

    @property
    def state(self) -> Tensor:
        """The raw int64 matrix: sum it across processes (e.g. all_reduce) and :meth:`load` it back."""
        return self.mat

    def load(self, state: Tensor) -> None:
        self.mat = state.to(torch.int64).clone()

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.mat = self.mat + other.mat.to(self.mat.device)
        return self

    def reset(self) -> None:
        self.mat.zero_()

    def compute(self) -> dict:
        mat = self.mat.double().cpu()
        tp = mat.diag()
        union = mat.sum(0) + mat.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        present = ~iou.isnan()
        total = mat.sum()
        return {
            "mIoU": float(iou[present].mean()) if bool(present.any()) else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
            "per_class_iou": iou.tolist(),
        }
