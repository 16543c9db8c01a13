"""Helpers shared by the method tests: tap infos, model outputs, a method built from its preset."""

from __future__ import annotations

from torch import Tensor

from kdcli.models.taps import ModelOutput, TapInfo


def infos(**channels: int) -> dict[str, TapInfo]:
    """Tap infos by name: logits at stride 0 for ``cls_logits``, every other tap at stride 8."""
    return {
        name: TapInfo(name, c, 0 if name == "cls_logits" else 8, "logits" if "logits" in name else "feature")
        for name, c in channels.items()
    }


def out(**taps: Tensor) -> ModelOutput:
    return ModelOutput(taps=dict(taps))


def make(cls: type, task: str, student: dict, teacher: dict, **overrides: object):
    """``cls`` built with its ``task`` preset and ``overrides``, as ``kdcli.methods.build`` does."""
    return cls(student, teacher, task, **cls.resolve_hparams(task, overrides))


def one(losses: dict[str, Tensor]) -> Tensor:
    assert len(losses) == 1
    return next(iter(losses.values()))
