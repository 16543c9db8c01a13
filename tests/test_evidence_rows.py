"""benchmarks/evidence_rows.py: each method page's evidence section (the suite's rows and the ablation rows)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("evidence_rows", ROOT / "benchmarks" / "evidence_rows.py")
assert spec and spec.loader
er = importlib.util.module_from_spec(spec)
spec.loader.exec_module(er)


def _run(method: str, seed: int, value: float | None, init: str = "stand-in x", **kw: str) -> dict[str, str]:
    return {"pair": "fcos", "task": "detection", "teacher": "t", "student": "s", "method": method, "seed": str(seed),
            "status": "ok" if value is not None else "failed: boom", "mAP": "" if value is None else str(value),
            "epochs": "2", "image_size": "128", "taps": "fpn:3", "init": init, **kw}


def test_section_pairs_runs_with_baseline_control_and_ablations():
    runs = [_run("baseline", 0, 0.05), _run("baseline", 1, 0.07), _run("inherit", 0, 0.20),
            _run("acam", 0, 0.15, "stand-in x + inherit"), _run("acam", 1, None, "stand-in x + inherit")]
    ablation = [_run("acam", 0, 0.15), _run("acam@alpha=0.1", 0, 0.19, set='{"alpha": "0.1"}'),
                _run("fgd@no-inherit", 0, 0.1, set="{}")]
    text = er.section("acam", runs, ablation)
    assert text.startswith(er.BEGIN) and text.endswith(er.END)
    lines = text.splitlines()
    # the gain over the baseline and over the inherit-only control of the same seed; a failed run kept
    assert "| 0 | 0.1500 | 0.0500 | +0.1000 | 0.2000 | -0.0500 |" in lines
    assert "| 1 | failed: boom | 0.0700 | — | — | — |" in lines
    # the method's own ablation rows only, each beside the method's run of the same seed
    assert '| alpha=0.1 | `{"alpha": "0.1"}` | 0 | 0.1900 | 0.1500 | +0.0400 |' in lines
    assert not any("no-inherit" in ln for ln in lines)
    assert "Ablations" not in er.section("cwd", [_run("cwd", 0, 0.1)], ablation)


def test_a_method_only_the_ablation_suite_trained_gets_its_runs_beside_the_baseline():
    runs = [_run("baseline", 0, 0.05), _run("acam", 0, 0.15)]
    ablation = [_run("baseline", 0, 0.05), _run("pskd", 0, 0.04), _run("pskd@alpha_T=0.2", 0, 0.06, set="{}")]
    lines = er.section("pskd", runs, ablation).splitlines()
    assert any("not in the evidence suite" in ln for ln in lines)
    assert "| 0 | 0.0400 | 0.0500 | -0.0100 |" in lines
    assert "| alpha_T=0.2 | `{}` | 0 | 0.0600 | 0.0400 | +0.0200 |" in lines


def test_two_ablation_invocations_each_pair_variants_with_their_own_parent_run():
    runs = [_run("baseline", 0, 0.05), _run("cankd", 0, 0.12)]
    first = [_run("cankd", 0, 0.12), _run("cankd@weight=1", 0, 0.11, set='{"weight": "1"}')]
    second = [_run("cankd", 0, 0.13), _run("cankd@inherit", 0, 0.25, set="{}")]  # another machine's references
    text = er.section("cankd", runs, first, "ablation_a", {"ablation_b": second})
    lines = text.splitlines()
    assert '| weight=1 | `{"weight": "1"}` | 0 | 0.1100 | 0.1200 | -0.0100 |' in lines
    assert "| inherit | `{}` | 0 | 0.2500 | 0.1300 | +0.1200 |" in lines  # beside its own invocation's cankd
    assert text.index("ablation_a.md") < text.index("ablation_b.md") and text.endswith(er.END)
