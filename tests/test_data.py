"""Synthetic data set, loaders, transforms and collate functions."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from faster_coco_eval import COCO
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

import kdcli.data as data
from kdcli.data import (
    CocoDetection,
    SemanticFolder,
    build_dataset,
    build_transforms,
    collate_detection,
    collate_segmentation,
    subset,
)
from kdcli.data.shapes import CATEGORY_IDS, CLASSES, ensure_shapes, write_shapes
from kdcli.errors import DataError

# torchvision 0.29 flags its (still working) image decoders as deprecated in favour of torchcodec.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

N_TRAIN, N_VAL, SIZE, SEED = 10, 6, 64, 3
SEG_CLASSES = ["background", *CLASSES]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), N_TRAIN, N_VAL, SIZE, SEED)


def _json(root: Path, split: str) -> dict:
    return json.loads((root / "coco" / "annotations" / f"instances_{split}2017.json").read_text())


def _stem(image_id: int) -> str:
    return f"shapes_{image_id:06d}_000019"


# ---------------------------------------------------------------- synthetic data set


def test_write_is_deterministic(root: Path, tmp_path: Path) -> None:
    again = write_shapes(tmp_path / "again", N_TRAIN, N_VAL, SIZE, SEED)
    rel = [
        "VERSION",
        "coco/annotations/instances_train2017.json",
        "coco/annotations/instances_val2017.json",
        "coco/train2017/000000000001.jpg",
        f"coco/val2017/{N_TRAIN + 1:012d}.jpg",
        f"cityscapes/leftImg8bit/train/shapes/{_stem(2)}_leftImg8bit.png",
        f"cityscapes/gtFine/val/shapes/{_stem(N_TRAIN + 2)}_gtFine_labelTrainIds.png",
    ]
    for r in rel:
        assert (root / r).read_bytes() == (again / r).read_bytes(), r
    other = write_shapes(tmp_path / "other", N_TRAIN, N_VAL, SIZE, SEED + 1)
    assert _json(other, "train") != _json(root, "train")


def test_coco_schema_counts_and_boxes(root: Path) -> None:
    assert (root / "VERSION").read_text().startswith(f"shapes-v1 size={SIZE} n_train={N_TRAIN}")
    ann_ids, img_ids = set(), set()
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        doc = _json(root, split)
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(doc)
        assert len(doc["images"]) == n
        assert [c["id"] for c in doc["categories"]] == list(CATEGORY_IDS) == [1, 3, 7]  # non-contiguous
        assert [c["name"] for c in doc["categories"]] == list(CLASSES)
        per_image = {im["id"]: 0 for im in doc["images"]}
        for im in doc["images"]:
            assert (root / "coco" / f"{split}2017" / im["file_name"]).is_file()
            assert (im["width"], im["height"]) == (SIZE, SIZE)
        for a in doc["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and w >= 1 and h >= 1
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0
            assert a["category_id"] in CATEGORY_IDS
            per_image[a["image_id"]] += 1
        assert all(1 <= k <= 4 for k in per_image.values())
        img_ids |= set(per_image)
        ann_ids |= {a["id"] for a in doc["annotations"]}
    assert len(img_ids) == N_TRAIN + N_VAL  # unique across splits, as in COCO


def test_semantic_labels_match_instances(root: Path) -> None:
    """faster-coco-eval decodes each instance mask; its pixels carry the class in the label png,
    its pixel count is ``area`` and its extent is ``bbox``; all instances cover all foreground."""
    ann_file = root / "coco" / "annotations" / "instances_val2017.json"
    coco = COCO(str(ann_file))
    cat_to_train = {cid: i + 1 for i, cid in enumerate(CATEGORY_IDS)}
    for image_id in coco.getImgIds():
        label = np.array(Image.open(
            root / "cityscapes" / "gtFine" / "val" / "shapes" / f"{_stem(image_id)}_gtFine_labelTrainIds.png"
        ))
        assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
        union = np.zeros_like(label, dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            mask = coco.annToMask(ann).astype(bool)
            assert mask.sum() == ann["area"]
            assert not (union & mask).any()  # visible masks do not overlap
            union |= mask
            assert (label[mask] == cat_to_train[ann["category_id"]]).all()
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ((label > 0) == union).all()


def test_ensure_shapes_writes_once_and_rewrites_on_change(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KDCLI_HOME", str(tmp_path / "home"))
    root = ensure_shapes(n_train=3, n_val=2, size=32)
    assert root == tmp_path / "home" / "data" / "shapes-v1-32"
    assert (root / "VERSION").read_text().strip() == "shapes-v1 size=32 n_train=3 n_val=2 seed=0"
    marker = root / "coco" / "marker"
    marker.write_text("x")
    assert ensure_shapes(n_train=3, n_val=2, size=32) == root and marker.exists()  # untouched
    ensure_shapes(n_train=4, n_val=2, size=32)
    assert not marker.exists() and len(_json(root, "train")["images"]) == 4
    assert sorted(p.name for p in root.parent.iterdir()) == ["shapes-v1-32"]  # no temp leftovers


# ---------------------------------------------------------------- loaders


def test_coco_loader_reads_back_json(root: Path) -> None:
    ds = CocoDetection(root / "coco", "train")
    doc = _json(root, "train")
    assert len(ds) == N_TRAIN and ds.ids == sorted(im["id"] for im in doc["images"])
    assert ds.classes == list(CLASSES) and ds.num_classes == 4
    assert ds.label_to_cat_id == {1: 1, 2: 3, 3: 7}
    assert all(ds.label_to_cat_id[ds.cat_id_to_label[c]] == c for c in CATEGORY_IDS)
    for i in range(len(ds)):
        image, target = ds[i]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert image.shape == (3, SIZE, SIZE) and target["orig_size"] == (SIZE, SIZE)
        assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
        assert target["boxes"].canvas_size == (SIZE, SIZE) and target["boxes"].dtype == torch.float32
        anns = [a for a in doc["annotations"] if a["image_id"] == target["image_id"]]
        want = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), want, atol=1e-4, rtol=0)
        cats = [ds.label_to_cat_id[int(v)] for v in target["labels"]]
        assert cats == [a["category_id"] for a in anns] and target["labels"].dtype == torch.int64
        assert target["iscrowd"].tolist() == [0] * len(anns)


def _coco_tree(tmp_path: Path, doc: dict | str, files: dict[str, bytes] | None = None) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (root / "annotations" / "instances_val2017.json").write_text(text)
    for name, blob in (files or {}).items():
        (root / "val2017" / name).write_bytes(blob)
    return root


def _doc(anns: list[dict]) -> dict:
    return {
        "images": [{"id": 5, "file_name": "a.jpg", "width": 20, "height": 10}],
        "annotations": anns,
        "categories": [{"id": 9, "name": "b"}, {"id": 4, "name": "a"}],
    }


def test_coco_crowd_and_degenerate_boxes_are_dropped(tmp_path: Path) -> None:
    buf = tmp_path / "a.jpg"
    Image.new("RGB", (20, 10), (9, 9, 9)).save(buf)
    anns = [
        {"id": 1, "image_id": 5, "category_id": 9, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 4, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        {"id": 3, "image_id": 5, "category_id": 4, "bbox": [1, 1, 0.5, 5], "iscrowd": 0},
    ]
    ds = CocoDetection(_coco_tree(tmp_path, _doc(anns), {"a.jpg": buf.read_bytes()}), "val")
    assert ds.classes == ["a", "b"]  # sorted by category id
    _, target = ds[0]
    assert target["labels"].tolist() == [2] and target["boxes"].tolist() == [[1, 1, 6, 6]]
    assert len(ds.annotations(5)) == 3  # raw annotations kept for later (masks, crowd)
    only_crowd = CocoDetection(ds.root, "val", keep_empty=False)
    assert len(only_crowd) == 1
    empty = _doc([anns[1]])
    (ds.ann_file).write_text(json.dumps(empty))
    assert len(CocoDetection(ds.root, "val", keep_empty=False)) == 0
    assert len(CocoDetection(ds.root, "val", keep_empty=True)) == 1


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    root = _coco_tree(tmp_path, '{\n  "images": [,]\n}')
    with pytest.raises(DataError, match=r"instances_val2017\.json: invalid JSON at line 2"):
        CocoDetection(root, "val")


def test_missing_keys_and_unknown_category(tmp_path: Path) -> None:
    root = _coco_tree(tmp_path, {"images": [], "annotations": []})
    with pytest.raises(DataError, match="instances_val2017.json: missing required key.*categories"):
        CocoDetection(root, "val")
    bad = _doc([{"id": 1, "image_id": 5, "category_id": 9}])
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"annotations\[0\] is missing required key\(s\) bbox"):
        CocoDetection(root, "val")
    bad = _doc([{"id": 1, "image_id": 5, "category_id": 2, "bbox": [0, 0, 1, 1]}])
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="category_id 2 not listed"):
        CocoDetection(root, "val")


def test_missing_folders(tmp_path: Path, root: Path) -> None:
    with pytest.raises(DataError, match=f"COCO folder {tmp_path / 'nope'} does not exist.*instances_val2017"):
        CocoDetection(tmp_path / "nope", "val")
    with pytest.raises(DataError, match="instances_test2017.json not found"):
        CocoDetection(root / "coco", "test")
    with pytest.raises(DataError, match="does not exist"):
        SemanticFolder(tmp_path / "nope", "val", classes=SEG_CLASSES)
    with pytest.raises(DataError, match="leftImg8bit"):
        SemanticFolder(root / "cityscapes", "test", classes=SEG_CLASSES)


def test_corrupted_image_names_file(tmp_path: Path) -> None:
    root = _coco_tree(tmp_path, _doc([]), {"a.jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg"})
    ds = CocoDetection(root, "val")
    with pytest.raises(DataError, match=r"val2017/a\.jpg: corrupt JPEG file \(Image is incomplete"):
        ds[0]
    (root / "val2017" / "a.jpg").unlink()
    with pytest.raises(DataError, match=r"a\.jpg: image file not found"):
        ds[0]


def _copy_semantic(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cs"
    shutil.copytree(root / "cityscapes", dst)
    return dst


def test_semantic_loader(root: Path) -> None:
    ds = SemanticFolder(root / "cityscapes", "val", classes=SEG_CLASSES)
    assert len(ds) == N_VAL and ds.num_classes == 4 and ds.classes == SEG_CLASSES
    coco = CocoDetection(root / "coco", "val")
    for i in range(len(ds)):
        image, mask = ds[i]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert image.shape == (3, SIZE, SIZE)
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (SIZE, SIZE)
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3}
        # Same picture as the COCO split (PNG there, JPEG q95 here).
        assert (image.float() - coco[i][0].float()).abs().mean() < 12  # unrelated images: ~60


def test_semantic_missing_label_and_bad_values(root: Path, tmp_path: Path) -> None:
    cs = _copy_semantic(root, tmp_path)
    label = cs / "gtFine" / "val" / "shapes" / f"{_stem(N_TRAIN + 1)}_gtFine_labelTrainIds.png"
    arr = np.array(Image.open(label))
    label.unlink()
    stem = _stem(N_TRAIN + 1)
    with pytest.raises(DataError, match=f"{label.name} not found for image .*{stem}_leftImg8bit"):
        SemanticFolder(cs, "val", classes=SEG_CLASSES)
    arr[0, 0] = 9
    Image.fromarray(arr).save(label)
    ds = SemanticFolder(cs, "val", classes=SEG_CLASSES)
    with pytest.raises(DataError, match=f"{label.name}: label value 9 is not a class index"):
        ds[0]
    arr[0, 0] = 255  # ignore is fine
    Image.fromarray(arr).save(label)
    assert int(ds[0][1][0, 0]) == 255
    Image.fromarray(np.stack([arr] * 3, -1)).save(label)
    with pytest.raises(DataError, match="single-channel"):
        ds[0]


def test_semantic_id_map(root: Path, tmp_path: Path) -> None:
    cs = _copy_semantic(root, tmp_path)
    label = cs / "gtFine" / "val" / "shapes" / f"{_stem(N_TRAIN + 1)}_gtFine_labelTrainIds.png"
    raw = np.array([[7, 26, 3], [0, 7, 200]], dtype=np.uint8)
    big = np.zeros((SIZE, SIZE), dtype=np.uint8)
    big[:2, :3] = raw
    Image.fromarray(big).save(label)
    ds = SemanticFolder(cs, "val", classes=SEG_CLASSES, id_map={7: 1, 26: 3, 0: 0})
    got = ds[0][1][:2, :3].tolist()
    assert got == [[1, 3, 255], [0, 1, 255]]  # unmapped ids (3, 200) become ignore


# ---------------------------------------------------------------- transforms


def test_detection_flip_keeps_boxes_on_objects(root: Path) -> None:
    ds = CocoDetection(root / "coco", "val")
    coco = COCO(str(ds.ann_file))
    tf = build_transforms("detection", train=True, size=SIZE)
    image, target = ds[0]
    masks = np.stack([coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=[target["image_id"]]))])
    target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
    flipped_seen = False
    for seed in range(8):
        torch.manual_seed(seed)
        img, t = tf(image, dict(target))
        assert img.dtype == torch.float32 and float(img.max()) <= 1.0
        flipped = torch.allclose(img, TF.horizontal_flip(image).float() / 255)
        assert flipped or torch.allclose(img, image.float() / 255)
        flipped_seen |= flipped
        for box, mask in zip(t["boxes"].tolist(), t["masks"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert flipped_seen
    eval_img, eval_t = build_transforms("detection", train=False, size=SIZE)(image, target)
    assert eval_img.dtype == torch.float32 and torch.equal(eval_t["boxes"], target["boxes"])


def test_segmentation_train_crop_values_and_alignment() -> None:
    size = 48
    label = torch.zeros(40, 56, dtype=torch.int64)
    label[5:30, 10:25] = 1
    label[12:38, 30:50] = 3
    label[0:4, :] = 255
    image = tv_tensors.Image((label.clamp(max=4) * 50).to(torch.uint8).expand(3, -1, -1).clone())
    tf = build_transforms("segmentation", train=True, size=size)
    padded = False
    for seed in range(12):
        torch.manual_seed(seed)
        img, mask = tf(image, tv_tensors.Mask(label))
        assert img.shape == (3, size, size) and mask.shape == (size, size) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}
        # Image and mask moved together: away from borders the pixel encodes its class.
        real = mask != 255
        agree = ((img[0] * 255 / 50).round().long() == mask)[real].float().mean()
        assert agree > 0.9
        padded |= bool(((mask == 255) & (img[0] == 0)).any())
    assert padded  # small scales are padded: image with 0, mask with ignore
    img, mask = build_transforms("segmentation", train=False, size=size)(image, tv_tensors.Mask(label))
    assert img.shape[-2:] == (48, 67) and img.dtype == torch.float32  # shorter side to size
    assert torch.equal(mask, label)  # the label keeps its full resolution: metrics are computed there


# ---------------------------------------------------------------- entry point, subset, collate


def test_build_dataset_specs(root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "ensure_shapes", lambda size: root)
    det = build_dataset("shapes", "detection", "val", SIZE, train=False)
    assert det.classes == list(CLASSES) and det.num_classes == 4 and len(det) == N_VAL
    seg = build_dataset("shapes", "segmentation", "train", SIZE, train=True)
    assert seg.classes == SEG_CLASSES and seg.num_classes == 4 and len(seg) == N_TRAIN
    assert seg[0][0].dtype == torch.float32
    assert build_dataset(f"coco:{root / 'coco'}", "detection", "train", SIZE, train=True).num_classes == 4
    cs = _copy_semantic(root, tmp_path)
    assert build_dataset(f"semantic:{cs}", "segmentation", "val", SIZE, False).num_classes == 19  # Cityscapes
    (cs / "classes.txt").write_text("\n".join(SEG_CLASSES) + "\n\n")
    assert build_dataset(f"semantic:{cs}", "segmentation", "val", SIZE, False).classes == SEG_CLASSES
    for spec in ("voc:/x", "coco", "coco:", "shapes2", "data.json"):
        with pytest.raises(DataError, match="--data.*shapes, coco:/path"):
            build_dataset(spec, "detection", "val", SIZE, False)
    with pytest.raises(DataError, match=f"--data coco:{tmp_path / 'missing'}: folder .* does not exist"):
        build_dataset(f"coco:{tmp_path / 'missing'}", "detection", "val", SIZE, False)
    with pytest.raises(DataError, match="coco data is for detection, but the model does segmentation"):
        build_dataset(f"coco:{root / 'coco'}", "segmentation", "val", SIZE, False)
    with pytest.raises(DataError, match="unknown option 'label' for coco .*valid: labels, empty"):
        build_dataset(f"coco:{root / 'coco'}?label=contiguous", "detection", "val", SIZE, False)
    with pytest.raises(DataError, match="labels=ids2: expected ids or trainids"):
        build_dataset(f"cityscapes:{cs}?labels=ids2", "segmentation", "val", SIZE, False)


def test_subset_forwards_attributes_and_pickles(root: Path) -> None:
    ds = CocoDetection(root / "coco", "val")
    sub = subset(ds, 3)
    assert len(sub) == 3 and sub.classes == ds.classes and sub.ann_file == ds.ann_file
    assert sub.ids == ds.ids[:3] and sub.num_classes == 4
    assert len(subset(ds, 100)) == N_VAL
    back = pickle.loads(pickle.dumps(sub))
    assert back.ids == sub.ids and back[0][1]["image_id"] == ds.ids[0]


def test_collate(root: Path) -> None:
    det = CocoDetection(root / "coco", "val", transforms=build_transforms("detection", False, SIZE))
    images, targets = collate_detection([det[0], det[1]])
    assert len(images) == 2 and images[0].shape == (3, SIZE, SIZE) and targets[1]["image_id"] == det.ids[1]
    assert type(images[0]) is torch.Tensor and images[0].dtype == torch.float32
    a = (tv_tensors.Image(torch.rand(3, 4, 6)), tv_tensors.Mask(torch.ones(4, 6, dtype=torch.int64)))
    b = (tv_tensors.Image(torch.rand(3, 5, 3)), tv_tensors.Mask(torch.full((5, 3), 2, dtype=torch.int64)))
    x, y = collate_segmentation([a, b])
    assert x.shape == (2, 3, 5, 6) and y.shape == (2, 5, 6) and y.dtype == torch.int64
    assert type(x) is torch.Tensor and type(y) is torch.Tensor
    assert (y[0, 4] == 255).all() and (y[1, :, 3:] == 255).all() and (x[1, :, :, 3:] == 0).all()
    torch.testing.assert_close(x[0, :, :4], a[0].as_subclass(torch.Tensor))
