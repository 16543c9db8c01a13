"""One training step's losses, task and distillation apart (what :func:`kdcli.engine.step.train_step` returns).

The model's own losses (``classification``, ``bbox_regression``, ``seg``...) are the task terms; each
method's terms are kept under the method's name, by term (``{"acam": {"p3": .., "p3.div": ..}}``), as
the method returns them (``<method>.<tap>[.<part>]``). Consumers read the two parts, never key names.

``results.csv`` stores every term in one ``loss/<term>`` column, a method's as ``<method>.<term>``;
:func:`loss_columns` reads such columns back into the same two parts. No torch at import: the plots
and the benchmarks read results.csv through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

V = TypeVar("V")


def by_method(terms: Mapping[str, V]) -> dict[str, dict[str, V]]:
    """A method's output ``{"<method>.<term>": v}`` as ``{method: {term: v}}``, in the given order."""
    out: dict[str, dict[str, V]] = {}
    for key, v in terms.items():
        method, _, term = key.partition(".")
        out.setdefault(method, {})[term] = v
    return out


def term_key(method: str, term: str) -> str:
    """The flat name of a method's term: its ``loss/`` column in results.csv and its guard key."""
    return f"{method}.{term}"


@dataclass
class StepResult:
    """``total``: the loss tensor the backward pass starts from; ``task``: the model's own losses;
    ``distill``: each method's terms. Values are floats (one device sync per step)."""

    total: Any
    task: dict[str, float] = field(default_factory=dict)
    distill: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, task: Mapping[str, float], method_terms: Mapping[str, float], total: Any = None) -> StepResult:
        """From the model's losses and the method's output as the method returns it."""
        return cls(total, dict(task), by_method(method_terms))

    def terms(self) -> dict[str, float]:
        """Every term under its flat name (results.csv's ``loss/`` columns): task terms, then each method's."""
        out = dict(self.task)
        for method, terms in self.distill.items():
            out.update({term_key(method, t): v for t, v in terms.items()})
        return out

    def with_values(self, values: Iterable[float]) -> StepResult:
        """The same terms with new values, given in :meth:`terms` order (e.g. averaged over ranks)."""
        it = iter(values)
        task = {k: next(it) for k in self.task}
        distill = {m: {t: next(it) for t in terms} for m, terms in self.distill.items()}
        return StepResult(self.total, task, distill)


def loss_columns(columns: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    """results.csv's ``loss/...`` columns as (the task columns, method -> its columns), in file order.
    A task loss never has a dot in its name; a method's term is ``<method>.<term>``."""
    task: list[str] = []
    methods: dict[str, list[str]] = {}
    for col in columns:
        if not col.startswith("loss/"):
            continue
        method, dot, _ = col[5:].partition(".")
        if dot:
            methods.setdefault(method, []).append(col)
        else:
            task.append(col)
    return task, methods
