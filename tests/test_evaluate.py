"""COCO evaluation and the segmentation confusion matrix on hand-computable cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdcli.engine.evaluate import COCO_METRICS, ConfusionMatrix, coco_evaluate, detections_to_coco
from kdcli.errors import DataError

# Two 100x100 images, two non-contiguous categories (2, 5), two objects per category.
# All boxes are 40x40 = 1600 px: "medium" (32^2..96^2), so APs/APl have no GT (-1).
GT_BOXES = [  # (ann id, image id, category id, xywh)
    (1, 1, 2, [0, 0, 40, 40]),
    (2, 1, 5, [50, 50, 40, 40]),
    (3, 2, 2, [10, 10, 40, 40]),
    (4, 2, 5, [55, 5, 40, 40]),
]


@pytest.fixture()
def ann_file(tmp_path: Path) -> Path:
    doc = {
        "info": {},
        "licenses": [],
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2)],
        "annotations": [
            {"id": a, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for a, i, c, b in GT_BOXES
        ],
        "categories": [
            {"id": 2, "name": "two", "supercategory": ""},
            {"id": 5, "name": "five", "supercategory": ""},
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(doc))
    return path


def _result(image_id: int, cat: int, bbox: list[float], score: float = 1.0) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


def test_perfect_predictions(ann_file: Path, tmp_path: Path) -> None:
    results = [_result(i, c, b) for _, i, c, b in GT_BOXES]
    out = tmp_path / "out" / "dets.json"
    m = coco_evaluate(results, ann_file, out_json=out)
    assert list(m) == list(COCO_METRICS)
    for k in ("mAP", "AP50", "AP75", "APm", "AR10", "AR100", "ARm"):
        assert m[k] == pytest.approx(1.0), k
    assert m["AR1"] == pytest.approx(1.0)  # one object per category per image
    assert m["APs"] == m["APl"] == -1.0  # no GT in those area ranges
    assert json.loads(out.read_text()) == results  # written as given, not polluted by loadRes
    assert "id" not in results[0]


def test_no_predictions(ann_file: Path, tmp_path: Path) -> None:
    m = coco_evaluate([], ann_file, out_json=tmp_path / "empty.json")
    assert m == dict.fromkeys(COCO_METRICS, 0.0)
    assert json.loads((tmp_path / "empty.json").read_text()) == []


def test_half_found_gives_recall_half(ann_file: Path) -> None:
    # One object of each category found exactly (IoU 1 > 0.95), no false positives.
    results = [_result(1, 2, [0, 0, 40, 40]), _result(1, 5, [50, 50, 40, 40])]
    m = coco_evaluate(results, ann_file)
    assert m["AR100"] == pytest.approx(0.5) and m["AR10"] == pytest.approx(0.5)
    # Precision 1 at recall thresholds 0.00..0.50 (51 of the 101), 0 above.
    assert m["mAP"] == pytest.approx(51 / 101) and m["AP50"] == pytest.approx(51 / 101)


def test_shifted_box_counts_at_iou50_not_iou75(ann_file: Path) -> None:
    # Shift every box by 10 px in x: overlap 30x40 = 1200, union 3200 - 1200 = 2000 -> IoU 0.6 exactly.
    results = [_result(i, c, [b[0] + 10, b[1], 40, 40]) for _, i, c, b in GT_BOXES]
    m = coco_evaluate(results, ann_file)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    # Matched at IoU thresholds 0.50, 0.55, 0.60 (a match needs IoU >= threshold): 3 of 10.
    assert m["mAP"] == pytest.approx(0.3)


def test_image_ids_restrict_evaluation(ann_file: Path) -> None:
    results = [_result(1, 2, [0, 0, 40, 40]), _result(1, 5, [50, 50, 40, 40])]
    assert coco_evaluate(results, ann_file, image_ids=[1])["mAP"] == pytest.approx(1.0)
    with pytest.raises(DataError, match=r"gt\.json: detections refer to image ids .*\[7\]"):
        coco_evaluate([_result(7, 2, [0, 0, 1, 1])], ann_file)


def test_detections_to_coco(ann_file: Path) -> None:
    dets = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0], [60.0, 55.0, 100.0, 95.0]]),
            "scores": torch.tensor([0.9, 0.4]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    res = detections_to_coco(dets, [1, 2], {1: 2, 2: 5})
    assert res == [
        {"image_id": 1, "category_id": 2, "bbox": [0.0, 0.0, 40.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 1, "category_id": 5, "bbox": [60.0, 55.0, 40.0, 40.0], "score": pytest.approx(0.4)},
    ]
    m = coco_evaluate(res, ann_file, image_ids=[1])
    assert m["AP50"] == pytest.approx(0.5)  # cat 2 found, cat 5 box has IoU 30*35/(3200-1050) < 0.5
    # labels without a category (an N/A slot, background, out of range) are dropped, as COCOeval
    # would ignore them: the other detections keep their order
    odd = {**dets[0], "boxes": dets[0]["boxes"].repeat(2, 1), "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
           "labels": torch.tensor([3, 1, 0, 9])}
    assert [(r["category_id"], r["score"]) for r in detections_to_coco([odd], [1], {1: 2, 2: 5})] == [
        (2, pytest.approx(0.8))]


# ---------------------------------------------------------------- confusion matrix

PRED = torch.tensor([[[0, 1], [1, 1]]])
TARGET = torch.tensor([[[0, 0], [1, 1]]])
# Rows = GT. GT 0: one pixel predicted 0, one predicted 1; GT 1: two pixels predicted 1.
# IoU(0) = 1 / (2 + 1 - 1) = 1/2;  IoU(1) = 2 / (2 + 3 - 2) = 2/3;  pixel acc = 3/4.


def test_confusion_matrix_hand_computed() -> None:
    cm = ConfusionMatrix(2)
    cm.update(PRED, TARGET)
    assert cm.state.tolist() == [[1, 1], [0, 2]] and cm.state.dtype == torch.int64
    r = cm.compute()
    assert r["per_class_iou"] == pytest.approx([1 / 2, 2 / 3])
    assert r["mIoU"] == pytest.approx(7 / 12) and r["pixel_acc"] == pytest.approx(3 / 4)


def test_confusion_matrix_ignore_and_absent_classes() -> None:
    cm = ConfusionMatrix(3, ignore_index=255)
    # Add a wrongly predicted (2) pixel whose GT is ignore: it must not count anywhere.
    pred = torch.cat([PRED, torch.tensor([[[2, 2], [0, 0]]])])
    target = torch.cat([TARGET, torch.tensor([[[255, 255], [255, 255]]])])
    cm.update(pred, target)
    r = cm.compute()
    assert math.isnan(r["per_class_iou"][2])  # in neither GT nor prediction: left out of the mean
    assert r["per_class_iou"][:2] == pytest.approx([1 / 2, 2 / 3])
    assert r["mIoU"] == pytest.approx(7 / 12) and r["pixel_acc"] == pytest.approx(3 / 4)
    # A class only predicted (never in GT) has IoU 0 and does count.
    cm.update(torch.tensor([[2]]), torch.tensor([[0]]))
    r = cm.compute()
    assert r["per_class_iou"][2] == 0.0 and r["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="class ids"):
        cm.update(torch.tensor([[3]]), torch.tensor([[0]]))
    empty = ConfusionMatrix(2).compute()
    assert empty["mIoU"] == 0.0 and empty["pixel_acc"] == 0.0 and all(map(math.isnan, empty["per_class_iou"]))


def test_confusion_matrix_merge_equals_single_pass() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (4, 8, 9), generator=g)
    target = torch.randint(0, 4, (4, 8, 9), generator=g)
    target[target == 3] = 255  # some ignore
    whole = ConfusionMatrix(4)
    whole.update(pred, target)
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    assert torch.equal(a.merge(b).state, whole.state)
    assert a.compute()["mIoU"] == pytest.approx(whole.compute()["mIoU"])
    c = ConfusionMatrix(4)
    c.load(whole.state * 2)  # e.g. after an all_reduce over two identical ranks
    assert c.compute()["mIoU"] == pytest.approx(whole.compute()["mIoU"])
    assert int(whole.state.sum()) == int((target != 255).sum())
