"""The data file (TOML or YAML) for any COCO-format or mask-PNG data set."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_coco import write_mini_coco  # tests/ is on sys.path (pytest rootdir)

from kdcli.data import build_dataset
from kdcli.data.datafile import read_data_file
from kdcli.errors import DataError


@pytest.fixture(scope="module")
def det_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The miniature COCO set moved into a custom layout."""
    coco = write_mini_coco(tmp_path_factory.mktemp("coco"))
    root = tmp_path_factory.mktemp("mydet")
    for split in ("train", "val"):
        shutil.copytree(coco / f"{split}2017", root / "pictures" / split)
        (root / "labels").mkdir(exist_ok=True)
        shutil.copy(coco / "annotations" / f"instances_{split}2017.json", root / "labels" / f"{split}.json")
    return root


def test_coco_toml_and_yaml(det_root: Path, tmp_path: Path) -> None:
    toml = tmp_path / "det.toml"
    toml.write_text(f'''format = "coco"
root = "{det_root}"
labels = "contiguous"
empty = "keep"
[train]
images = "pictures/train"
annotations = "labels/train.json"
[val]
images = "pictures/val"
annotations = "labels/val.json"
''')
    train = build_dataset(str(toml), "detection", "train", 64, train=True)
    assert train.label_space == "contiguous" and len(train.classes) == 80 and len(train) == 5  # empty kept
    assert train.image_path(0) == det_root / "pictures" / "train" / "000000000009.jpg"
    img, t = train[0]
    assert img.dtype == torch.float32 and t["image_id"] == 9
    yaml = det_root / "det.yaml"  # relative root: the data file's folder
    yaml.write_text("format: coco\ntrain:\n  images: pictures/train\n  annotations: labels/train.json\n"
                    "val: {images: pictures/val, annotations: labels/val.json}\n")
    val = build_dataset(str(yaml), "detection", "val", 64, train=False)
    assert val.label_space == "category-id" and val.ids == [139, 285, 632]
    assert len(build_dataset(str(yaml), "detection", "train", 64, train=True)) == 3  # empty dropped
    with pytest.raises(DataError, match="det.yaml: coco data is for detection, but the model does segmentation"):
        build_dataset(str(yaml), "segmentation", "val", 64, train=False)
    yaml.write_text(yaml.read_text() + "classes: [a, b]\n")
    with pytest.raises(DataError, match=r"det.yaml: classes \['a', 'b'\]... differ from the category names"):
        build_dataset(str(yaml), "detection", "val", 64, train=False)


def _palette_png(arr: np.ndarray, path: Path) -> None:
    im = Image.fromarray(arr, "P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (252 * 3) + [224, 224, 192])
    im.save(path)


def test_masks_voc_style(tmp_path: Path) -> None:
    """VOC layout: JPEGImages + palette PNGs in SegmentationClass, split lists, 255 = boundary."""
    root = tmp_path / "VOC"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    names = ["2007_000032", "2007_000033", "2007_000039"]
    for k, n in enumerate(names):
        Image.fromarray(np.full((20, 30, 3), 40 * k, np.uint8)).save(root / "JPEGImages" / f"{n}.jpg")
        lab = np.zeros((20, 30), np.uint8)
        lab[5:15, 5:15] = k % 3
        lab[5, 5:15] = 255
        _palette_png(lab, root / "SegmentationClass" / f"{n}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:2]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text(names[2] + "\n")
    (root / "classes.txt").write_text("background\naeroplane\nbicycle\n")
    df = tmp_path / "voc.toml"
    df.write_text(f'''format = "masks"
root = "{root}"
classes_file = "classes.txt"
[train]
images = "JPEGImages"
masks = "SegmentationClass"
list = "ImageSets/Segmentation/train.txt"
[val]
images = "JPEGImages"
masks = "SegmentationClass"
list = "ImageSets/Segmentation/val.txt"
''')
    train = build_dataset(str(df), "segmentation", "train", 16, train=True)
    assert len(train) == 2 and train.classes == ["background", "aeroplane", "bicycle"]
    img, mask = train[1]
    assert img.shape == (3, 16, 16) and mask.shape == (16, 16)
    val = build_dataset(str(df), "segmentation", "val", 16, train=False)
    img, mask = val[0]
    assert img.shape == (3, 16, 24) and mask.shape == (20, 30)  # label at full resolution
    assert mask[10, 10] == 2 and mask[5, 10] == 255 and mask[0, 0] == 0  # palette indices, not colours
    # id_map: raw values -> classes, everything else ignored
    df.write_text(df.read_text().replace('classes_file = "classes.txt"\n',
                                         'classes = ["bg", "thing"]\nid_map = { 0 = 0, 2 = 1 }\n'))
    mask = build_dataset(str(df), "segmentation", "val", 16, train=False)[0][1]
    assert mask[10, 10] == 1 and mask[0, 0] == 0 and mask[5, 10] == 255


def test_masks_without_list_pairs_by_relative_path(tmp_path: Path) -> None:
    for sub in ("a", "b/c"):
        (tmp_path / "img" / sub).mkdir(parents=True)
        (tmp_path / "ann" / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / sub / "x_rgb.png")
        Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "ann" / sub / "x_seg.png")
    (tmp_path / "d.yml").write_text("format: masks\nclasses: [a, b]\nimage_suffix: _rgb.png\n"
                                    "mask_suffix: _seg.png\nval: {images: img, masks: ann}\n")
    ds = build_dataset(str(tmp_path / "d.yml"), "segmentation", "val", 8, train=False)
    assert [p.relative_to(tmp_path).as_posix() for p, _ in ds.items] == ["img/a/x_rgb.png", "img/b/c/x_rgb.png"]
    assert int(ds[0][1].sum()) == 64
    with pytest.raises(DataError, match=r"d.yml: no \[train\] section"):
        build_dataset(str(tmp_path / "d.yml"), "segmentation", "train", 8, train=True)
    (tmp_path / "ann" / "a" / "x_seg.png").unlink()
    with pytest.raises(DataError, match=r"d.yml: mask .*ann/a/x_seg.png not found for image"):
        build_dataset(str(tmp_path / "d.yml"), "segmentation", "val", 8, train=False)


@pytest.mark.parametrize(("text", "message"), [
    ('format = "voc"\n', "format = 'voc': expected one of coco, masks"),
    ('format = "coco"\nlabel = "x"\n', "unknown key.s. label for format coco"),
    ('format = "coco"\n[val]\nimages = "i"\n', r"\[val\] is missing annotations"),
    ('format = "coco"\n[val]\nimages = "i"\nannotations = "a"\nmask = "m"\n', r"\[val\] unknown key.s. mask"),
    ('format = "coco"\n', r"no \[train\] or \[val\] section"),
    ('format = "coco"\nempty = "yes"\n[val]\nimages = "i"\nannotations = "a"\n', "empty = 'yes'"),
    ('format = "masks"\n[val]\nimages = "i"\nmasks = "m"\n', "format masks needs classes"),
    ('format = "masks"\nclasses = ["a"]\nignore_index = 300\n[val]\nimages = "i"\nmasks = "m"\n',
     "ignore_index must be an integer in 0..255"),
    ('format = "masks"\nclasses = ["a"]\nid_map = { x = 1 }\n[val]\nimages = "i"\nmasks = "m"\n',
     "id_map keys and values must be integers"),
    ('format = "coco"\nroot = "nowhere"\n', "root folder .*nowhere does not exist"),
    ("format = coco\n", "invalid TOML"),
])
def test_data_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_data_file(path)


def test_yaml_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("format: coco\ntrain: [\n")
    with pytest.raises(DataError, match="bad.yaml: invalid YAML"):
        read_data_file(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(DataError, match="bad.yaml: expected a mapping"):
        read_data_file(path)
    with pytest.raises(DataError, match="missing.yaml: data file not found"):
        build_dataset(str(tmp_path / "missing.yaml"), "detection", "val", 8, train=False)
