"""Method registry: ``@register`` a :class:`Method` subclass; ``build`` finds it by name.

``build("cwd+fgd", ...)`` combines several methods; each keeps its own weight and options
(``--set cwd.weight=2``).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import Tensor

from ..errors import ConfigError, MethodError
from ..models.taps import ModelOutput, TapInfo
from .base import Method

_REGISTRY: dict[str, type[Method]] = {}
# Every module of this package except these is a method file, imported on first lookup.
_NOT_METHODS = {"base", "common"}


def register(cls: type[Method]) -> type[Method]:
    """Add ``cls`` to the registry; its presets must read as its Config (else this import fails)."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    cls.check_presets()
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> dict[str, type[Method]]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[Method]:
    methods = available()
    if name not in methods:
        raise MethodError(f"--method: unknown method '{name}' (valid: {', '.join(methods)})")
    return methods[name]


class MethodSet(Method):
    """The method(s) of a run, as :func:`build` always returns them; the engine sums their losses.

    Every hook of :class:`Method` is here too and delegates to the members, so a caller calls it on
    the set without looking inside; per-member results are keyed ``<method>.<key>``.
    """

    name = "+"

    def __init__(self, methods: dict[str, Method], task: str) -> None:
        super().__init__({}, {}, task)
        from torch import nn

        self.methods = nn.ModuleDict(methods)
        self.needs = tuple(dict.fromkeys(n for m in methods.values() for n in m.needs))

    @property
    def needs_targets_any(self) -> bool:
        return any(type(m).needs_targets for m in self.methods.values())

    def forward(self, s: ModelOutput, t: ModelOutput | None, targets: Any = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for m in self.methods.values():
            out.update(m(s, t, targets))
        return out

    def set_progress(self, epoch: int, it: int, epochs: int, iters_per_epoch: int) -> None:
        super().set_progress(epoch, it, epochs, iters_per_epoch)
        for m in self.methods.values():
            m.set_progress(epoch, it, epochs, iters_per_epoch)

    def teacher_forward(self, batch: Any, need: set[str]) -> ModelOutput | None:
        # at most one self-distillation teacher per run: the first method that makes one
        for m in self.methods.values():
            out = m.teacher_forward(batch, need)
            if out is not None:
                return out
        return None

    def on_epoch_end(self, student: Any, epoch: int) -> None:
        for m in self.methods.values():
            m.on_epoch_end(student, epoch)

    def student_binders(self) -> list[str]:
        """The members that need the student model itself (``binds_student``: PS-KD)."""
        return [name for name, m in self.methods.items() if m.binds_student]

    def bind_student(self, student: Any) -> None:
        for m in self.methods.values():
            if m.binds_student:
                m.bind_student(student)

    def stat_warnings(self, columns: dict[str, float]) -> dict[str, str]:
        return {k: v for m in self.methods.values() for k, v in m.stat_warnings(columns).items()}

    @property
    def last_stats(self) -> dict[str, float]:
        """Every member's :attr:`Method.last_stats`, keys prefixed with the member's name."""
        return {f"{name}.{k}": v for name, m in self.methods.items() for k, v in m.last_stats.items()}

    @property
    def teacher_notes(self) -> dict[str, str]:
        """The members' ``teacher_note`` where they have one."""
        return {name: m.teacher_note for name, m in self.methods.items() if m.teacher_note}

    def degenerate_terms(self, maps: dict[str, tuple[int, int]]) -> dict[str, str]:
        """``<method>.<tap>`` -> why, for each term that is exactly 0 for any input when the teacher's maps
        have these sizes (each member's :meth:`Method.degenerate`; taps without a size are skipped)."""
        return {f"{name}.{tap}": why for name, m in self.methods.items() for tap in m.taps
                if tap in maps and (why := m.degenerate(tap, maps[tap]))}

    def schedules(self) -> dict[str, float]:
        """Each member's current :meth:`Method.schedule` factor."""
        return {name: float(m.schedule()) for name, m in self.methods.items()}

    def internals(self, s: ModelOutput, t: ModelOutput, targets: Any = None,
                  query: tuple[float, float] = (0.5, 0.5)) -> dict[str, Tensor]:
        """Every method's :meth:`Method.internals`, keys prefixed with the method's name."""
        out: dict[str, Tensor] = {}
        for name, m in self.methods.items():
            out.update({f"{name}.{k}": v for k, v in m.internals(s, t, targets, query).items()})
        return out


def split_overrides(names: list[str], overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"cwd.weight": 2}`` → per-method dicts; unprefixed keys go to a single method."""
    per: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if dot and head in per:
            per[head][rest] = value
        elif len(names) == 1:
            per[names[0]][key] = value
        else:
            raise ConfigError(
                f"--set {key}: with several methods prefix the option with the method name "
                f"({', '.join(f'{n}.{key}' for n in names)})"
            )
    return per


def build(
    spec: str,
    student: dict[str, TapInfo],
    teacher: dict[str, TapInfo],
    task: str,
    overrides: dict[str, Any] | None = None,
) -> MethodSet:
    """Build the method(s) named by ``spec`` (``"cankd"`` or ``"cwd+fgd"``)."""
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not names:
        raise MethodError("--method: empty method name")
    per = split_overrides(names, overrides or {})
    built: dict[str, Method] = {}
    for n in names:
        cls = get(n)
        if task not in cls.tasks:
            raise MethodError(f"method '{n}' does not support {task} (it supports {', '.join(cls.tasks)})")
        hp = cls.resolve_hparams(task, per[n], f"--set {n}." if len(names) > 1 else "--set ")
        built[n] = cls(student, teacher, task, **hp)
    return MethodSet(built, task)


__all__ = ["Method", "MethodSet", "available", "build", "get", "register"]
