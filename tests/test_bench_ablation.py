"""The ablation suite (``kdcli bench quality --suite ablation``): its plan, its paired tests, one tiny run."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from kdcli.bench import ablation as ab
from kdcli.bench import evidence as ev
from kdcli.errors import ConfigError


def test_plan_pairs_every_variant_with_its_references():
    runs = ab.ablation_plan(ab.AblationOptions(seeds=2), "detection")
    seed0 = [r for r in runs if r.seed == 0]
    names = [r.name for r in seed0]
    assert names[:8] == ["baseline", "inherit", "acam", "fgd", "pskd", "samkd", "dmkd", "cankd"]
    assert names[8:] == [ab.label(v) for v in ab.VARIANTS] and len(runs) == 2 * len(seed0)
    by = {r.name: r for r in seed0}
    # a variant is its parent's run in the suite (same taps, --inherit) with its options on top
    assert by["acam"].set == {"taps": "fpn:3"} and by["acam"].inherit
    assert by["acam@mask_power=1"].set == {"taps": "fpn:3", "mask_power": "1"}
    assert by["acam@mask_power=1"].inherit and by["acam@mask_power=1"].method == "acam"
    assert not by["acam@no-inherit"].inherit and by["acam@no-inherit"].set == {"taps": "fpn:3"}
    assert by["fgd@weights×0.1"].set["lambda"] == "8e-7"  # FGD's FCOS row ×0.1
    assert not by["baseline"].inherit and by["inherit"].inherit
    # PS-KD is not in the suite: its preset taps (class logits), no --inherit
    assert by["pskd"].set == {} and not by["pskd"].inherit and by["pskd@alpha_T=0.2"].set == {"alpha_T": "0.2"}
    # a seed method that does not inherit in the suite gets --inherit as a variant, its taps unchanged
    assert not by["samkd"].inherit and by["samkd@inherit"].inherit and by["samkd@inherit"].set == {"taps": "fpn:3"}
    assert by["cankd@weight=1"].set == {"taps": "fpn:3", "weight": "1"} and not by["cankd@weight=1"].inherit
    # the reference runs are exactly the suite's (so its finished runs are reused)
    suite = {(r.method, r.seed): r for r in ev.plan(ev.EvidenceOptions(pairs=("fcos",), seeds=2))}
    for r in runs:
        if not r.label and r.method != "pskd":
            assert suite[(r.method, r.seed)] == r


def test_unknown_variant_and_too_few_seeds_are_refused():
    with pytest.raises(ConfigError, match="unknown variant acam@nope"):
        ab.select(("acam@nope",))
    with pytest.raises(ConfigError, match="at least 2"):
        ab.run_ablation(ab.AblationOptions(seeds=1))



def test_method_picks_the_parents_whose_variants_run():
    got = ab.variants_of("samkd+cankd")
    assert got == ("samkd@inherit", "samkd@mask_mode=random", "samkd@sld_weight=0", "cankd@inherit", "cankd@weight=1")
    assert ab.variants_of("all") == () and ab.select(ab.variants_of("all")) == list(ab.VARIANTS)
    with pytest.raises(ConfigError, match="--method mgd: the ablation suite has variants of acam, fgd"):
        ab.variants_of("mgd,acam")
    # single variants by label, in the suite's order, each once
    assert ab.variants_of("cankd@inherit+samkd@inherit") == ("samkd@inherit", "cankd@inherit")
    assert ab.variants_of("cankd,cankd@inherit") == ("cankd@inherit", "cankd@weight=1")
    with pytest.raises(ConfigError, match="--method cankd@nope: "):
        ab.variants_of("cankd@nope")
    plan = ab.ablation_plan(ab.AblationOptions(seeds=2, variants=got), "detection")
    assert [r.name for r in plan if r.seed == 0] == ["baseline", "inherit", "samkd", "cankd", *got]


def test_segmentation_pair_drops_the_start_variants_and_the_inherit_only_control():
    opts = ab.AblationOptions(pair="lraspp", seeds=2, variants=ab.variants_of("acam,fgd,samkd,cankd"))
    plan = ab.ablation_plan(opts, "segmentation")
    names = [r.name for r in plan if r.seed == 0]
    # no inherit-only control and no (no-)inherit variant: the LR-ASPP student cannot take DeepLabV3's head;
    # FGD has no segmentation form
    assert names[:4] == ["baseline", "acam", "samkd", "cankd"]
    assert "inherit" not in names and not any("inherit" in n or n.startswith("fgd") for n in names)
    assert "acam@masks-off" in names and "samkd@mask_mode=random" in names and "cankd@weight=1" in names
    assert not any(r.inherit for r in plan)
    # the segmentation taps are the presets' (no --set taps), the variant's options only
    by = {r.name: r for r in plan if r.seed == 0}
    assert by["acam"].set == {} and by["acam@mask_power=1"].set == {"mask_power": "1"}
    # the references are the evidence suite's segmentation runs, so they are reused
    suite = {(r.method, r.seed): r for r in ev.plan(ev.EvidenceOptions(pairs=("lraspp",), seeds=2))}
    assert all(suite[(r.method, r.seed)] == r for r in plan if not r.label)
    with pytest.raises(ConfigError, match="no variant of fgd runs on the lraspp pair"):
        ab.ablation_plan(ab.AblationOptions(pair="lraspp", seeds=2, variants=ab.variants_of("fgd")), "segmentation")


def _row(method: str, seed: int, v: float, init: str = "stand-in") -> dict:
    return {"pair": "fcos", "method": method, "seed": seed, "status": "ok", "mAP": v, "init": init}


def test_tests_are_paired_two_sided_against_the_parent_and_holm_corrected():
    v = ab.select(("acam@mask_power=1",))
    base = [0.10, 0.12, 0.11]
    parent = [0.20, 0.21, 0.19]
    var = [0.15, 0.17, 0.13]  # below the parent by 0.05 ± 0.01: a two-sided test finds it
    runs = [_row("baseline", s, x) for s, x in enumerate(base)] + [_row("acam", s, x) for s, x in enumerate(parent)]
    runs += [_row("inherit", s, 0.16) for s in range(3)]
    runs += [_row("acam@mask_power=1", s, x, "stand-in + inherit") for s, x in enumerate(var)]
    rows = ab.tests(runs, "detection", v)
    assert [(r["versus"], r["sided"]) for r in rows] == [("acam", "two"), ("baseline", "greater"),
                                                         ("inherit", "greater")]
    vs_parent, vs_base, vs_ctl = rows
    assert vs_parent["diff"] == pytest.approx(-0.05) and vs_parent["diff_std"] == pytest.approx(0.01)
    # t = -0.05 / (0.01 / √3) = -8.66, df 2: two-sided p = 0.01307
    assert vs_parent["t"] == pytest.approx(-8.660, abs=1e-3) and vs_parent["p"] == pytest.approx(0.01307, abs=1e-4)
    # one-sided against the plain student: diffs 0.05, 0.05, 0.02 (mean 0.04, sd 0.01732), t = 4.0, p = 0.0286
    assert vs_base["p"] == pytest.approx(0.0286, abs=1e-3)
    # against the control: diffs -0.01, 0.01, -0.03: mean below 0, one-sided p > 0.5
    assert vs_ctl["p"] > 0.5 and vs_ctl["verdict"] == "no"
    ps = sorted(r["p"] for r in rows)
    assert min(r["p_holm"] for r in rows) == pytest.approx(3 * ps[0])
    assert all(r["p_holm"] >= r["p"] for r in rows)
    assert vs_parent["verdict"] == "yes" and vs_base["verdict"] == "no"  # 3 × 0.0286 > 0.05


@pytest.mark.slow
def test_ablation_tiny_end_to_end(tiny_shapes: Path, tmp_path: Path):
    suite = ev.EvidenceOptions(data=f"coco:{tiny_shapes / 'coco'}", budgets={"detection": "2", "segmentation": "2"},
                               teacher_epochs=1, standin_steps=2, max_train_images=8, max_val_images=4,
                               isolate=False)
    opts = ab.AblationOptions(out=tmp_path / "ev", seeds=2, variants=("acam@alpha=0.1",), device="cpu", workers=0,
                              command="kdcli bench quality --suite ablation (test)")
    files = ab.run_ablation(opts, log=lambda s: None, suite=suite)
    assert [f.name for f in files] == ["ablation_runs.csv", "ablation.csv", "ablation.md"]
    rows = list(csv.DictReader(open(tmp_path / "ev" / "ablation_runs.csv")))
    assert [r["method"] for r in rows] == ["baseline", "inherit", "acam", "acam@alpha=0.1"] * 2
    assert all(r["status"] == "ok" for r in rows)
    var = (tmp_path / "ev" / "runs" / "fcos" / "acam@alpha=0.1" / "seed1" / "results.csv")
    assert var.is_file() and any(k.startswith("mask/") for k in next(csv.DictReader(open(var))))
    tests = list(csv.DictReader(open(tmp_path / "ev" / "ablation.csv")))
    assert [t["versus"] for t in tests] == ["acam", "baseline", "inherit"]
    assert all(t["seeds"] == "2" and not math.isnan(float(t["p_holm"])) for t in tests)
    assert "--suite ablation (test)" in (tmp_path / "ev" / "ablation.md").read_text()


def test_a_parent_outside_the_suite_is_tested_against_the_baseline_and_no_inherit_control_without_inherit():
    v = ab.select(("pskd@alpha_T=0.2",))
    runs = [_row("baseline", s, 0.1) for s in range(3)] + [_row("inherit", s, 0.2) for s in range(3)]
    runs += [_row("pskd", s, x) for s, x in enumerate([0.08, 0.09, 0.07])]
    runs += [_row("pskd@alpha_T=0.2", s, x) for s, x in enumerate([0.11, 0.10, 0.12])]
    rows = ab.tests(runs, "detection", v)
    assert [(r["parent"], r["variant"], r["versus"], r["sided"]) for r in rows] == [
        ("pskd", "—", "baseline", "greater"), ("pskd", "alpha_T=0.2", "pskd", "two"),
        ("pskd", "alpha_T=0.2", "baseline", "greater")]
    assert rows[0]["diff"] == pytest.approx(-0.02) and rows[0]["p"] > 0.9
