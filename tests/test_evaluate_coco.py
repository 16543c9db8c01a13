"""COCO evaluation as the references do it: crowd regions ignored, mask AP, per-class AP, and the
same 12 numbers as pycocotools on the same predictions."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval
from test_data_coco import rle_counts, write_mini_coco  # tests/ is on sys.path (pytest rootdir)

from kdcli.data.coco import decode_masks
from kdcli.engine.evaluate import COCO_METRICS, coco_evaluate, detections_to_coco, masks_to_rle


def _gt(tmp_path: Path, anns: list[dict], cats: tuple[int, ...] = (1,)) -> Path:
    doc = {"images": [{"id": 1, "file_name": "1.jpg", "width": 100, "height": 100}],
           "annotations": [{"id": k + 1, "image_id": 1, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0, **a}
                           for k, a in enumerate(anns)],
           "categories": [{"id": c, "name": f"c{c}"} for c in cats]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(doc))
    return path


def _det(box: list[float], score: float, cat: int = 1) -> dict:
    return {"image_id": 1, "category_id": cat, "bbox": box, "score": score}


def test_crowd_region_is_ignored_not_a_false_positive(tmp_path: Path) -> None:
    person = {"category_id": 1, "bbox": [0, 0, 40, 40]}
    crowd = {"category_id": 1, "bbox": [50, 50, 40, 40], "iscrowd": 1}
    dets = [_det([0, 0, 40, 40], 0.5), _det([50, 50, 40, 40], 0.9), _det([55, 55, 30, 30], 0.8)]
    # Both high-scoring detections fall on the crowd region: matched to it, they are ignored.
    assert coco_evaluate(dets, _gt(tmp_path, [person, crowd]))["mAP"] == pytest.approx(1.0)
    # Without the crowd annotation they are false positives ranked first: precision 1/3 at recall 1.
    assert coco_evaluate(dets, _gt(tmp_path, [person]))["mAP"] == pytest.approx(1 / 3)


def _square(x: int, y: int, s: int) -> list[list[int]]:
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def test_mask_ap_perfect_and_half(tmp_path: Path) -> None:
    anns = [{"category_id": 1, "bbox": [10, 10, 40, 40], "segmentation": _square(10, 10, 40)},
            {"category_id": 1, "bbox": [60, 60, 30, 30], "segmentation": _square(60, 60, 30)}]
    gt = _gt(tmp_path, anns)
    masks = decode_masks([a["segmentation"] for a in anns], 100, 100)
    dets = [{"boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 90]]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([1, 1]), "masks": masks[:, None].float()}]
    res = detections_to_coco(dets, [1], {1: 1}, masks=True)
    segm = [{k: v for k, v in r.items() if k != "bbox"} for r in res]
    assert coco_evaluate(segm, gt, iou_type="segm")["mAP"] == pytest.approx(1.0)
    # a mask that covers only the top half of the first object: IoU 0.5 -> matched at 0.50 only
    half = masks.clone()
    half[0, 30:] = 0
    res = detections_to_coco([{**dets[0], "masks": half[:, None].float()}], [1], {1: 1}, masks=True)
    segm = [{k: v for k, v in r.items() if k != "bbox"} for r in res]
    m = coco_evaluate(segm, gt, iou_type="segm")
    # IoU threshold 0.50: both found (AP 1). The 9 thresholds above: the 0.9 mask is a false positive,
    # the 0.8 one a hit -> precision 1/2 at recall 1/2, so AP = 1/2 x 51/101 (recall points 0..0.5)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["mAP"] == pytest.approx((1.0 + 9 * 0.5 * 51 / 101) / 10)


def test_masks_to_rle_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 1, 17, 23, generator=g)
    rles = masks_to_rle(probs)
    assert all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    assert torch.equal(decode_masks(rles, 17, 23), (probs[:, 0] > 0.5).to(torch.uint8))
    assert masks_to_rle(torch.zeros(0, 1, 4, 4)) == []


def test_per_class_ap(tmp_path: Path) -> None:
    anns = [{"category_id": 3, "bbox": [0, 0, 40, 40]}, {"category_id": 3, "bbox": [50, 50, 40, 40]},
            {"category_id": 8, "bbox": [50, 0, 40, 40]}]
    gt = _gt(tmp_path, anns, cats=(3, 8, 9))
    dets = [_det([0, 0, 40, 40], 0.9, 3), _det([50, 0, 40, 40], 0.9, 8)]
    m = coco_evaluate(dets, gt, per_class=True)
    rows = {r["name"]: r for r in m["per_class"]}
    assert rows["c3"]["AP"] == pytest.approx(51 / 101) and rows["c8"]["AP"] == pytest.approx(1.0)
    assert rows["c9"]["AP"] is None  # no ground truth: left out of the mean, as COCOeval does
    assert m["mAP"] == pytest.approx((51 / 101 + 1.0) / 2)
    assert [r["id"] for r in m["per_class"]] == [3, 8, 9]


def _pycocotools(results: list[dict], ann_file: Path, iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = PyCOCO(str(ann_file))
        ev = PyCOCOeval(gt, gt.loadRes([dict(r) for r in results]), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def test_agrees_with_pycocotools(tmp_path: Path) -> None:
    """Noisy boxes and masks, false positives and crowd regions on the miniature COCO val split:
    faster-coco-eval and pycocotools give the same 12 numbers (boxes and masks)."""
    root = write_mini_coco(tmp_path / "coco")
    ann_file = root / "annotations" / "instances_val2017.json"
    doc = json.loads(ann_file.read_text())
    rng = np.random.default_rng(0)
    boxes, segms = [], []
    for a in doc["annotations"]:
        for _ in range(3):
            x, y, w, h = (np.asarray(a["bbox"], float) + rng.normal(0, 3, 4)).tolist()
            w, h = max(w, 2.0), max(h, 2.0)
            score = float(rng.uniform(0.05, 1))
            cat = a["category_id"] if rng.uniform() > 0.2 else 3
            boxes.append({"image_id": a["image_id"], "category_id": cat, "bbox": [x, y, w, h], "score": score})
            m = np.zeros((48, 64), np.uint8)
            m[max(int(y), 0):int(y + h), max(int(x), 0):int(x + w)] = 1
            segms.append({"image_id": a["image_id"], "category_id": cat, "score": score,
                          "segmentation": {"size": [48, 64], "counts": rle_counts(m)}})
    for image_id in (285, 632):  # false positives, one on an image without annotations
        boxes.append({"image_id": image_id, "category_id": 1, "bbox": [1.0, 2.0, 20.0, 10.0], "score": 0.7})
    # compressed RLE for the results, as detections_to_coco writes them
    segms = [{**s, "segmentation": masks_to_rle(decode_masks([s["segmentation"]], 48, 64)[:, None].float())[0]}
             for s in segms]
    for results, iou_type in ((boxes, "bbox"), (segms, "segm")):
        ours = coco_evaluate(results, ann_file, iou_type=iou_type)
        ref = _pycocotools(results, ann_file, iou_type)
        assert 0.05 < ours["mAP"] < 0.95  # a non-trivial case
        for name, want in zip(COCO_METRICS, ref, strict=True):
            assert ours[name] == pytest.approx(want, abs=1e-9), (iou_type, name)


def test_mask_rcnn_trains_on_masks_and_gets_mask_ap(tmp_path: Path) -> None:
    """A (tiny, untrained) torchvision Mask R-CNN: the COCO loader gives it instance masks to train on,
    and evaluation scores its pasted masks as segm AP next to box AP."""
    from dataclasses import replace

    from kdcli.data import build_dataset, collate_detection, data_hints
    from kdcli.engine.evaluate_model import evaluate_model
    from kdcli.models import build_model
    from kdcli.zoo import get_spec

    root = write_mini_coco(tmp_path / "coco")
    spec = replace(get_spec("r50-maskrcnn"), backbone="torchvision:resnet18", fpn_channels=32,
                   preprocess={"min_size": 64, "max_size": 96, "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225]})
    model = build_model(spec)
    hints = data_hints(spec)
    assert hints.masks and hints.min_size == 64
    train = build_dataset(f"coco:{root}", "detection", "train", 64, train=True, hints=hints)
    images, targets = collate_detection([train[0], train[1]])
    assert targets[0]["masks"].shape[0] == targets[0]["boxes"].shape[0] > 0
    model.train()
    out = model(model.preprocess(images, targets))
    assert out.losses["loss_mask"] > 0 and torch.isfinite(out.losses["loss_mask"])
    # untrained scores sit near 1/91: keep every detection so there are masks to score
    model.net.roi_heads.score_thresh = 0.0
    model.net.roi_heads.detections_per_img = 10
    val = build_dataset(f"coco:{root}", "detection", "val", 64, train=False, hints=hints)
    loader = torch.utils.data.DataLoader(val, batch_size=2, collate_fn=collate_detection)
    m = evaluate_model(model, loader, val, torch.device("cpu"), out_dir=tmp_path / "ev", per_class=True)
    assert {"mAP", "mask_mAP", "mask_AP50", "per_class", "mask_per_class"} <= set(m)
    segm = json.loads((tmp_path / "ev" / "predictions_segm.json").read_text())
    assert segm and all("bbox" not in r and r["segmentation"]["size"] == [48, 64] for r in segm)
    assert len(json.loads((tmp_path / "ev" / "predictions.json").read_text())) == len(segm)
