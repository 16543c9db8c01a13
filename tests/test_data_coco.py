"""COCO loader on a miniature COCO 2017 tree written in the real layout: label spaces, crowd boxes,
images without annotations, instance masks, reference augmentations, and a short train + eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools.coco import COCO as PyCOCO
from torchvision import tv_tensors

from kdcli.data import CocoDetection, DataHints, build_dataset, data_hints
from kdcli.data.coco import coco80, slot_names
from kdcli.engine.evaluate import detections_to_coco
from kdcli.errors import DataError
from kdcli.zoo import class_names, get_spec

W, H = 64, 48

# (file id, [(category id, xywh box, iscrowd)]). Real COCO file names: 12-digit image id + .jpg.
TRAIN = {
    9: [(1, [4, 6, 20, 30], 0), (3, [30, 20, 28, 16], 0)],
    25: [(1, [0, 0, 40, 24], 1), (18, [40, 26, 20, 18], 0)],  # a crowd region and a dog
    30: [],  # no annotations at all
    34: [(1, [10, 10, 30, 20], 1)],  # only a crowd region: no usable box
    36: [(90, [8, 8, 12, 30], 0), (13, [36, 4, 20, 20], 0)],  # toothbrush (90), stop sign (13)
}
VAL = {
    139: [(1, [6, 4, 18, 36], 0), (3, [30, 24, 30, 18], 0), (1, [28, 0, 34, 20], 1)],
    285: [(18, [10, 10, 40, 30], 0)],
    632: [],
}


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.T.ravel().astype(np.int8)
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] == 1 else counts


def _write_split(root: Path, split: str, spec: dict, first_ann: int) -> int:
    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True)
    images, anns = [], []
    ann_id = first_ann
    rng = np.random.default_rng(len(spec))
    for image_id, objs in spec.items():
        name = f"{image_id:012d}.jpg"
        img = Image.fromarray(rng.integers(0, 60, (H, W, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for cat, (x, y, w, h), crowd in objs:
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=(40 + 2 * cat, 200 - cat, 120 + 50 * crowd))
            if crowd:
                mask = np.zeros((H, W), dtype=np.uint8)
                mask[y:y + h, x:x + w] = 1
                segm: object = {"counts": rle_counts(mask), "size": [H, W]}
            else:  # a polygon as COCO stores it: [x1, y1, x2, y2, ...] around the pixels
                segm = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": float(w * h), "iscrowd": crowd, "segmentation": segm})
            ann_id += 1
        img.save(img_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": W, "height": H, "license": 1,
                       "coco_url": f"http://images.cocodataset.org/{split}2017/{name}", "date_captured": ""})
    doc = {
        "info": {"description": "mini COCO 2017", "version": "1.0", "year": 2017},
        "licenses": [{"id": 1, "name": "CC BY 4.0", "url": ""}],
        "images": images,
        "annotations": anns,
        "categories": [{"supercategory": "thing", "id": i, "name": n} for i, n in coco80()],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return ann_id


def write_mini_coco(root: Path) -> Path:
    n = _write_split(root, "train", TRAIN, 1)
    _write_split(root, "val", VAL, n)
    return root


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mini_coco(tmp_path_factory.mktemp("coco"))


# ---------------------------------------------------------------- label spaces


def test_standard_categories_are_the_official_80() -> None:
    pairs = coco80()
    assert len(pairs) == 80 and pairs[0] == (1, "person") and pairs[-1] == (90, "toothbrush")
    ids = dict(pairs)
    assert ids[13] == "stop sign" and ids[44] == "bottle" and ids[67] == "dining table" and 12 not in ids
    assert [i for i in range(1, 91) if i not in ids] == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]


def test_default_label_space_is_torchvisions_category_ids(coco: Path) -> None:
    ds = CocoDetection(coco, "train")
    assert ds.label_space == "category-id"
    # exactly the zoo's `coco` classes, which torchvision's pretrained detectors predict
    assert ds.classes == class_names("coco", "detection") and ds.num_classes == 91
    assert ds.classes[12] == "stop sign" and ds.classes[11] == "N/A"
    assert ds.label_to_cat_id == {i: i for i, _ in coco80()}
    _, target = ds[ds.ids.index(36)]
    assert target["labels"].tolist() == [90, 13]  # label == category id


def test_contiguous_label_space_and_back(coco: Path) -> None:
    ds = CocoDetection(coco, "train", labels="contiguous")
    assert ds.classes == [n for _, n in coco80()] and ds.num_classes == 81
    _, target = ds[ds.ids.index(36)]
    assert target["labels"].tolist() == [80, 12]  # toothbrush is the 80th category, stop sign the 12th
    assert [ds.label_to_cat_id[int(v)] for v in target["labels"]] == [90, 13]
    assert all(ds.cat_id_to_label[ds.label_to_cat_id[k]] == k for k in range(1, 81))
    # results are written with category ids whichever space the model predicts in
    det = {"boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5]]), "scores": torch.tensor([0.9, 0.8]),
           "labels": target["labels"]}
    assert [r["category_id"] for r in detections_to_coco([det], [36], ds.label_to_cat_id)] == [90, 13]
    tv = CocoDetection(coco, "train")
    assert [r["category_id"] for r in detections_to_coco([{**det, "labels": torch.tensor([90, 13])}], [36],
                                                         tv.label_to_cat_id)] == [90, 13]
    # through --data: the same option in the spec string
    via_spec = build_dataset(f"coco:{coco}?labels=contiguous", "detection", "val", 64, train=False)
    assert via_spec.label_space == "contiguous" and via_spec.classes == ds.classes


def test_label_space_follows_the_model(coco: Path) -> None:
    """A model trained with 80 contiguous classes (e.g. imported from mmdetection) gets contiguous
    labels, a torchvision COCO model the 91-slot layout; the trainer passes the teacher's classes."""
    mmdet_like = DataHints(classes=[n for _, n in coco80()])
    assert build_dataset(f"coco:{coco}", "detection", "val", 64, False, hints=mmdet_like).label_space == "contiguous"
    tv = data_hints(get_spec("shapes-r18-fcos"), teacher=get_spec("r50-retina"))
    ds = build_dataset(f"coco:{coco}", "detection", "val", 64, False, hints=tv)
    assert ds.label_space == "category-id" and ds.classes == get_spec("r50-retina").classes


def test_nonstandard_categories(tmp_path: Path, coco: Path) -> None:
    doc = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    doc["categories"] = [{"id": 2, "name": "b"}, {"id": 5, "name": "e"}]
    doc["annotations"] = [dict(a, category_id=5) for a in doc["annotations"]]
    root = tmp_path / "c"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").symlink_to(coco / "val2017")
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    assert CocoDetection(root, "val").classes == ["b", "e"]  # auto: contiguous for a custom set
    ds = CocoDetection(root, "val", labels="category-id")
    assert ds.classes == ["N/A", "b", "N/A", "N/A", "e"] and ds[0][1]["labels"].unique().tolist() == [5]
    assert slot_names([(2, "b"), (5, "e")]) == ds.classes
    doc["categories"].append({"id": 0, "name": "zero"})
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="labels=category-id needs category ids >= 1"):
        CocoDetection(root, "val", labels="category-id")
    with pytest.raises(DataError, match="labels=ids: expected auto, category-id, contiguous"):
        CocoDetection(root, "val", labels="ids")


# ---------------------------------------------------------------- crowd, empty images, masks


def test_crowd_and_empty_images(coco: Path) -> None:
    train = build_dataset(f"coco:{coco}", "detection", "train", 64, train=True)
    assert train.ids == [9, 25, 36]  # 30 (no annotations) and 34 (crowd only) dropped for training
    keep = build_dataset(f"coco:{coco}?empty=keep", "detection", "train", 64, train=True)
    assert keep.ids == [9, 25, 30, 34, 36]
    val = build_dataset(f"coco:{coco}", "detection", "val", 64, train=False)
    assert val.ids == [139, 285, 632]  # evaluation keeps every image
    raw = CocoDetection(coco, "train")
    _, t = raw[raw.ids.index(25)]
    assert t["labels"].tolist() == [18] and t["boxes"].tolist() == [[40, 26, 60, 44]]  # the crowd box is out
    assert [a["iscrowd"] for a in raw.annotations(25)] == [1, 0]  # but kept in the raw annotations
    _, t = raw[raw.ids.index(30)]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)


def test_masks_match_pycocotools(coco: Path) -> None:
    ds = CocoDetection(coco, "val", masks=True)
    ref = PyCOCO(str(ds.ann_file))
    for i, image_id in enumerate(ds.ids):
        _, t = ds[i]
        anns = [a for a in ref.loadAnns(ref.getAnnIds(imgIds=[image_id])) if not a["iscrowd"]]
        assert isinstance(t["masks"], tv_tensors.Mask) and t["masks"].shape == (len(anns), H, W)
        for m, a in zip(t["masks"], anns, strict=True):
            assert torch.equal(m, torch.from_numpy(ref.annToMask(a)))
            x, y, w, h = a["bbox"]
            assert int(m.sum()) == w * h  # a rectangle polygon covers its box's pixels
    bad = json.loads(ds.ann_file.read_text())
    del bad["annotations"][0]["segmentation"]
    (ds.ann_file.parent / "instances_bad2017.json").write_text(json.dumps(bad))
    (coco / "bad2017").mkdir(exist_ok=True)
    with pytest.raises(DataError, match=r"annotations\[0\] has no 'segmentation'"):
        CocoDetection(coco, "bad", masks=True)


def test_reference_train_augmentation_moves_boxes_and_masks(coco: Path) -> None:
    hints = DataHints(masks=True, min_size=96, max_size=120)
    ds = build_dataset(f"coco:{coco}", "detection", "train", 64, train=True, hints=hints)
    raw = CocoDetection(coco, "train", masks=True)
    flips = set()
    for seed in range(6):
        torch.manual_seed(seed)
        img, t = ds[0]
        _, t0 = raw[0]
        # shorter side 48 -> 96 would make the longer 128 > 120: the longer side is capped at 120
        assert img.shape == (3, 90, 120) and img.dtype == torch.float32
        s = 120 / 64
        for box, mask in zip(t["boxes"].tolist(), t["masks"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert abs(box[0] - float(xs.min())) <= 1 and abs(box[2] - float(xs.max() + 1)) <= 1
            assert abs(box[1] - float(ys.min())) <= 1 and abs(box[3] - float(ys.max() + 1)) <= 1
        x0 = t0["boxes"][0, 0].item() * s
        flips.add(abs(t["boxes"][0, 0].item() - x0) > 1)
    assert flips == {True, False}
    # the resize draws no random number: the augmentation's random stream is the flip's alone
    from kdcli.data.transforms import ShorterSideResize

    torch.manual_seed(0)
    ShorterSideResize(96, 120)(tv_tensors.Image(torch.zeros(3, H, W, dtype=torch.uint8)))
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)


# ---------------------------------------------------------------- a short run on the tree


def test_train_and_eval_on_mini_coco(coco: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kdcli.cli import app

    run = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", "-m", "shapes-r18-fcos", "--data", f"coco:{coco}", "--out", str(run), "--epochs", "1", "-b", "2",
        "--image-size", "64", "--workers", "0", "--device", "cpu", "--max-train-images", "2", "--bn-recal", "0",
        "--warmup-iters", "0", "--optimizer", "adamw", "--lr", "1e-3"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    # the student was rebuilt for the data's label space: torchvision's 91 slots
    assert json.loads((run / "model.json").read_text())["model"]["classes"] == class_names("coco", "detection")
    res = CliRunner().invoke(app, ["eval", str(run), "--data", f"coco:{coco}", "--per-class", "--workers", "0",
                                   "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "toothbrush" in res.output and "stop sign" in res.output and "mAP" in res.output
    assert (tmp_path / "ev" / "predictions.json").is_file()
