"""Metrics: COCO box/mask AP through faster-coco-eval, and a confusion matrix for mIoU."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

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
) -> dict[str, float]:
    """COCO AP/AR of ``results`` (COCO result dicts: image_id, category_id, bbox xywh, score).

    Evaluates on every image of the ground truth, or only ``image_ids`` when given (e.g. a quick run
    on a subset); images without detections count as misses. Returns the 12 standard numbers
    (:data:`COCO_METRICS`). Empty ``results`` give all zeros. Otherwise an area bucket with no
    ground truth is reported as -1, as pycocotools does.
    """
    from faster_coco_eval import COCO, COCOeval_faster  # heavy C++ extension: import on use

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    ann_file = Path(ann_file)
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results))
    if not results:
        return dict.fromkeys(COCO_METRICS, 0.0)

    gt = COCO(load_json(ann_file), print_function=_quiet)
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
    return {name: float(v) for name, v in zip(COCO_METRICS, ev.stats[: len(COCO_METRICS)], strict=True)}


def detections_to_coco(
    detections: list[dict[str, Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int],
) -> list[dict]:
    """torchvision detector outputs (``boxes`` xyxy in original-image pixels, ``scores``, ``labels``)
    to COCO result dicts (xywh boxes, labels mapped back to the data set's category ids)."""
    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detection dicts for {len(image_ids)} image ids")
    if not label_to_cat_id:
        raise ValueError("label_to_cat_id is empty")
    lut = torch.full((max(label_to_cat_id) + 1,), -1, dtype=torch.int64)
    for label, cat_id in label_to_cat_id.items():
        lut[label] = cat_id
    out: list[dict] = []
    for det, image_id in zip(detections, image_ids, strict=True):
        boxes = det["boxes"].detach().float().cpu().reshape(-1, 4)
        if boxes.shape[0] == 0:
            continue
        labels = det["labels"].detach().cpu().long()
        if int(labels.min()) < 0 or int(labels.max()) >= lut.numel():
            raise ValueError(f"image {image_id}: label outside 0..{lut.numel() - 1} has no category id")
        cats = lut[labels]
        if bool((cats < 0).any()):
            missing = labels[cats < 0].unique().tolist()
            raise ValueError(f"image {image_id}: labels {missing} have no category id")
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        scores = det["scores"].detach().float().cpu()
        iid = int(image_id)
        out.extend(
            {"image_id": iid, "category_id": c, "bbox": b, "score": s}
            for b, c, s in zip(xywh.tolist(), cats.tolist(), scores.tolist(), strict=True)
        )
    return out


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
