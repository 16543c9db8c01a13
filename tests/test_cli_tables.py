"""Result tables fit 80 columns: one line per row, nothing cut (a terminal would wrap anything longer)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from kdcli.bench.plan import Pair
from kdcli.bench.quality_report import ranked_table
from kdcli.report import metrics_table, run_summary, scores_table

COCO = ["mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def render(table: object, width: int = 80) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, soft_wrap=False).print(table)
    return out.getvalue().splitlines()


def test_ranked_table_keeps_one_line_per_method_at_80_columns():
    methods = ["baseline", "freekd", "maskd", "cankd", "acam", "fgd"]
    rows = [{"pair": "fcos", "method": m, "seeds": 3, "rank": i, "mean": 0.41234, "std": 0.01234, "gain": -0.0123,
             "verdict": "untested (1 seed, +)", "run_s": 12345.0, "peak_mem_mb": 123456.0}
            for i, m in enumerate(methods, 1)]
    lines = render(ranked_table(rows, Pair("fcos", "shapes-r34-fcos", "shapes-r18-fcos")))
    assert all(len(ln) <= 80 for ln in lines)
    for i, m in enumerate(methods, 1):
        [row] = [ln for ln in lines if re.match(rf"{i}\s+{m}\s", ln)]
        assert "0.4123 ± 0.0123" in row and "untested (1 seed, +)" in row and row.rstrip().endswith("123456")
    assert "…" not in "\n".join(lines)


def test_scores_and_metrics_tables_fit_80_columns(tmp_path: Path):
    metrics = {k: 0.123456 for k in COCO} | {f"mask_{k}": 0.5 for k in COCO} | {"epoch": 7}
    lines = render(scores_table(metrics, "best epoch (7)"))
    assert all(len(ln) <= 80 for ln in lines)
    assert sum("0.1235" in ln for ln in lines) == 4 and sum("0.5000" in ln for ln in lines) == 4  # 3 per row
    assert "mask_AR100" in "\n".join(lines)
    rows = [("teacher shapes-r18-deeplabv3", {"mIoU": 0.7, "pixel_acc": 0.9}),
            ("student + kd", {"mIoU": 0.6, "pixel_acc": 0.8})]
    lines = render(metrics_table(rows, "segmentation", "shapes segmentation"))
    assert all(len(ln) <= 80 for ln in lines) and sum("0.7000" in ln and "0.9000" in ln for ln in lines) == 1
    (tmp_path / "w.bin").write_bytes(b"x" * 2048)
    table, line = run_summary(tmp_path, metrics)
    assert line == f"run folder: {tmp_path} (2.0 KB)"
    assert render(table) == lines_of(scores_table(metrics, "best epoch (7)"))


def lines_of(table: object) -> list[str]:
    return render(table)


def test_per_class_tables_fit_80_columns():
    from kdcli.report import per_class_table

    det = {"mAP": 0.3, "per_class": [{"id": 10, "name": "traffic light", "AP": 0.25, "AP50": None},
                                     {"id": 90, "name": "toothbrush", "AP": 0.5, "AP50": 0.75}],
           "mask_per_class": [{"id": 90, "AP": 0.125}]}
    lines = render(per_class_table(det, ["traffic light", "toothbrush"]))
    assert all(len(ln) <= 80 for ln in lines)
    [row] = [ln for ln in lines if "toothbrush" in ln]
    assert re.search(r"90 │ toothbrush\s+│ 0\.5000 │ 0\.7500 │\s+0\.1250", row), row
    [row] = [ln for ln in lines if "traffic light" in ln]
    assert "—" in row  # no AP50 and no mask AP for that class
    seg = {"mIoU": 0.5, "per_class_iou": [0.25, None]}
    lines = render(per_class_table(seg, ["road", "sky"]))
    assert any(re.search(r"0 │ road\s+│\s+0\.2500", ln) for ln in lines)
    assert any(re.search(r"1 │ sky\s+│\s+—", ln) for ln in lines)


def test_epoch_summary_wraps_the_losses_at_80_columns_between_terms():
    from kdcli.engine.record import epoch_summary

    terms = ["classification", "bbox_regression", "bbox_ctrness"] + [f"cankd.p{i}" for i in range(3, 8)]
    row = {"epoch": 3, "lr": 1e-3, "train_time_s": 41.0, "eval_time_s": 9.0, "val/mAP": 0.25,
           **{f"loss/{k}": 1.2345 + i for i, k in enumerate(terms)}}
    lines = epoch_summary(row, 8, "mAP", 0.3).splitlines()
    assert lines[0] == "epoch 3/8 | mAP 0.2500 (best 0.3000) | lr 0.001 | train 41s eval 9s"
    assert len(lines) > 2 and all(len(line) <= 80 for line in lines)
    joined = " ".join(line.strip() for line in lines[1:])
    total = sum(1.2345 + i for i in range(len(terms)))
    assert joined.startswith(f"loss {total:.4g}: ")
    for i, k in enumerate(terms):  # every term whole, with its value
        assert f"{k} {1.2345 + i:.3g}" in joined
