"""The evidence suite (``kdcli bench quality --suite evidence``): its plan, the stand-in pretraining, one tiny run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli.bench import evidence as ev
from kdcli.bench.ranking import CONTRASTS
from kdcli.checkpoint_files import read_state_dict


def test_plan_pairs_seeds_methods_budget():
    opts = ev.EvidenceOptions()
    runs = ev.plan(opts)
    tasks = {r.task for r in runs}
    assert tasks == {"detection", "segmentation"}
    wanted = {"baseline", "acam", "samkd", "dmkd", "cankd", "maskd", "fgd", "freekd", "cwd", "mgd"}
    det = {r.method for r in runs if r.task == "detection"}
    seg = {r.method for r in runs if r.task == "segmentation"}
    # the inherit-only control runs where some method inherits (detection); FreeKD/FGD: no segmentation preset
    assert det == wanted | {"inherit"} and seg == wanted - {"freekd", "fgd"}
    # paired: every method of a pair on the same seeds; 5 on detection, 10 on segmentation
    for pair, n in (("fcos", 5), ("lraspp", 10)):
        for m in {r.method for r in runs if r.pair == pair}:
            seeds = sorted(r.seed for r in runs if r.pair == pair and r.method == m)
            assert seeds == list(range(n))
    assert len(runs) == 5 * 11 + 10 * 8
    # --seeds n overrides both
    assert {r.seed for r in ev.plan(ev.EvidenceOptions(seeds=2))} == {0, 1}
    # the papers' inheriting strategy where their detection configs use it (and its control), nowhere else
    assert {r.method for r in runs if r.inherit} == {"acam", "maskd", "fgd", "mgd", "inherit"}
    control = [r for r in runs if r.method == "inherit"]
    assert all(r.set == {} for r in control)  # no distillation, so no taps
    extra = set(ev.evidence_contrasts(ev.method_list("detection", ev.METHODS))) - set(CONTRASTS)
    assert extra == {(m, "inherit") for m in ("acam", "maskd", "fgd", "mgd")}
    assert set(ev.evidence_contrasts(ev.method_list("segmentation", ev.METHODS))) == set(CONTRASTS)
    assert all(r.task == "detection" for r in runs if r.inherit)
    est = ev.estimate_s(opts)
    # by hand: detection 2 epochs x 5 seeds x per-epoch seconds, segmentation 1 epoch x 10 seeds
    fcos = ev.RUN_S_PER_EPOCH["fcos"]
    det_s = 2 * 5 * (sum(fcos.values()) + fcos["baseline"])  # the inherit-only control costs a baseline
    seg_s = 10 * sum(ev.RUN_S_PER_EPOCH["lraspp"].values())
    assert abs(est["runs"] - (det_s + seg_s)) < 1e-6
    # within the 120-minute target on the machine the table was measured on
    assert est["total"] == est["runs"] + est["teachers"] + est["standins"] <= 120 * 60


def test_no_distilled_map_under_4x4():
    """From the models' strides at 128 px: every tap of every method on both pairs is at least 4×4; the
    presets' P3–P7 would reach 1×1 (the choice the suite avoids)."""
    opts = ev.EvidenceOptions()
    for name in opts.pairs:
        pair = ev.PAIRS[name]
        task = "detection" if name == "fcos" else "segmentation"
        for m in ev.method_list(task, ev.METHODS)[1:]:
            if m == ev.INHERIT_ONLY:
                continue  # the control distils nothing
            sizes = ev.map_sizes(pair, m)
            assert sizes and min(min(s) for s in sizes.values()) >= ev.MIN_MAP, (name, m, sizes)
        if task == "detection":
            assert ev.map_sizes(pair, "acam") == {f"{w}:p{k}": (128 // 2**k,) * 2
                                                  for w in ("student", "teacher") for k in (3, 4, 5)}
    ev.TAPS["detection"], saved = None, ev.TAPS["detection"]
    try:
        assert min(ev.map_sizes(ev.PAIRS["fcos"], "cwd")["student:p7"]) == 1
    finally:
        ev.TAPS["detection"] = saved


def test_crop_box_centred_square_with_context():
    mask = np.zeros((128, 128), dtype=bool)
    mask[40:50, 20:60] = True  # a 40 x 10 box, centred at (x 40, y 45)
    left, top, right, bottom = ev.crop_box(mask, context=1.5)
    assert right - left == bottom - top == 64  # 40 * 1.5 + 4
    assert (left + right) / 2 == 40 and (top + bottom) / 2 == 45
    assert left <= 20 and right >= 60 and top <= 40 and bottom >= 50
    # near the border the square runs off the image (PIL pads): still centred, same side
    mask[:] = False
    mask[0:4, 0:4] = True
    assert ev.crop_box(mask, context=1.0) == (-2, -2, 6, 6)


def test_shapes_crops_object_centred_and_deterministic():
    x, y = ev.shapes_crops(np.random.default_rng(7), 48, 32, [0.0] * 3, [1.0] * 3)
    assert x.shape == (48, 3, 32, 32) and y.shape == (48,) and set(y.tolist()) == {0, 1, 2}
    x2, y2 = ev.shapes_crops(np.random.default_rng(7), 48, 32, [0.0] * 3, [1.0] * 3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # the object fills the centre: the centre differs from the crop's border more than borders differ
    centre = x[:, :, 12:20, 12:20].mean(dim=(2, 3))
    border = torch.cat([x[:, :, :2].flatten(2), x[:, :, -2:].flatten(2)], dim=2).mean(dim=2)
    assert (centre - border).abs().mean() > 0.1


@pytest.mark.slow
def test_standin_backbone_learns_the_crops():
    logs: list[str] = []
    path = ev.standin_backbone("shapes-r18-fcos", steps=120, log=logs.append)
    meta = json.loads(path.with_suffix(".json").read_text())
    # three classes, ~1/3 each: 120 steps of R18 already sit far above the most frequent class
    assert meta["heldout_majority_accuracy"] < 0.45
    assert meta["heldout_accuracy"] > meta["heldout_majority_accuracy"] + 0.3, meta
    assert not any(s.startswith("warning") for s in logs)


def test_standin_backbone_cached_and_reused(tmp_path: Path):
    from kdcli.models import build_model
    from kdcli.models.build import backbone_body
    from kdcli.zoo import resolve_ref

    logs: list[str] = []
    path = ev.standin_backbone("shapes-r18-fcos", steps=2, log=logs.append)
    assert path.is_file() and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    # 2 steps learn nothing: the accuracy is compared with the most-frequent-class floor, and the log says so
    assert 1 / 3 <= meta["heldout_majority_accuracy"] <= 1.0 and meta["heldout_crops"] == ev.STANDIN_HELDOUT
    assert any("most frequent class" in s for s in logs)
    if meta["heldout_accuracy"] < meta["heldout_majority_accuracy"] + 0.2:
        assert any(s.startswith("warning: the stand-in backbone") for s in logs)
    trained = read_state_dict(path)
    torch.manual_seed(0)  # the initialisation the pretraining starts from
    fresh = backbone_body(build_model(resolve_ref("shapes-r18-fcos").spec).net).state_dict()
    assert set(trained) == set(fresh)
    assert any(not torch.equal(trained[k], fresh[k]) for k in fresh if fresh[k].is_floating_point())
    stamp = path.stat().st_mtime_ns
    logs.clear()
    assert ev.standin_backbone("shapes-r18-fcos", steps=2, log=logs.append) == path
    assert path.stat().st_mtime_ns == stamp and any("from cache" in s for s in logs)
    # a seed's student: the stand-in body exactly, the neck/head drawn with the seed
    a = read_state_dict(ev.student_init("shapes-r18-fcos", path, 0, tmp_path))
    b = read_state_dict(ev.student_init("shapes-r18-fcos", path, 1, tmp_path))
    for k, v in trained.items():
        assert torch.equal(a[f"backbone.body.{k}"], v) and torch.equal(b[f"backbone.body.{k}"], v)
    heads = [k for k in a if not k.startswith("backbone.body.") and a[k].is_floating_point() and a[k].numel() > 1
             and "weight" in k]
    assert heads and any(not torch.equal(a[k], b[k]) for k in heads)


@pytest.mark.slow
def test_evidence_tiny_end_to_end(tiny_shapes: Path, tmp_path: Path):
    opts = ev.EvidenceOptions(out=tmp_path / "ev", data=f"coco:{tiny_shapes / 'coco'}", pairs=("fcos",),
                              methods=("acam",), seeds=1,
                              budgets={"detection": "2", "segmentation": "2"}, teacher_epochs=1, standin_steps=2,
                              max_train_images=8, max_val_images=4, device="cpu", workers=0, isolate=False,
                              command="kdcli bench quality --suite evidence (test)")
    ev.run_evidence(opts, log=lambda s: None)
    rows = list(csv.DictReader(open(tmp_path / "ev" / "evidence_runs.csv")))
    assert [r["method"] for r in rows] == ["baseline", "acam", "inherit"]
    assert list(rows[0])[:18] == ev.RUN_COLUMNS[:18] and {"init", "image_size"} <= set(rows[0])
    for r in rows:
        assert r["status"] == "ok" and r["image_size"] == "128" and r["steps"] == "2"
        assert r["init"].startswith("stand-in shapes-r18-fcos-shapescrops")
        assert 0.0 <= float(r["mAP"]) <= 1.0
    assert rows[1]["init"].endswith("+ inherit") and not rows[0]["init"].endswith("+ inherit")
    assert rows[1]["taps"] == "fpn:3"
    cfg = json.loads((tmp_path / "ev" / "runs" / "fcos" / "acam" / "seed0" / "config.json").read_text())
    cfg = cfg.get("config", cfg)
    assert cfg["set"] == {"taps": "fpn:3"} and cfg["inherit"] is True
    assert cfg["student_weights"].endswith("seed0.safetensors")
    base = json.loads((tmp_path / "ev" / "runs" / "fcos" / "baseline" / "seed0" / "config.json").read_text())
    base = base.get("config", base)
    assert base["inherit"] is False and base["student_weights"] == cfg["student_weights"]
    ctl = json.loads((tmp_path / "ev" / "runs" / "fcos" / "inherit" / "seed0" / "config.json").read_text())
    ctl = ctl.get("config", ctl)
    assert ctl["inherit"] is True and ctl["method"] is None and ctl["teacher"] and rows[2]["status"] == "ok"
    versus = list(csv.DictReader(open(tmp_path / "ev" / "evidence_contrasts.csv")))
    assert [(r["method"], r["versus"]) for r in versus] == [("acam", "inherit")]
    md = (tmp_path / "ev" / "evidence.md").read_text()
    assert md.startswith("# Evidence suite") and "--suite evidence (test)" in md and "stand-in" in md


def test_cli_unknown_suite_is_one_line():
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "kdcli", "bench", "quality", "--suite", "papers"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and err == ["error: --suite papers: expected evidence or ablation"], res.stderr
