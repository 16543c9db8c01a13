"""Cityscapes: the official labelId -> trainId table, a miniature tree in the real layout, labelId
PNGs written back for the official script, and a short train + eval on the tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdcli.data import build_dataset
from kdcli.data.cityscapes import (
    CITYSCAPES_CLASSES,
    LABELS,
    CityscapesSegmentation,
    id_to_train_lut,
    label_ids_path,
    to_label_ids,
    to_train_ids,
    train_to_id_lut,
    write_label_ids,
)
from kdcli.errors import DataError
from kdcli.zoo import class_names

# cityscapesScripts helpers/labels.py, typed in again here: id -> (name, trainId).
OFFICIAL = {
    0: ("unlabeled", 255), 1: ("ego vehicle", 255), 2: ("rectification border", 255), 3: ("out of roi", 255),
    4: ("static", 255), 5: ("dynamic", 255), 6: ("ground", 255), 7: ("road", 0), 8: ("sidewalk", 1),
    9: ("parking", 255), 10: ("rail track", 255), 11: ("building", 2), 12: ("wall", 3), 13: ("fence", 4),
    14: ("guard rail", 255), 15: ("bridge", 255), 16: ("tunnel", 255), 17: ("pole", 5), 18: ("polegroup", 255),
    19: ("traffic light", 6), 20: ("traffic sign", 7), 21: ("vegetation", 8), 22: ("terrain", 9), 23: ("sky", 10),
    24: ("person", 11), 25: ("rider", 12), 26: ("car", 13), 27: ("truck", 14), 28: ("bus", 15),
    29: ("caravan", 255), 30: ("trailer", 255), 31: ("train", 16), 32: ("motorcycle", 17), 33: ("bicycle", 18),
    -1: ("license plate", -1),
}  # fmt: skip

H, W = 48, 96  # Cityscapes' 1:2 aspect, tiny
CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}


def test_table_is_the_official_one() -> None:
    assert {lab.id: (lab.name, lab.train_id) for lab in LABELS} == OFFICIAL
    assert len(LABELS) == 35
    assert CITYSCAPES_CLASSES == [n for _, (n, t) in sorted(OFFICIAL.items(), key=lambda kv: kv[1][1])
                                  if 0 <= t < 255]
    assert CITYSCAPES_CLASSES == class_names("cityscapes", "segmentation")  # the zoo's cityscapes models


def test_lookup_tables_both_ways() -> None:
    lut = id_to_train_lut()
    for i in range(256):
        want = OFFICIAL.get(i, ("", 255))[1]
        assert lut[i] == (want if want >= 0 else 255), i
    assert lut[255] == 255  # id -1 (license plate) stored in an 8-bit PNG is 255: ignored
    back = train_to_id_lut()
    assert [int(back[t]) for t in range(19)] == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                                                 31, 32, 33]
    t = torch.arange(19).view(1, 19)
    assert torch.equal(to_train_ids(to_label_ids(t)), t)
    ids = torch.tensor([[0, 7, 9, 26, 33, 34, 255]])
    assert to_train_ids(ids).tolist() == [[255, 0, 255, 13, 18, 255, 255]]
    assert to_label_ids(torch.tensor([255])).tolist() == [0]


def _regions() -> np.ndarray:
    """A labelIds image: sky, building, road, a car with a license plate, void ids 0-6, parking."""
    lab = np.zeros((H, W), dtype=np.uint8)  # 0 unlabeled
    lab[:10] = 23  # sky
    lab[10:24] = 11  # building
    lab[24:40] = 7  # road
    lab[40:, :30] = 9  # parking (trainId 255)
    lab[40:, 30:60] = 1  # ego vehicle
    lab[40:, 60:] = np.arange(7, dtype=np.uint8).repeat(6)[: W - 60]  # void ids 0..6
    lab[26:36, 40:70] = 26  # car
    lab[32:34, 50:58] = 255  # its license plate (id -1 as uint8)
    lab[20:30, 5:8] = 17  # pole
    lab[12:22, 80:90] = 33  # bicycle
    return lab


def write_mini_cityscapes(root: Path, per_city: int = 2, trainids: bool = False) -> Path:
    rng = np.random.default_rng(0)
    lut = id_to_train_lut()
    for split, cities in CITIES.items():
        for city in cities:
            for k in range(per_city):
                stem = f"{city}_{k:06d}_000019"
                img_dir = root / "leftImg8bit" / split / city
                gt_dir = root / "gtFine" / split / city
                img_dir.mkdir(parents=True, exist_ok=True)
                gt_dir.mkdir(parents=True, exist_ok=True)
                lab = np.roll(_regions(), 4 * k, axis=1)
                rgb = (lut[lab][..., None] * np.array([11, 7, 3]) % 256 + rng.integers(0, 20, (H, W, 3)))
                Image.fromarray(rgb.astype(np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
                Image.fromarray(lab, "L").save(gt_dir / f"{stem}_gtFine_labelIds.png")
                # the other files of a real gtFine folder, which the loader must leave alone
                Image.fromarray(lab.astype(np.uint16) * 1000).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
                Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(gt_dir / f"{stem}_gtFine_color.png")
                (gt_dir / f"{stem}_gtFine_polygons.json").write_text(json.dumps({"imgHeight": H, "imgWidth": W}))
                if trainids:
                    Image.fromarray(lut[lab], "L").save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mini_cityscapes(tmp_path_factory.mktemp("cityscapes"), trainids=True)


def test_loader_maps_label_ids(tree: Path) -> None:
    ds = CityscapesSegmentation(tree, "train")
    assert len(ds) == 4 and ds.num_classes == 19 and ds.classes == CITYSCAPES_CLASSES
    assert [p.name for p, _ in ds.items][:2] == ["aachen_000000_000019_leftImg8bit.png",
                                               "aachen_000001_000019_leftImg8bit.png"]
    img, mask = ds[0]
    assert img.shape == (3, H, W) and mask.dtype == torch.int64
    assert mask[0, 0] == 10 and mask[15, 0] == 2 and mask[30, 20] == 0 and mask[30, 45] == 13  # sky building road car
    assert mask[33, 52] == 255 and mask[25, 6] == 5 and mask[15, 85] == 18  # plate ignored, pole, bicycle
    assert (mask[40:] == 255).all()  # parking, ego vehicle, void 0..6
    pre = CityscapesSegmentation(tree, "train", labels="trainids")  # createTrainIdLabelImgs output
    assert torch.equal(pre[0][1], mask)
    via_spec = build_dataset(f"cityscapes:{tree}", "segmentation", "val", 32, train=False)
    assert len(via_spec) == 2 and via_spec[0][0].shape == (3, 32, 64) and via_spec[0][1].shape == (H, W)
    assert build_dataset(f"cityscapes:{tree}?labels=trainids", "segmentation", "val", 32, False).classes == \
        CITYSCAPES_CLASSES


def test_missing_label_file(tree: Path, tmp_path: Path) -> None:
    root = write_mini_cityscapes(tmp_path / "cs", per_city=1)
    (root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="frankfurt_000000_000019_gtFine_labelIds.png not found for image"):
        CityscapesSegmentation(root, "val")
    with pytest.raises(DataError, match="_gtFine_labelTrainIds.png not found"):
        CityscapesSegmentation(root, "train", labels="trainids")


def test_label_ids_written_back(tmp_path: Path) -> None:
    pred = torch.from_numpy(id_to_train_lut()[_regions()].astype(np.int64))
    pred[pred == 255] = 0  # a model predicts a class everywhere
    img = Path("/data/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png")
    path = write_label_ids(pred, label_ids_path(tmp_path, img))
    assert path == tmp_path / "frankfurt" / "frankfurt_000000_000294_labelIds.png"
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (W, H)
        ids = np.array(im)
    lab = _regions()
    valid = id_to_train_lut()[lab] != 255
    assert (ids[valid] == lab[valid]).all()  # every evaluated pixel gets its official id back
    assert set(np.unique(ids[~valid]).tolist()) == {7}  # ignored GT predicted as road (trainId 0)


def test_train_and_eval_on_mini_cityscapes(tree: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kdcli.cli import app

    run = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", "-m", "shapes-mbv3-lraspp", "--data", f"cityscapes:{tree}", "--out", str(run), "--epochs", "1",
        "-b", "2", "--image-size", "32", "--workers", "0", "--device", "cpu", "--bn-recal", "1",
        "--warmup-iters", "0", "--optimizer", "adamw", "--lr", "1e-3"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and len(metrics["per_class_iou"]) == 19
    out = tmp_path / "labelids"
    res = CliRunner().invoke(app, ["eval", str(run), "--data", f"cityscapes:{tree}", "--per-class", "--workers",
                                   "0", "--device", "cpu", "--slide", "32x32:16x16", "--write-labelids", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "bicycle" in res.output and "IoU" in res.output
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["frankfurt/frankfurt_000000_000019_labelIds.png", "frankfurt/frankfurt_000001_000019_labelIds.png"]
    with Image.open(out / files[0]) as im:
        assert im.size == (W, H)  # full resolution although the model ran at 32 px
        assert set(np.unique(np.array(im)).tolist()) <= set(train_to_id_lut()[:19].tolist())
