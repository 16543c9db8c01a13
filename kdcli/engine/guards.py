"""Guards against silent failure, and a clean stop on SIGINT/SIGTERM.

A distillation run can fail without crashing: a loss that became NaN, a loss that is exactly zero
because the method reads the wrong tensor, or a loss whose graph does not reach the student (taps
taken from a copy, a ``detach`` too many) so it trains the method's adapters and nothing else.
:class:`LossGuard` stops the run, naming the method and the tap, when a distillation term is

- non-finite (checked before the backward pass, so the bad step never reaches the weights);
- exactly zero for ``zero_steps`` consecutive steps (``--zero-loss-steps``, 0 disables);
- non-zero but without gradient with respect to every student tap, on each of its first
  :data:`GRAD_CHECK_STEPS` non-zero steps: ``torch.autograd.grad`` down to the student's tap
  tensors only (the backbone is not traversed) at each non-zero step of a (method, tap) group
  until it first shows a gradient, so a healthy group costs a fraction of one backward, once.

The guard reads each step's :class:`~kdcli.engine.result.StepResult`: task losses and each method's
terms apart. A method's terms are grouped by tap: acam's ``p3`` and ``p3.div`` form the group
``acam.p3``, freekd's ``mse.p3`` joins ``freekd.p3``. Under DDP the checks run on values and flags summed over
ranks, so every rank takes the same decision at the same step.

Zeros that are not failures do not count towards ``zero_steps``:

- a group that is 0 for any input by construction at the run's map sizes (``exempt``, found before
  training by the engine from each method's :meth:`~kdcli.methods.base.Method.degenerate`: CWD or
  CanKD on a 1×1 FPN level) is left out of the zero and gradient checks;
- a step where the method's current weight factor (:meth:`~kdcli.methods.base.Method.schedule`, e.g.
  a warm-up from 0) is exactly 0 neither counts nor resets the group's run of zeros.

A term that is 0 while its method's factor is non-zero and its map is not degenerate (a tap that
resolves to the wrong tensor, an empty mask, ``--set weight=0``) still stops the run.

:class:`GracefulStop` turns SIGINT/SIGTERM into a flag the training loop reads at each step
boundary: it saves a checkpoint there and raises :class:`Interrupted`. A second SIGINT interrupts
at once (:class:`~kdcli.errors.UserInterrupt`, exit 130).
"""

from __future__ import annotations

import math
import signal
import threading
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from ..errors import TrainingError, UserInterrupt
from .result import StepResult, term_key

GRAD_CHECK_STEPS = 20  # non-zero steps without gradient before a (method, tap) group stops the run


class Interrupted(TrainingError):
    """SIGINT/SIGTERM: a checkpoint was saved; the message says how to resume."""

    exit_code = 130
    resumable = True  # the CLI prints the message without "error:"


class LossGuard:
    """Checks every step's loss terms; see the module docstring."""

    def __init__(self, method: Any, zero_steps: int = 50, grad_steps: int | None = None,
                 exempt: dict[str, str] | None = None) -> None:
        self.zero_steps = max(0, int(zero_steps))
        self.grad_steps = max(1, int(GRAD_CHECK_STEPS if grad_steps is None else grad_steps))
        self.taps: dict[str, set[str]] = {}
        self.members: dict[str, Any] = {}  # method name -> the method (its current weight factor)
        if method is not None:
            for name, m in method.methods.items():
                self.taps[name] = set(m.needs) | set(m.taps)
                self.members[name] = m
        # group -> why its term is 0 for any input (not counted by the zero and gradient checks)
        self.exempt: dict[str, str] = dict(exempt or {})
        self.zero_run: dict[str, int] = {}  # group -> consecutive steps at exactly zero
        self.grad_ok: set[str] = set()  # groups seen giving the student a gradient
        self.grad_misses: dict[str, int] = {}  # group -> non-zero steps without gradient so far
        self._pending: list[str] = []  # groups found without gradient at this step (before reduction)
        self._n_groups: int | None = None  # distillation groups, known after the first step
        self.saved = False  # whether the run has a checkpoint to fall back on (set by the training loop)

    # -- grouping ---------------------------------------------------------------------------------
    def group(self, key: str) -> str:
        """``method.tap`` for a method term's flat key ``<method>.<term>`` (see :meth:`group_of`)."""
        method, _, term = key.partition(".")
        return self.group_of(method, term)

    def group_of(self, method: str, term: str) -> str:
        """``method.tap`` for one of a method's terms (``method`` alone when no part of it is one of its taps)."""
        taps = self.taps.get(method, set())
        tap = next((p for p in term.split(".") if p in taps), None)
        return f"{method}.{tap}" if tap else method

    @staticmethod
    def describe(group: str) -> str:
        method, _, tap = group.partition(".")
        return f"method '{method}', tap '{tap}'" if tap else f"method '{method}'"

    def switched_off(self, group: str) -> bool:
        """The group's method has a current weight factor of exactly 0 (a schedule, not a failure)."""
        schedule = getattr(self.members.get(group.partition(".")[0]), "schedule", None)
        return callable(schedule) and float(schedule()) == 0.0

    # -- gradient reachability (local; decided after reduction) ------------------------------------
    def needs_grad_check(self) -> bool:
        return self._n_groups is None or len(self.grad_ok) < self._n_groups

    def inspect_gradients(self, distill: dict[str, dict[str, Tensor]], student_out: Any, scale: float = 1.0) -> None:
        """Look for groups with a non-zero loss and no gradient to any student tap.

        A group is cleared at its first step with a gradient. It is flagged after ``grad_steps``
        non-zero steps without one: a random mask can legitimately cut every path on one step (MGD
        on a 1×1 P7), never on twenty."""
        groups: dict[str, list[Tensor]] = {}
        for method, terms in distill.items():  # each method's terms, by name
            for term, v in terms.items():
                g = self.group_of(method, term)
                if g not in self.exempt:  # exempt: 0 for any input, no gradient
                    groups.setdefault(g, []).append(v)
        self._n_groups = len(groups)
        self._pending = []
        todo = {g: vs for g, vs in groups.items() if g not in self.grad_ok}
        if not todo or student_out is None:
            return
        taps = [t for t in student_out.taps.values() if isinstance(t, Tensor) and t.requires_grad]
        for g, vs in todo.items():
            total = sum(v.float() for v in vs)
            if not isinstance(total, Tensor) or float(total.detach()) == 0.0:
                continue  # a zero loss is the zero guard's business; check when it is non-zero
            reached = False
            if total.requires_grad and taps:
                grads = torch.autograd.grad(total * scale, taps, retain_graph=True, allow_unused=True)
                reached = any(gr is not None and bool((gr != 0).any()) for gr in grads)
            if reached:
                self.grad_ok.add(g)
                self.grad_misses.pop(g, None)
                continue
            self.grad_misses[g] = self.grad_misses.get(g, 0) + 1
            if self.grad_misses[g] >= self.grad_steps:
                self._pending.append(g)

    # -- the per-step decision ------------------------------------------------------------------
    def flags(self, result: StepResult) -> list[float]:
        """One 0/1 per term, in :meth:`StepResult.terms` order: its group was found without gradient on
        this rank at this step (task losses: always 0)."""
        pending = set(self._pending)
        self._pending = []
        return [0.0] * len(result.task) + [1.0 if self.group_of(m, t) in pending else 0.0
                                           for m, terms in result.distill.items() for t in terms]

    def check(self, result: StepResult, no_grad: list[str] | None = None) -> None:
        """Raise :class:`TrainingError` for a non-finite term, a long run of zeros, or a term without gradient.
        ``no_grad``: the flat keys of the method terms flagged by :meth:`flags` on any rank."""
        where = [(f"task loss '{k}'", v) for k, v in result.task.items()]
        where += [(f"{self.describe(self.group_of(m, t))} (term '{term_key(m, t)}')", v)
                  for m, terms in result.distill.items() for t, v in terms.items()]
        for what, v in where:
            if not math.isfinite(v):
                kept = "the last good checkpoint is kept" if self.saved else \
                    "no checkpoint was written yet (the run stopped before its first one)"
                raise TrainingError(f"non-finite loss in {what} ({v}); {kept}. "
                                    "Lower --lr or the method's weight (--set weight=...)")
        for g in dict.fromkeys(self.group(k) for k in no_grad or []):
            raise TrainingError(
                f"the distillation loss of {self.describe(g)} gives no gradient to the student (it is computed "
                "from tensors outside the student's graph); the run would train the method's own parts only")
        if not self.zero_steps:
            return
        sums: dict[str, float] = {}
        for m, terms in result.distill.items():
            for t, v in terms.items():
                g = self.group_of(m, t)
                sums[g] = sums.get(g, 0.0) + abs(v)
        for g, s in sums.items():
            if g in self.exempt or (s == 0.0 and self.switched_off(g)):
                continue  # 0 by construction, or weighted 0 by the method's schedule at this step
            self.zero_run[g] = self.zero_run.get(g, 0) + 1 if s == 0.0 else 0
            if self.zero_run[g] >= self.zero_steps:
                raise TrainingError(
                    f"the distillation loss of {self.describe(g)} has been exactly 0 for {self.zero_run[g]} "
                    "consecutive steps: it teaches the student nothing (wrong tap, empty mask, zero weight?). "
                    "Check --set taps=/weight=, or disable this guard with --zero-loss-steps 0")

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"zero_run": dict(self.zero_run), "grad_ok": sorted(self.grad_ok),
                "grad_misses": dict(self.grad_misses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.zero_run = {str(k): int(v) for k, v in state.get("zero_run", {}).items()}
        self.grad_ok = set(state.get("grad_ok", []))
        self.grad_misses = {str(k): int(v) for k, v in state.get("grad_misses", {}).items()}


class GracefulStop:
    """Context manager: SIGINT/SIGTERM set :attr:`requested` (the loop stops at the next step boundary).

    Handlers are installed only in the main thread (Python's rule) and restored on exit. A second
    SIGINT raises :class:`~kdcli.errors.UserInterrupt` immediately.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise UserInterrupt("interrupted by a second Ctrl-C: stopped at once, without a new checkpoint "
                                "(the run folder keeps its last one)")
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def ignore_sigint_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C goes to the whole process group; workers must keep
    serving batches until the training process reaches its step boundary and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
