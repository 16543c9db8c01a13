"""`kdcli bench quality` / `kdcli bench speed` on tiny data: budgets, rankings, outputs, memory probes."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from kdcli.bench import quality as q
from kdcli.bench import quality_report, ranking
from kdcli.bench._proc import run_child
from kdcli.bench.speed import SpeedOptions, run_speed
from kdcli.errors import ConfigError


def test_budget_parsing_and_planning():
    assert q.parse_budget("2e") == ("epochs", 2) and q.parse_budget("3epochs") == ("epochs", 3)
    assert q.parse_budget("300") == ("steps", 300) and q.parse_budget("40steps") == ("steps", 40)
    for bad in ("", "0e", "two", "2x"):
        with pytest.raises(ConfigError):
            q.parse_budget(bad)
    # 400 images, batch 8: 50 steps an epoch
    assert q.plan_budget("2e", 400, 8).steps == 100
    b = q.plan_budget("20", 400, 8)  # under one epoch: one epoch on 20 x 8 images
    assert (b.epochs, b.steps, b.max_train_images) == (1, 20, 160)
    b = q.plan_budget("120", 400, 8)  # rounded to whole epochs, the actual count reported
    assert (b.epochs, b.steps, b.max_train_images) == (2, 100, 0)


def test_method_selection_per_task():
    det = q.method_names("detection")
    seg = q.method_names("segmentation")
    assert det[0] == seg[0] == "baseline"
    assert {"fgd", "bckd", "freekd", "pskd", "uskd", "kd"} <= set(det)
    assert "mcmi" not in det and "mcmi" not in seg  # a teacher-training objective
    assert not {"fgd", "bckd", "freekd"} & set(seg)  # detection only
    assert q.method_names("segmentation", "kd,fgd") == ["baseline", "kd"]
    with pytest.raises(ConfigError):
        q.method_names("segmentation", "fgd")
    with pytest.raises(Exception, match="unknown method"):
        q.method_names("detection", "nope")
    assert q.needs_teacher("kd") and not q.needs_teacher("uskd") and not q.needs_teacher("baseline")


def test_rank_agreement_and_verdicts():
    a = {"a": 0.3, "b": 0.2, "c": 0.1}
    assert ranking.kendall_tau(a, {"a": 3.0, "b": 2.0, "c": 1.0}) == (1.0, 3)
    assert ranking.kendall_tau(a, {"a": 1.0, "b": 2.0, "c": 3.0}) == (-1.0, 3)
    tau, n = ranking.kendall_tau({**a, "d": 0.0}, {"a": 2.0, "b": 3.0, "c": 1.0, "x": 9.0})  # 3 common, 1 of 3 swapped
    assert n == 3 and tau == pytest.approx(1 / 3)
    # ties are not agreement: all-equal proxy scores give no τ, one tie lowers the denominator (τ-b)
    assert math.isnan(ranking.kendall_tau(a, {"a": 0.0, "b": 0.0, "c": 0.0})[0])
    assert ranking.kendall_tau(a, {"a": 1.0, "b": 0.0, "c": 0.0})[0] == pytest.approx(2 / math.sqrt(3 * 2))
    assert math.isnan(ranking.kendall_tau({"a": 1.0}, {"a": 1.0})[0])


def _runs(pair: str, scores: dict[str, list[float]]) -> list[dict]:
    return [{"pair": pair, "method": m, "seed": s, "status": "ok", "mAP": v, "AP50": v, "run_s": 1.0,
             "train_s": 1.0, "peak_mem_mb": 1.0, "mem_kind": "rss", "loss_ratio": 1.0, "teacher": "t",
             "student": "s"} for m, vs in scores.items() for s, v in enumerate(vs)]


def test_verdicts_are_paired_t_tests_with_holm_over_the_suite():
    """A gain is "yes" only when its one-sided paired t-test survives Holm's correction over every test of the
    suite; pairing by seed matters (a seed-shared offset cancels) and contrasts join the family."""
    budget = q.plan_budget("1e", 8, 8)
    plans = {"p": ("detection", ["baseline", "kd", "fgd", "acam", "maskd"], budget)}
    base = [0.10, 0.30, 0.20, 0.40, 0.25]  # large seed-to-seed spread, shared by every method of a seed
    runs = _runs("p", {"baseline": base,
                       "kd": [b + g for b, g in zip(base, [0.011, 0.010, 0.012, 0.009, 0.010], strict=True)],
                       "fgd": [b + g for b, g in zip(base, [0.02, -0.03, 0.01, 0.01, 0.0], strict=True)],
                       "acam": [b - 0.02 for b in base],
                       "maskd": [b + 0.01 for b in base[:1]] + base[1:]})
    rows = ranking.aggregate(runs, {}, plans)
    versus = ranking.contrasts(runs, plans)
    ranking.correct(rows, versus)
    by = {r["method"]: r for r in rows}
    assert by["kd"]["df"] == 4 and by["kd"]["p"] < 1e-4  # unpaired, a 0.01 gain over a 0.12 spread shows nothing
    assert by["kd"]["verdict"] == "yes" and by["kd"]["p_holm"] <= 0.05
    assert by["fgd"]["verdict"] == "no" and by["acam"]["verdict"] == "no, lower"
    assert by["acam"]["p"] == 1.0 and by["baseline"]["verdict"] == "—"
    # maskd gains in one seed only: t = 1, p ≈ 0.187 before correction, not shown after it
    assert by["maskd"]["p"] == pytest.approx(0.18695, abs=1e-4) and by["maskd"]["verdict"] == "no"
    names = {(c["method"], c["versus"]) for c in versus}
    assert names == {("acam", "maskd"), ("acam", "fgd")}  # freekd not in the suite: no contrast
    # 4 method tests + 2 contrasts: Holm multiplies the smallest p by 6
    tests = [r for r in [*rows, *versus] if r["method"] != "baseline"]
    assert len(tests) == 6 and min(r["p_holm"] for r in tests) == pytest.approx(6 * by["kd"]["p"])


def test_child_peak_memory_and_rss_sampler(tmp_path: Path):
    """A child's own peak RSS (VmHWM) shows the 200 MB it touched, not the parent's RSS (wait4's ru_maxrss
    starts from the parent's RSS at the fork, so it is only an upper bound); the in-process sampler, run in
    that fresh child, sees the rise of the 100 MB it allocates inside its block."""
    import numpy as np

    ballast = np.ones(300 * 2**20 // 8)  # make the parent bigger than the child will ever be
    code = ("import numpy as np; from kdcli.bench._proc import RssSampler, peak_rss_mb\n"
            "with RssSampler() as rss:\n    b = np.ones(100 * 2**20 // 8)\n"
            "a = np.ones(200 * 2**20 // 8); print(rss.peak_mb, peak_rss_mb())")
    rc, upper = run_child([sys.executable, "-c", code], tmp_path / "child.log")
    rise, own = (float(v) for v in (tmp_path / "child.log").read_text().split()[-2:])
    assert rc == 0 and 300 <= own < 420 and upper >= own
    assert 90 <= rise < 150
    rc, _ = run_child([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fail.log")
    assert rc == 3
    del ballast


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


@pytest.mark.slow
def test_quality_suite_tiny(tiny_shapes: Path, tmp_path: Path):
    """Teacher trained and cached by the suite, baseline + a teacher method + a self-KD method, 1 seed."""
    (tiny_shapes / "cityscapes" / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
    pair = q.Pair("lraspp", "shapes-mbv3-lraspp", "shapes-mbv3-lraspp", teacher_epochs=1)
    opts = q.QualityOptions([pair], data=f"semantic:{tiny_shapes / 'cityscapes'}", methods="kd,uskd", budget="2",
                            seeds=1, out=tmp_path / "suite", batch_size=4, image_size=64, max_val_images=4,
                            device="cpu", amp="none", workers=0, isolate=False, command="kdcli bench quality (test)")
    res = q.run_suite(opts, log=lambda s: None)
    rows = list(csv.DictReader(open(tmp_path / "suite" / "quality.csv")))
    assert list(rows[0])[: len(ranking.QUALITY_COLUMNS)] == ranking.QUALITY_COLUMNS
    assert [r["method"] for r in rows if r["rank"]] and {r["method"] for r in rows} == {"baseline", "kd", "uskd"}
    for r in rows:
        assert r["seeds"] == "1" and r["metric"] == "mIoU" and r["steps"] == "2" and r["epochs"] == "1"
        assert 0.0 <= float(r["mean"]) <= 1.0 and float(r["run_s"]) > 0
        assert float(r["peak_mem_mb"]) >= 0 and "in-process" in r["mem_kind"]  # approximate in-process
    ranks = sorted(int(r["rank"]) for r in rows)  # competition ranks: ties share one
    assert ranks[0] == 1 and all(1 <= x <= 3 for x in ranks)
    by = {r["method"]: r for r in rows}
    assert float(by["kd"]["loss_ratio"]) > 0 and float(by["baseline"]["loss_ratio"]) == 0  # distill / task terms
    runs = list(csv.DictReader(open(tmp_path / "suite" / "runs.csv")))
    assert len(runs) == 3 and all(r["status"] == "ok" for r in runs)
    uskd = tmp_path / "suite" / "runs" / "lraspp" / "uskd" / "seed0"
    assert '"teacher": null' in (uskd / "config.json").read_text()  # self-KD: no teacher model
    md = (tmp_path / "suite" / "quality.md").read_text()
    assert "| rank | method | mIoU | pixel_acc | gain mIoU |" in md and "Caveat" in md
    assert "kdcli bench quality (test)" in md
    w, h = quality_report.bar_figure_size(1, 3)
    assert _png_size(tmp_path / "suite" / "quality.png") == (int(w * 100), int(h * 100))
    assert {p.name for p in res.files} >= {"quality.csv", "runs.csv", "quality.md", "quality.png"}
    # the teacher was trained once and cached; a second suite reuses it and every finished run
    from kdcli.weights import kdcli_home

    assert (kdcli_home() / "demo-teachers").is_dir()
    before = {p: p.stat().st_mtime for p in (tmp_path / "suite" / "runs").rglob("results.csv")}
    again = q.run_suite(opts, log=lambda s: None)
    assert {p: p.stat().st_mtime for p in (tmp_path / "suite" / "runs").rglob("results.csv")} == before
    assert [r["mean"] for r in again.rows] == [r["mean"] for r in res.rows]
    # proxy ranking vs a reference suite (here: itself) is reported with Kendall's tau
    opts.reference = tmp_path / "suite" / "quality.csv"
    q.run_suite(opts, log=lambda s: None)
    md = (tmp_path / "suite" / "quality.md").read_text()
    tied = len({r["mean"] for r in rows}) < 3  # an identical suite agrees fully, unless its scores tie
    assert ("Kendall τ-b = undefined" if tied else "Kendall τ-b = 1.00 over 3 common methods") in md


@pytest.mark.slow
def test_quality_suite_two_jobs_in_child_processes(tiny_shapes: Path, tmp_path: Path, monkeypatch):
    """--jobs 2: runs go to child processes two at a time, each told to use its share of the cores, and the
    tables keep the plan's order; --jobs needs --isolate."""
    (tiny_shapes / "cityscapes" / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
    monkeypatch.setattr(q.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    env = q.child_env(2)
    assert env is not None and env["OMP_NUM_THREADS"] == "2" and q.child_env(1) is None
    pair = q.Pair("lraspp", "shapes-mbv3-lraspp", "shapes-mbv3-lraspp", teacher_epochs=1)
    opts = q.QualityOptions([pair], data=f"semantic:{tiny_shapes / 'cityscapes'}", methods="kd", budget="1",
                            seeds=2, out=tmp_path / "suite", batch_size=4, image_size=64, max_val_images=4,
                            device="cpu", amp="none", workers=0, isolate=True, jobs=2)
    res = q.run_suite(opts, log=lambda s: None)
    assert [(r["method"], r["seed"], r["status"]) for r in res.runs] == [
        ("baseline", 0, "ok"), ("kd", 0, "ok"), ("baseline", 1, "ok"), ("kd", 1, "ok")]
    assert all(r["mem_kind"] == "peak RSS (child process)" and r["peak_mem_mb"] > 100 for r in res.runs)
    assert "2 runs at a time" in (tmp_path / "suite" / "quality.md").read_text()
    with pytest.raises(ConfigError, match="--jobs 2"):
        q.run_suite(q.QualityOptions([pair], isolate=False, jobs=2, out=tmp_path / "x"), log=lambda s: None)


def test_jobs_overlap_and_a_broken_run_is_reported(tmp_path: Path, monkeypatch):
    """The scheduling alone (no training): with --jobs 2 two runs are in flight at once, a run that raises is
    recorded as failed while the others finish, and the rows keep the plan's order."""
    import threading
    import time

    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def fake_run_one(cfg, isolate, log, jobs=1, stop=None):
        t0 = time.monotonic()
        time.sleep(0.3)
        with lock:
            spans.append((t0, time.monotonic()))
        if cfg.method == "pkd" and cfg.seed == 0:
            raise OSError("disk full")
        return {"config": cfg.to_dict(), "status": "ok", "metrics": {"mIoU": 0.5, "pixel_acc": 0.9},
                "run_s": 0.3, "train_s": 0.2, "peak_mem_mb": 1.0, "loss_ratio": 0.0}

    monkeypatch.setattr(q, "run_one", fake_run_one)
    monkeypatch.setattr(q, "prepare_teacher", lambda pair, task, opts, log: ("teacher-dir", {"mIoU": 0.6}))
    monkeypatch.setattr(q, "train_size", lambda pair, task, opts: 16)
    pair = q.Pair("lraspp", "shapes-mbv3-lraspp", "shapes-mbv3-lraspp")
    opts = q.QualityOptions([pair], methods="kd,pkd", budget="1", seeds=2, out=tmp_path / "suite", jobs=2)
    res = q.run_suite(opts, log=lambda s: None)
    assert [(r["method"], r["seed"]) for r in res.runs] == [
        ("baseline", 0), ("kd", 0), ("pkd", 0), ("baseline", 1), ("kd", 1), ("pkd", 1)]
    assert [r["status"] for r in res.runs].count("ok") == 5
    assert res.runs[2]["status"] == "failed: OSError: disk full"
    spans.sort()
    assert len(spans) == 6 and any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # overlapped
    assert max(sum(s < t < e for s, e in spans) for t in (s + 0.15 for s, _ in spans)) <= 2  # never more than 2


def test_run_child_is_killed_when_stop_is_set(tmp_path: Path):
    import threading
    import time

    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    rc, _ = run_child([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "c.log", stop=stop)
    assert rc != 0 and time.monotonic() - t0 < 10


def test_speed_set_overrides_go_to_the_named_method():
    from kdcli.bench.speed import method_overrides

    assert method_overrides(["samkd", "dmkd"], {"samkd.grids": "1"}) == {"samkd": {"grids": "1"}, "dmkd": {}}
    assert method_overrides(["samkd"], {"grids": "1"}) == {"samkd": {"grids": "1"}}
    with pytest.raises(ConfigError, match="--set grids"):
        method_overrides(["samkd", "dmkd"], {"grids": "1"})
    with pytest.raises(ConfigError, match="--set cwd.tau"):
        method_overrides(["samkd"], {"cwd.tau": "2"})  # a method that is not timed


def test_tensor_peak_known_value():
    import torch

    from kdcli.bench._proc import tensor_peak_mb

    def work() -> None:
        a = torch.ones(100 * 2**20 // 4)  # 100 MB
        b = torch.ones(50 * 2**20 // 4)
        del a
        c = torch.ones(30 * 2**20 // 4)  # after a is freed: the peak stays a + b
        del b, c

    assert tensor_peak_mb(work) == pytest.approx(150.0, abs=0.5)


@pytest.mark.slow
def test_speed_tiny(tmp_path: Path):
    opts = SpeedOptions(teacher="shapes-mbv3-lraspp", student="shapes-mbv3-lraspp", size=64, batch=2, steps=2,
                        methods="kd", device="cpu", memory=True, out=tmp_path, amp="none", sets={"kd.tau": "0"})
    (bad,) = run_speed(opts, log=lambda s: None).rows  # --set reaches the method: a bad value fails its build
    assert bad["status"].startswith("failed: ConfigError") and "tau" in bad["status"]
    opts.sets = {"tau": "2"}
    res = run_speed(opts, log=lambda s: None)
    (row,) = res.rows
    # timings on a shared machine are noise at this size: only that both were measured
    assert row["status"] == "ok" and row["method"] == "kd" and row["floor_s"] > 0 and row["method_s"] > 0
    assert row["ratio"] == pytest.approx(row["method_s"] / row["floor_s"]) and row["q25"] <= row["q75"]
    # tensor memory is deterministic: KD keeps everything the floor does, plus the teacher's logits
    assert row["floor_mem_mb"] > 1 and row["method_mem_mb"] >= row["floor_mem_mb"] - 0.01
    text = (tmp_path / "speed.md").read_text()
    # the pair, the input size, the device and the precision amp "none" means
    assert "| shapes-mbv3-lraspp → shapes-mbv3-lraspp | 64x64 | cpu | float32 | kd |" in text
    header = (tmp_path / "speed.csv").read_text().splitlines()[0]
    assert header.startswith("device,method,amp,floor_s,method_s,ratio,q25,q75")


def test_bench_cli_refuses_bad_options_before_any_run(tmp_path: Path):
    from typer.testing import CliRunner

    from kdcli.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["bench", "quality", "--teacher", "shapes-r34-fcos", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "--teacher and --student together" in str(r.exception)
    r = runner.invoke(app, ["bench", "quality", "--pairs", "fcos", "--budget", "0e", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "--budget 0e" in str(r.exception)
    r = runner.invoke(app, ["bench", "quality", "--pairs", "yolo", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "--pairs yolo" in str(r.exception)
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_speed_size_parsing():
    from kdcli.bench.speed import parse_size

    assert parse_size(128) == (128, 128) and parse_size("96") == (96, 96)
    assert parse_size("800x1333") == (800, 1333) and parse_size("512X1024") == (512, 1024)
    assert parse_size((64, 96)) == (64, 96)
    for bad in ("800x", "x", "8x1333", "800x1333x3", "big", "0"):
        with pytest.raises(ConfigError, match="--size"):
            parse_size(bad)


def test_speed_cli_refuses_a_bad_size(tmp_path: Path):
    from typer.testing import CliRunner

    from kdcli.cli import app

    r = CliRunner().invoke(app, ["bench", "speed", "--size", "800by1333", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "--size 800by1333" in str(r.exception)
    assert not any(tmp_path.iterdir())


def test_speed_noise_warning():
    from kdcli.bench.speed import noise_warning

    row = {"method": "acam", "device": "cpu"}
    # 3 noisy pairs: x0.57 with quartiles 0.40–1.30: the spread (0.90) is wider than the gap (0.43)
    assert "wider than the gap 0.43" in noise_warning({**row, "ratio": 0.57, "q25": 0.40, "q75": 1.30})
    # a steady x1.91: no warning
    assert noise_warning({**row, "ratio": 1.91, "q25": 1.85, "q75": 1.97}) is None
    # tight but under the floor: a method step contains the floor's work
    assert "below the floor" in noise_warning({**row, "ratio": 0.90, "q25": 0.89, "q75": 0.91})
    # a 3 % gap with a 10 % spread: noise
    assert noise_warning({**row, "ratio": 1.03, "q25": 0.98, "q75": 1.08}) is not None


def test_speed_non_square_detector_input(tmp_path: Path):
    # the shapes detectors resize every input to 128 px (zoo min_size/max_size): the bench must run at --size
    logs: list[str] = []
    opts = SpeedOptions(teacher="shapes-r18-fcos", student="shapes-r18-fcos", size="64x96", batch=1, steps=1,
                        methods="mgd", device="cpu", memory=False, out=tmp_path, amp="none")
    (row,) = run_speed(opts, log=logs.append).rows
    assert row["status"] == "ok" and row["size"] == "64x96"
    assert (row["teacher"], row["student"]) == ("shapes-r18-fcos", "shapes-r18-fcos")
    text = (tmp_path / "speed.md").read_text()
    assert "| pair | input | device | precision | method |" in text
    assert "| shapes-r18-fcos → shapes-r18-fcos | 64x96 | cpu | float32 | mgd |" in text
    assert "--size 64x96" in text


def test_speed_refuses_a_batch_the_floor_cannot_train(tmp_path: Path):
    # DeepLabV3's image-pooling BatchNorm needs two images in training: one clear error, nothing written
    opts = SpeedOptions(teacher="shapes-r18-deeplabv3", student="shapes-r18-deeplabv3", size=64, batch=1, steps=1,
                        methods="kd", device="cpu", memory=False, out=tmp_path, amp="none")
    with pytest.raises(ConfigError, match="--batch 1 --size 64x64: the plain step of shapes-r18-deeplabv3 fails"):
        run_speed(opts, log=lambda s: None)
    assert not any(tmp_path.iterdir())


def test_suite_reports_runs_done_and_its_eta(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    clock = [100.0]
    monkeypatch.setattr(q.time, "time", lambda: clock[0])

    def fake_run_one(cfg, isolate, log, jobs=1, stop=None):
        clock[0] += 10.0  # each run takes 10 s
        return {"config": cfg.to_dict(), "status": "ok", "metrics": {"mIoU": 0.5, "pixel_acc": 0.9},
                "run_s": 10.0, "train_s": 9.0, "peak_mem_mb": 1.0, "loss_ratio": 0.0}

    monkeypatch.setattr(q, "run_one", fake_run_one)
    monkeypatch.setattr(q, "prepare_teacher", lambda pair, task, opts, log: ("teacher-dir", {"mIoU": 0.6}))
    monkeypatch.setattr(q, "train_size", lambda pair, task, opts: 16)
    monkeypatch.setattr(q, "write_outputs", lambda *a, **k: [])
    lines: list[str] = []
    pair = q.Pair("lraspp", "shapes-mbv3-lraspp", "shapes-mbv3-lraspp")
    q.run_suite(q.QualityOptions([pair], methods="kd", budget="1", seeds=2, out=tmp_path / "s"), log=lines.append)
    runs = [ln for ln in lines if "suite eta" in ln]
    assert [ln.split()[1] for ln in runs] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert runs[0].endswith("(10s); suite eta 0:00:30") and runs[-1].endswith("suite eta 0:00:00")


def test_speed_warmup_pairs_and_channels_last(monkeypatch: pytest.MonkeyPatch):
    import torch

    from kdcli.bench import speed

    seen: list[tuple[bool, bool, bool]] = []
    orig = speed.Stepper.__call__

    def spy(self: speed.Stepper) -> float:
        conv = next(p for p in self.student.parameters() if p.dim() == 4)
        seen.append((self.method is not None,
                     self.batch.images.is_contiguous(memory_format=torch.channels_last),
                     conv.is_contiguous(memory_format=torch.channels_last)))
        return orig(self)

    monkeypatch.setattr(speed.Stepper, "__call__", spy)
    for warmup, channels_last in ((0, True), (1, False)):
        seen.clear()
        opts = SpeedOptions(teacher="shapes-mbv3-lraspp", student="shapes-mbv3-lraspp", size=64, batch=2, steps=2,
                            warmup=warmup, channels_last=channels_last, methods="kd", device="cpu", memory=False,
                            amp="none")
        (row,) = run_speed(opts, log=lambda s: None).rows
        assert row["status"] == "ok"
        # one trial floor step, then warm-up and timed pairs
        assert sum(m for m, _, _ in seen) == 2 + warmup and sum(not m for m, _, _ in seen) == 1 + 2 + warmup
        assert all(img == channels_last and w == channels_last for _, img, w in seen)
    with pytest.raises(ConfigError, match="--warmup"):
        run_speed(SpeedOptions(warmup=-1, device="cpu"), log=lambda s: None)



@pytest.mark.slow
def test_speed_compile_compiles_student_and_teacher_for_floor_and_method(monkeypatch: pytest.MonkeyPatch):
    from kdcli.bench import speed

    seen: list[tuple[bool, bool, bool]] = []
    orig = speed.Stepper.__call__

    def spy(self: speed.Stepper) -> float:
        seen.append((self.method is not None, self.student.net.backbone._compiled_call_impl is not None,
                     self.teacher.net.backbone._compiled_call_impl is not None))
        return orig(self)

    monkeypatch.setattr(speed.Stepper, "__call__", spy)
    opts = SpeedOptions(teacher="shapes-mbv3-lraspp", student="shapes-mbv3-lraspp", size=64, batch=2, steps=1,
                        warmup=1, compile=True, methods="kd", device="cpu", memory=False, amp="none")
    (row,) = run_speed(opts, log=lambda s: None).rows
    assert row["status"] == "ok" and row["floor_s"] > 0 and row["method_s"] > 0
    assert seen and all(s and t for _, s, t in seen) and {m for m, _, _ in seen} == {True, False}
    assert "torch.compile on (student and teacher)" in speed.markdown(opts, [row])
    assert "torch.compile off" in speed.markdown(SpeedOptions(), [row])


def test_a_finished_run_is_not_reused_after_its_method_options_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import json

    from kdcli import api
    from kdcli.config import RunConfig

    cfg = RunConfig(model="shapes-r18-fcos", teacher="shapes-r34-fcos", method="acam", set={"taps": "fpn:3"},
                    out=str(tmp_path / "acam" / "seed0"))
    options = q.method_options(cfg)
    assert options["acam"]["taps"] == "fpn:3" and options["acam"]["mask_grad"] == "full"
    assert q.method_options(RunConfig(model="shapes-r18-fcos", out=str(tmp_path))) is None

    def train(*a, **k):
        raise RuntimeError("trained again")

    monkeypatch.setattr(api, "train", train)
    result = tmp_path / "acam" / "seed0.result.json"
    changed = {"acam": {**options["acam"], "mask_grad": "detach"}}
    for stored, reused in ((options, True), (None, True), (changed, False)):
        rec = {"config": cfg.to_dict(), "status": "ok", "metrics": {"mAP": 0.5}}
        if stored is not None:
            rec["method_options"] = stored
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(rec))
        out = q.run_one(cfg, isolate=False, log=lambda s: None)
        # the same options (or a record from before they were kept): reused; a changed default: trained again
        assert (out.get("metrics") == {"mAP": 0.5}) is reused
        assert reused or "trained again" in out["status"]
