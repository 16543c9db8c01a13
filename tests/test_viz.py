"""Method internals (the maths they expose), mask statistics, results.png and `kdcli viz` on tiny runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kdcli import api
from kdcli.cli import app
from kdcli.config import RunConfig
from kdcli.engine.monitor import MaskStats, mask_statistics
from kdcli.methods import build
from kdcli.methods.cankd import nonlocal_aggregate
from kdcli.models.taps import ModelOutput, TapInfo
from kdcli.viz import plots
from kdcli.viz.viz import SINGLE, visualise

C = 16


def _info(family: str = "fcos") -> dict[str, TapInfo]:
    return {"p3": TapInfo("p3", C, 8, "feature", family), "p4": TapInfo("p4", C, 16, "feature", family)}


def _outputs(seed: int = 0) -> tuple[ModelOutput, ModelOutput, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    extras = {"image_sizes": [(64, 64), (64, 64)], "input_shape": (64, 64)}

    def taps() -> dict[str, torch.Tensor]:
        return {"p3": torch.randn(2, C, 8, 8, generator=g), "p4": torch.randn(2, C, 4, 4, generator=g)}

    s, t = ModelOutput(taps(), {}, dict(extras)), ModelOutput(taps(), {}, dict(extras))
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    return s, t, targets


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


# -- mask statistics ------------------------------------------------------------------------------
def test_mask_statistics_known_values():
    flat = torch.ones(2, 4, 4)
    st = mask_statistics("x.mask", flat)
    assert st["x.mask.mean"].item() == 1.0 and st["x.mask.entropy"].item() == pytest.approx(1.0)
    assert "x.mask.dice" not in st  # one mask per image: no pair
    onehot = torch.zeros(2, 4, 4)
    onehot[:, 1, 2] = 1.0
    assert mask_statistics("x.mask", onehot)["x.mask.entropy"].item() == pytest.approx(0.0, abs=1e-6)
    same = torch.rand(2, 1, 4, 4).expand(2, 3, 4, 4)  # three identical masks per image: Dice 1
    assert mask_statistics("a.mask", same)["a.mask.dice"].item() == pytest.approx(1.0, abs=1e-6)
    disjoint = torch.zeros(1, 2, 2, 2)
    disjoint[0, 0, 0] = 1.0
    disjoint[0, 1, 1] = 1.0
    assert mask_statistics("a.mask", disjoint)["a.mask.dice"].item() == 0.0
    # half the positions on: entropy log(8)/log(16) = 0.75
    half = torch.zeros(1, 4, 4)
    half[0, :2] = 1.0
    assert mask_statistics("h.mask", half)["h.mask.entropy"].item() == pytest.approx(0.75, abs=1e-6)


def test_mask_stats_leave_every_random_stream_alone():
    """MGD draws its masks from the global CPU RNG and DMKD (random mode) from its generator: sampling
    statistics must not move either, or a run would train differently with them."""
    s, t, targets = _outputs()
    method = build("mgd+dmkd", _info(), _info(), "detection", {"dmkd.mask_mode": "random"})
    method.methods["dmkd"].generator = torch.Generator().manual_seed(3)
    g_state = method.methods["dmkd"].generator.get_state()
    cpu_state = torch.get_rng_state()
    rec = MaskStats(method, every=1)
    rec.observe(s, t, targets)
    rec.observe(s, t, targets)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(method.methods["dmkd"].generator.get_state(), g_state)
    cols = rec.pop()
    assert cols["mask/mgd.p3.random_mask.mean"] == pytest.approx(0.35, abs=0.2)
    assert cols["mask/dmkd.p3.spatial_mask.mean"] == pytest.approx(0.35, abs=0.2)
    assert rec.pop() == {}  # a new epoch starts empty


# -- internals: the maths they expose ---------------------------------------------------------------
def test_acam_internals_are_the_masks_and_attention_of_the_loss():
    s, t, _ = _outputs()
    m = build("acam", _info(), _info(), "detection").methods["acam"]
    with torch.no_grad():
        out = m.internals(s, t, query=(0.3, 0.6))
        block = m.blocks["p3"]
        ft, fs = t.taps["p3"], s.taps["p3"]
        s_al = block.align(fs)
        m_s, m_c = block.masks(block.fuse(ft, s_al))
        i = m.query_index(8, 8, (0.3, 0.6))
        q = block.q(ft).flatten(2)[:, :, i]
        k = block.k(s_al).flatten(2)
        direct = torch.softmax(torch.einsum("nc,ncp->np", q, k) / math.sqrt(q.shape[1]), -1).view(2, 8, 8)
    assert i == 2 * 8 + 4
    torch.testing.assert_close(out["p3.spatial_mask"], m_s.view(2, -1, 8, 8))
    torch.testing.assert_close(out["p3.channel_mask"], m_c)
    torch.testing.assert_close(out["p3.query_attention"], direct)
    assert out["p3.query_attention"].sum((1, 2)).sub(1).abs().max() < 1e-5


def test_cankd_attention_row_reproduces_the_aggregated_feature():
    """Σ_k f[i, k] g[:, k] must equal column i of Y (Eq. 2) as the loss computes it (reassociated)."""
    s, t, _ = _outputs()
    m = build("cankd", _info(), _info(), "detection", {"taps": "p3,p4"}).methods["cankd"]
    with torch.no_grad():
        out = m.internals(s, t, query=(0.9, 0.1))
        blk = m.blocks["p3"]
        fs, ft = s.taps["p3"], t.taps["p3"]
        theta, phi, g = blk.theta(fs).flatten(2), blk.phi(ft).flatten(2), blk.g(ft).flatten(2)
        y = nonlocal_aggregate(theta, phi, g)  # (N, C_i, HW)
    i = m.query_index(8, 8, (0.9, 0.1))
    row = out["p3.query_attention"]
    assert row.shape == (2, 4, 4)
    torch.testing.assert_close(torch.einsum("nk,nck->nc", row.flatten(1), g), y[:, :, i], rtol=1e-4, atol=1e-5)


def test_fgd_internals_masks_follow_the_boxes():
    s, t, targets = _outputs()
    m = build("fgd", _info(), _info(), "detection").methods["fgd"]
    with torch.no_grad():
        out = m.internals(s, t, targets)
    fg, bg = out["p3.fg_mask"], out["p3.bg_mask"]
    assert fg.shape == (2, 8, 8)
    support = fg[0] > 0  # the box (0, 0, 32, 32) at stride 8, FGD's inclusive cell bounds: rows/cols 0..4
    assert support[:4, :4].all() and not support[5:].any() and not support[:, 5:].any()
    torch.testing.assert_close(fg[0][support], torch.full_like(fg[0][support], 1.0 / float(support.sum())))
    assert fg[1].eq(0).all()  # no box in the second image
    assert bg[0][support].eq(0).all() and bg[0].sum().item() == pytest.approx(1.0)  # normalised background
    # Eq. (1): H·W·softmax, so each image's spatial attention sums to H·W
    torch.testing.assert_close(out["p3.teacher_attention"].sum((1, 2)), torch.full((2,), 64.0))
    torch.testing.assert_close(out["p3.channel_attention"].sum(1), torch.full((2,), float(C)))


def test_dmkd_and_samkd_masks_hide_the_most_attended_positions():
    s, t, _ = _outputs()
    ms = build("dmkd+samkd", _info(), _info(), "detection", {"samkd.sld_weight": 0})
    with torch.no_grad():
        out = ms.internals(s, t)
    keep = out["dmkd.p3.spatial_mask"]
    score = t.taps["p3"].abs().mean(1).flatten(1)
    k = math.ceil(0.65 * 64 - 1e-6)
    top = score.argsort(1, descending=True)[:, :k]
    assert keep.flatten(1).gather(1, top).eq(0).all() and keep.sum((1, 2)).eq(64 - k).all()
    samkd = ms.methods["samkd"]
    grid = out["samkd.p3.spatial_mask"]  # (N, G, H, W), one per grid of the pyramid
    assert grid.shape == (2, 3, 8, 8)
    for j, g in enumerate(samkd.grids):
        torch.testing.assert_close(grid[:, j], samkd.grid_masks(t.taps["p3"], g)[0][:, 0])


def test_maskd_internals_are_the_token_masks_and_leave_the_counter_alone():
    s, t, _ = _outputs()
    m = build("maskd", _info(), _info(), "detection").methods["maskd"].train()
    with torch.no_grad():
        out = m.internals(s, t)
        assert m.iteration.item() == 0  # forward counts steps for the custom mask; internals must not
        m(s, t)
        assert m.iteration.item() == 1
        torch.testing.assert_close(out["p3.token_mask"], m.mask_modules["p3"].forward_mask(t.taps["p3"]))
    assert out["p3.token_mask"].shape == (2, 6, 8, 8)


# -- results.png ----------------------------------------------------------------------------------
def test_results_png_never_raises(tmp_path: Path):
    logged: list[str] = []
    (tmp_path / "results.csv").write_text("not,a\nvalid")
    plots.update_results_png(tmp_path / "missing", logged.append)
    plots.update_results_png(tmp_path / "missing", logged.append)
    assert len(logged) == 1 and "results.png not drawn" in logged[0]  # reported once


# -- tiny runs: results.png, mask columns, kdcli viz -------------------------------------------------
def _cfg(tiny_shapes: Path, out: Path, **kw) -> RunConfig:
    base = dict(data=f"coco:{tiny_shapes / 'coco'}", out=str(out), epochs=1, batch_size=4, image_size=64,
                workers=0, optimizer="adamw", lr=1e-3, warmup_iters=2, bn_recal=1, device="cpu",
                skip_teacher_check=True, max_train_images=8, max_val_images=2)
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def det_runs(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("viz")
    teacher, _ = api.train(_cfg(tiny_shapes, root / "teacher", model="shapes-r18-fcos"), log=lambda s: None)
    student, _ = api.train(_cfg(tiny_shapes, root / "acam", model="shapes-r18-fcos", teacher=str(teacher),
                                method="acam+fgd"), log=lambda s: None)
    return teacher, student


@pytest.mark.slow
def test_every_run_gets_results_png_and_mask_columns(det_runs: tuple[Path, Path]):
    teacher, student = det_runs
    assert _png(teacher / "results.png") == (1000, 400)  # losses + validation
    assert _png(student / "results.png") == (1500, 400)  # + mask statistics
    rows = list(csv.DictReader(open(student / "results.csv")))
    cols = [k for k in rows[0] if k.startswith("mask/")]
    assert "mask/acam.p3.spatial_mask.dice" in cols and "mask/fgd.p3.fg_mask.mean" in cols
    assert not any(k.startswith("mask/fgd.p3.teacher_attention") for k in cols)  # attention, not a mask
    assert not any(k.startswith("loss/mask") or "mask" in k for k in rows[0] if k.startswith("loss/"))
    # ACAM's masks start near 0.5 everywhere (units ~ N(0, 0.01²)): nearly identical, Dice ≈ 1
    assert float(rows[0]["mask/acam.p3.spatial_mask.mean"]) == pytest.approx(0.5, abs=0.1)
    assert 0.9 < float(rows[0]["mask/acam.p3.spatial_mask.dice"]) <= 1.0


def test_viz_draws_predictions_and_internals(det_runs: tuple[Path, Path], tiny_shapes: Path, tmp_path: Path):
    _, student = det_runs
    image = sorted((tiny_shapes / "coco" / "val2017").glob("*.jpg"))[0]
    res = visualise(student, image, out=tmp_path / "v", taps=["p3"], point=(20.0, 30.0))
    names = {p.name for p in res.files}
    assert {"predictions.png", "acam.p3.spatial_mask.png", "acam.p3.query_attention.png",
            "fgd.p3.fg_mask.png", "fgd.p3.context_attention.png", "fgd.p3.channel_attention.png"} <= names
    assert not any(".p4." in n for n in names)
    assert _png(tmp_path / "v" / "predictions.png") == (1000, 500)  # teacher | student
    assert _png(tmp_path / "v" / "internals" / "fgd.p3.teacher_attention.png") == (500, 500)
    assert _png(tmp_path / "v" / "internals" / "acam.p3.spatial_mask.png") == (1200, 640)  # 6 masks, 4 columns
    assert _png(tmp_path / "v" / "internals" / "acam.p3.channel_mask.png") == (800, 300)
    record = json.loads((tmp_path / "v" / "viz.json").read_text())
    assert record["point_xy"] == [20.0, 30.0] and any("teacher predictions" in n for n in record["notes"])


def test_viz_cli_and_bad_image(det_runs: tuple[Path, Path], tiny_shapes: Path, tmp_path: Path):
    teacher, _ = det_runs
    image = sorted((tiny_shapes / "coco" / "val2017").glob("*.jpg"))[0]
    r = CliRunner().invoke(app, ["viz", str(teacher), "--image", str(image), "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    assert _png(tmp_path / "t" / "predictions.png") == (int(SINGLE[0] * 100), int(SINGLE[1] * 100))  # no teacher
    (tmp_path / "bad.png").write_text("not an image")
    r = CliRunner().invoke(app, ["viz", str(teacher), "--image", str(tmp_path / "bad.png")])
    assert r.exit_code != 0 and "not a readable image" in str(r.exception)


@pytest.mark.slow
def test_segmentation_viz_masks(tiny_shapes: Path, tmp_path: Path):
    data = f"semantic:{tiny_shapes / 'cityscapes'}"
    (tiny_shapes / "cityscapes" / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
    t, _ = api.train(_cfg(tiny_shapes, tmp_path / "t", model="shapes-mbv3-lraspp", data=data), log=lambda s: None)
    s, _ = api.train(_cfg(tiny_shapes, tmp_path / "s", model="shapes-mbv3-lraspp", data=data, teacher=str(t),
                          method="dmkd"), log=lambda s: None)
    assert _png(s / "results.png") == (1500, 400)
    image = sorted((tiny_shapes / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[0]
    res = visualise(s, image, out=tmp_path / "v")
    assert _png(tmp_path / "v" / "predictions.png") == (1000, 500)
    assert _png(tmp_path / "v" / "internals" / "dmkd.c5.spatial_mask.png") == (500, 500)
    assert any(p.name == "dmkd.c5.channel_mask.png" for p in res.files)


def test_box_labels_name_the_right_class():
    """Detection labels start at 1 (0 is background): label k is classes[k - 1], also for COCO's slots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.models import _meta

    from kdcli.viz.viz import _draw_boxes, detection_label_name
    from kdcli.zoo import class_names

    shapes = class_names("shapes", "detection")  # circle, square, triangle
    det = {"boxes": torch.tensor([[2.0, 2, 20, 20], [30, 30, 60, 50], [5, 40, 15, 60]]),
           "labels": torch.tensor([1, 3, 2]), "scores": torch.tensor([0.9, 0.8, 0.1])}
    fig, ax = plt.subplots()
    assert _draw_boxes(ax, det, shapes, score=0.3) == 2
    assert sorted(t.get_text() for t in ax.texts) == ["circle 0.90", "triangle 0.80"]
    plt.close(fig)
    coco = class_names("coco", "detection")
    for label in (1, 3, 12, 13, 90):  # person, car, N/A (no category 12), stop sign, toothbrush
        assert detection_label_name(label, coco) == _meta._COCO_CATEGORIES[label]
    assert detection_label_name(13, coco) == "stop sign" and detection_label_name(0, coco) == "0"
