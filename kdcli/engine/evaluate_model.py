"""Run a model over a validation loader and score it (COCO box AP or mIoU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models import TapModel


@torch.no_grad()
def evaluate_model(
    model: TapModel, loader: Any, dataset: Any, device: torch.device, out_dir: Path | None = None,
    amp: str = "none",
) -> dict[str, Any]:
    from .trainer import autocast_ctx

    was = model.training
    model.eval()
    try:
        if model.task == "detection":
            return _detection(model, loader, dataset, device, out_dir, amp, autocast_ctx)
        return _segmentation(model, loader, dataset, device, amp, autocast_ctx)
    finally:
        model.train(was)


def _detection(model: TapModel, loader: Any, dataset: Any, device: torch.device, out_dir: Path | None,
               amp: str, autocast_ctx: Any) -> dict[str, Any]:
    from .evaluate import coco_evaluate, detections_to_coco

    results: list[dict] = []
    ids: list[int] = []
    for images, targets in loader:
        batch = model.preprocess([im.to(device) for im in images])
        with autocast_ctx(device, amp):
            out = model(batch, losses=False, predict=True)
        dets = [{k: v.float() if v.is_floating_point() else v for k, v in d.items()}
                for d in out.extras["detections"]]
        image_ids = [int(t["image_id"]) for t in targets]
        ids.extend(image_ids)
        results.extend(detections_to_coco(dets, image_ids, dataset.label_to_cat_id))
    out_json = out_dir / "predictions.json" if out_dir is not None else None
    return coco_evaluate(results, dataset.ann_file, out_json, image_ids=ids)


def _segmentation(model: TapModel, loader: Any, dataset: Any, device: torch.device, amp: str,
                  autocast_ctx: Any) -> dict[str, Any]:
    from .evaluate import ConfusionMatrix

    cm = ConfusionMatrix(len(dataset.classes))
    for images, masks in loader:
        batch = model.preprocess(images.to(device))
        with autocast_ctx(device, amp):
            out = model(batch, losses=False, predict=True)
        cm.update(out.extras["pred"].cpu(), masks)
    res = cm.compute()
    # NaN (class absent from GT and prediction) is not valid JSON: store null
    res["per_class_iou"] = [None if v != v else float(v) for v in res["per_class_iou"]]
    return res
