"""The teacher check before distillation: is the teacher as good as it is said to be?

The most common silent failure of distillation is a teacher whose weights never loaded (wrong
keys skipped, a backbone-only file, another label layout): the student then learns from noise.
Before training, the teacher is evaluated on the first ``images`` validation images and its score
printed next to the reference:

- a zoo entry's or imported model's ``metric`` (the publisher's number, percent: ``box_map`` /
  ``miou``), else
- the score recorded in the teacher's own folder: ``metrics.json`` of a run folder, or the
  ``metrics`` of an exported ``config.json``.

If the measured score is below ``ratio`` x the reference *and* more than ``margin`` below it
(absolute, 0-1 scale, so that near-zero references of barely trained demo teachers never trip it),
the run stops with one line, unless ``--skip-teacher-check``. A subset of the validation data, at
the run's input size, scores differently from the full benchmark: the check is a sanity bound,
not a reproduction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import TrainingError, ZooError

# zoo metric key (percent) and the evaluator's key (0-1) of each task's main score
MAIN = {"detection": ("box_map", "mAP"), "segmentation": ("miou", "mIoU")}


def check_teacher_kind(spec: Any, ref: str, flag: str = "--teacher") -> None:
    """A zoo entry with backbone-only (or no) weights cannot be a teacher (nor be evaluated): its
    heads are untrained."""
    if spec.weights_kind == "backbone":
        raise ZooError(f"{flag} {ref}: the zoo has only ImageNet backbone weights for it (weights_kind "
                       f"backbone), its {spec.architecture} head would be untrained; train it first "
                       f"(`kdcli train --model {ref}`) or import a trained one (`kdcli zoo import`)")


def reference_metric(spec: Any, source: str) -> tuple[float, str] | None:
    """(reference score on the 0-1 scale, where it comes from), or None."""
    zoo_key, key = MAIN[spec.task]
    if zoo_key in (spec.metric or {}):
        return float(spec.metric[zoo_key]) / 100.0, f"reported {zoo_key} of {spec.name}"
    folder = Path(source)
    if folder.is_dir():
        for fname, path in (("metrics.json", ()), ("config.json", ("metrics",))):
            f = folder / fname
            if not f.is_file():
                continue
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            for p in path:
                data = data.get(p, {}) if isinstance(data, dict) else {}
            if isinstance(data, dict) and isinstance(data.get(key), (int, float)):
                return float(data[key]), f"{key} recorded in {f}"
    return None


def teacher_check(teacher: Any, source: str, val_ds: Any, device: Any, images: int = 50, ratio: float = 0.5,
                  margin: float = 0.05, batch_size: int = 4, amp: str = "none",
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``teacher`` on the first ``images`` of ``val_ds`` and compare with its reference.

    Returns ``{"measured", "reference", "source", "images"}`` (``measured`` None when skipped);
    raises :class:`TrainingError` when the teacher is far below its reference."""
    import torch

    from ..data import collate_detection, collate_segmentation, subset
    from .evaluate_model import evaluate_model

    spec = teacher.spec
    ref = reference_metric(spec, source)
    _, key = MAIN[spec.task]
    if ref is None:
        log(f"teacher check: skipped, {source} has no reported or recorded {key} to compare with")
        return {"measured": None, "reference": None, "source": None, "images": 0}
    if images <= 0:
        log("teacher check: skipped (0 images)")
        return {"measured": None, "reference": ref[0], "source": ref[1], "images": 0}
    # tap names come from the strides of the model's first forward: let it be the usual dry run,
    # not a small validation image whose P6/P7 collapse to one stride
    _ = teacher.tap_info
    ds = subset(val_ds, images)
    collate = collate_detection if spec.task == "detection" else collate_segmentation
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=0)
    metrics = evaluate_model(teacher, loader, ds, device, amp=amp, label="teacher check")
    teacher.eval()  # evaluate_model restores the mode it found; a teacher stays in eval anyway
    measured = float(metrics.get(key, 0.0))
    reference, where = ref
    log(f"teacher check: {key} {measured:.4f} on {len(ds)} validation images vs {reference:.4f} ({where})")
    if measured < ratio * reference and reference - measured > margin:
        raise TrainingError(
            f"teacher check: --teacher {source} scores {key} {measured:.4f} on {len(ds)} validation images, "
            f"below {ratio:.0%} of its {reference:.4f} ({where}); its weights may not have loaded or the data's "
            "labels/normalisation differ - fix that, or pass --skip-teacher-check")
    return {"measured": measured, "reference": reference, "source": where, "images": len(ds)}
