"""One training step: the student and the method as the module DDP wraps (:class:`DistillStep`), and
:func:`train_step`, one forward of teacher, student and method.

The student preprocesses the batch once; the frozen teacher runs in eval mode under ``torch.no_grad()``
on the same input and computes only the taps the method needs (a self-distillation method makes its own
teacher output); the student (train mode) and the method run inside :class:`DistillStep`. Task and
distillation losses are summed into the total and returned apart (:class:`~kdcli.engine.result.StepResult`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import TrainingError
from ..runtime import autocast_ctx
from .augment import augment_batch
from .result import StepResult, by_method

if TYPE_CHECKING:
    from .build import Run


class DistillStep(nn.Module):
    """The student and the method's learnable parts as one module (what DDP wraps).

    ``forward(batch, t_out)`` runs the student and the method and returns the loss terms only: the
    model's own losses and the method's terms, apart (DDP finds the tensors in both); the student's
    output stays in :attr:`last` for the gradient guard and the step callbacks.
    """

    def __init__(self, student: nn.Module, method: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.last: Any = None

    def forward(self, batch: Any, t_out: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        s_out = self.student(batch)
        task: dict[str, Tensor] = dict(s_out.losses)
        method: dict[str, Tensor] = dict(self.method(s_out, t_out, batch.targets)) if self.method is not None else {}
        self.last = s_out
        return task, method


def to_device(images: Any, targets: Any, device: torch.device) -> tuple[Any, Any]:
    if isinstance(images, list):
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
    else:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    return images, targets


def train_step(run: Run, images: Any, targets: Any) -> StepResult:
    """One forward of student (+ teacher + method); returns the total loss and each term, task and
    distillation apart.

    The terms are checked by the run's :class:`~kdcli.engine.guards.LossGuard` in the loop (after they
    are averaged over ranks); here, at the first steps, the guard looks for distillation terms without
    gradient to the student. The run's callbacks see each step's outputs on the main rank."""
    images, targets = to_device(images, targets, run.device)
    batch = run.student.preprocess(images, targets)
    batch = augment_batch(run, batch)  # HARD (engine/augment.py); unchanged without --augment hard
    if run.cfg.channels_last:
        batch.images = batch.images.contiguous(memory_format=torch.channels_last)
    with autocast_ctx(run.device, run.cfg.amp):
        t_out = None
        if run.method is not None:
            with torch.no_grad():
                if run.teacher is not None:
                    t_out = run.teacher(batch, need=set(run.method.needs), losses=False)
                else:  # self-distillation: the method makes its own teacher output, or none
                    t_out = run.method.teacher_forward(batch, set(run.method.needs))
        task, method = run.wrapped(batch, t_out)
    if run.guard is not None and run.guard.needs_grad_check():
        # fp16 gradients of small losses can underflow to exactly 0: look at them scaled, as GradScaler does
        run.guard.inspect_gradients(by_method(method), run.inner_step.last, 65536.0 if run.cfg.amp == "fp16" else 1.0)
    if run.dist.is_main:  # e.g. mask statistics every few steps (engine/monitor.py), never in the loss
        for callback in run.callbacks:
            callback.on_step(run, run.inner_step.last, t_out, batch.targets)
    run.inner_step.last = None
    terms = [*task.values(), *method.values()]  # summed in this order, as before the split
    if not terms:
        raise TrainingError("the model returned no loss: does the training data have targets?")
    values = torch.stack([v.detach().float().reshape(()) for v in terms]).tolist()  # one device sync for all terms
    total = sum(v.float() for v in terms)
    return StepResult.of(dict(zip(task, values[:len(task)], strict=True)),
                         dict(zip(method, values[len(task):], strict=True)), total)
