"""Detection evaluation does not depend on the batch size: images of different shapes are never padded
to one another's size, so `kdcli eval RUN` reproduces the run's metrics.json at any --batch-size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from kdcli import api
from kdcli.config import RunConfig
from kdcli.data import build_dataset, collate_detection, data_hints
from kdcli.engine.evaluate_model import evaluate_model
from kdcli.models import build_model
from kdcli.zoo import get_spec

# (width, height): aspect ratios differ, so the resized images differ in size and a batch pads them
SIZES = [(64, 48), (48, 64), (64, 64), (80, 40), (40, 80), (64, 56), (56, 64), (72, 48)]
CLASSES = ["circle", "square", "triangle"]


def write_varied_coco(root: Path) -> Path:
    rng = np.random.default_rng(3)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        images, anns = [], []
        for k, (w, h) in enumerate(SIZES):
            img = Image.fromarray(rng.integers(0, 80, (h, w, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(img)
            cat = k % 3 + 1
            bw, bh = 2 * w // 3, 2 * h // 3  # large: even an untrained head overlaps some
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            colour = [(220, 40, 40), (40, 220, 40), (40, 40, 220)][cat - 1]
            draw.rectangle((x, y, x + bw - 1, y + bh - 1), fill=colour)
            name = f"{k + 1:012d}.jpg"
            img.save(root / f"{split}2017" / name, quality=95)
            images.append({"id": k + 1, "file_name": name, "width": w, "height": h})
            anns.append({"id": k + 1, "image_id": k + 1, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": float(bw * bh), "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return root


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_varied_coco(tmp_path_factory.mktemp("varied") / "coco")


def test_detection_predictions_do_not_depend_on_the_batch_size(varied: Path, tmp_path: Path):
    spec = get_spec("shapes-r18-fcos")
    torch.manual_seed(0)
    model = build_model(spec).eval()
    model.net.score_thresh = 0.0  # an untrained head: keep its top-k boxes so there is something to compare
    ds = build_dataset(f"coco:{varied}", "detection", "val", 64, train=False, hints=data_hints(spec))
    preds = {}
    for bs in (1, 4, 8):
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, collate_fn=collate_detection)
        out = tmp_path / f"b{bs}"
        metrics = evaluate_model(model, loader, ds, torch.device("cpu"), out_dir=out)
        preds[bs] = (json.loads((out / "predictions.json").read_text()), metrics)
    p1, m1 = preds[1]
    assert len(p1) > 100 and {d["image_id"] for d in p1} == set(range(1, 9))
    for bs in (4, 8):
        assert preds[bs][0] == p1, bs  # every box and score, exactly
        assert preds[bs][1] == m1, bs


def test_eval_of_a_run_reproduces_its_metrics_json_by_default(varied: Path, tmp_path: Path):
    """The run validates at batch 4; `kdcli eval RUN` at batch 1 and 8, with no other option, gives its
    predictions.json and metrics.json exactly (the run's data, image subset and precision)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = build_model(get_spec("shapes-r18-fcos")).net
    with torch.no_grad():  # class scores of 0.5 instead of the prior's 0.01: boxes above the score threshold
        net.head.classification_head.cls_logits.bias.fill_(0.0)
    init = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(init))
    cfg = RunConfig(model="shapes-r18-fcos", data=f"coco:{varied}", out=str(tmp_path / "run"), epochs=1,
                    student_weights=str(init), batch_size=4, image_size=64, max_val_images=6, workers=0,
                    device="cpu", optimizer="adamw", lr=1e-7, warmup_iters=1, bn_recal=0)
    folder, _ = api.train(cfg, log=lambda s: None)
    want = json.loads((folder / "metrics.json").read_text())
    want_preds = json.loads((folder / "predictions.json").read_text())
    assert len(want_preds) > 50  # (an untrained head: mAP 0, but every box and score is compared)
    for bs in (1, 8):
        got = api.evaluate(str(folder), batch_size=bs, device="cpu", workers=0, out_dir=tmp_path / f"b{bs}")
        assert json.loads((tmp_path / f"b{bs}" / "predictions.json").read_text()) == want_preds, bs
        assert {k: got[k] for k in want if k != "epoch"} == {k: v for k, v in want.items() if k != "epoch"}
