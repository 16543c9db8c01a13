"""The engine's two hooks for ``--augment hard`` and PS-KD: attach the models a method needs, augment a batch.

HARD's transforms are in :mod:`kdcli.augment.ops`, its augmentor in :mod:`kdcli.augment.hard`.
"""

from __future__ import annotations

from typing import Any

from ..augment.hard import HardAugment
from ..errors import ConfigError


def _unwrap(m: Any) -> Any:
    return getattr(m, "module", m)  # DDP-wrapped modules


def attach_models(method: Any, cfg: Any, student: Any, teacher: Any) -> None:
    """Give the methods that need the models themselves what they need, once, before any resume.

    - PS-KD (``bind_student``): a frozen copy of the student becomes its snapshot teacher;
    - ``cfg.augment == "hard"``: a :class:`~kdcli.augment.hard.HardAugment` is attached to the method
      set as the submodule ``augment``, so its state is saved with the run's ``method.*`` tensors.
    """
    m = _unwrap(method)
    binders = m.student_binders() if m is not None else []
    if binders and teacher is not None:
        # the engine hands a teacher model's output to every method: PS-KD would silently take
        # the teacher's predictions for its own previous ones
        raise ConfigError(f"--method {binders[0]}: self-distillation takes its soft targets from its own "
                          "snapshot of the student; run it without --teacher")
    if binders:
        m.bind_student(student)
    kind = getattr(cfg, "augment", "none") or "none"
    if kind == "none":
        return
    if kind != "hard":
        raise ConfigError(f"--augment {kind}: expected none or hard")
    if teacher is None:
        raise ConfigError("--augment hard: needs a teacher (HARD searches for inputs where teacher and student "
                          "disagree)")
    aug = HardAugment(student.task, dict(getattr(cfg, "augment_set", {}) or {}))
    aug.bind(student, teacher, m, getattr(cfg, "amp", "none"))
    m.add_module("augment", aug.to(next(student.parameters()).device))


def augment_batch(run: Any, batch: Any) -> Any:
    """The training batch after HARD's augmentation (unchanged without ``--augment hard``)."""
    m = _unwrap(run.method) if run.method is not None else None
    aug = getattr(m, "augment", None) if m is not None else None
    return batch if aug is None else aug.step(batch)


__all__ = ["attach_models", "augment_batch"]
