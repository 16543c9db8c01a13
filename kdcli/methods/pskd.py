r"""PS-KD — progressive self-knowledge distillation, with a *snapshot teacher* for dense outputs.

Paper: K. Kim, B. Ji, D. Yoon, S. Hwang, *Self-Knowledge Distillation with Progressive Refinement of
Targets*, ICCV 2021. Official code: lgcnsai/PS-KD-Pytorch (``loss/pskd_loss.py``, ``main.py``).
Method page: docs/methods/pskd.md. Self-distillation: no teacher model (``kdcli distill --method pskd``
without ``--teacher``, or ``kdcli train --method pskd``); a run with ``--teacher`` is refused, since the
engine would hand the teacher's output to PS-KD in place of its snapshot's.

Official method [code]: at epoch ``t`` (0-based) of ``T``, each sample is trained with the soft target

    ỹ = (1 − α_t) · onehot(y) + α_t · P_prev(x),        α_t = α_T · (t + 1) / T,   α_T = 0.8

and ``L = −Σ_c ỹ_c log softmax(z)_c`` (mean over the batch) **replacing** the cross-entropy. ``P_prev``
is the sample's softmax from its previous visit, kept in a ``[num_samples × C]`` memory; in epoch 0 the
memory holds the one-hot labels, so epoch 0 trains on the ground truth alone. (The schedule is
``(t + 1) / T``, checked in ``main.py``: it reaches α_T in the last epoch, not ``t / T``.)

Snapshot teacher (kdcli's deviation) [adaptation]: a per-sample
memory does not scale to dense outputs — RetinaNet at 800×1333 has ≈200k anchors × 80 classes per image,
≈3.8 TB in fp16 for COCO train; Cityscapes per pixel ≈237 GB — and geometric augmentation would need the
stored maps warped to each new crop. kdcli instead keeps a **frozen copy of the student taken at the end
of the previous epoch** (:meth:`on_epoch_end`; its BatchNorm statistics are the ones kdcli re-estimates
for that epoch's evaluation, copied before the next step) and runs it in eval mode, without gradients, on the
*current* augmented batch (:meth:`teacher_forward`); ``P_prev`` is its output. Differences from the
official memory: same augmentation view as the student (not the previous visit's), eval-mode BatchNorm,
end-of-epoch weights (not the weights at the sample's previous visit). Cost: one extra forward per step
and one model copy (the run's checkpoint holds it too: ``method.methods.pskd.snapshot.*``, so it resumes
with the run). Before the first snapshot exists (epoch 0) the loss is the ground truth alone (α = 0),
exactly like the official epoch 0; the method then returns no term and skips the snapshot forward.

The task losses of the model stay in place and PS-KD adds the *difference* that turns the hard-label term
into the soft-target one, so that ``task loss + pskd term`` is exactly the PS-KD objective:

- **segmentation** (per valid pixel, ignore index dropped): the model's ``ce`` is the mean over valid pixels
  of ``−log p_y`` on logits upsampled to the label size. Soft-target CE is linear in the target, so
  ``CE(z, ỹ) = (1 − α)·CE(z, y) + α·CE(z, P_prev)`` and the term is
  ``α · mean_valid(−Σ_c P_prev,c log p_c + log p_y)`` on the same upsampled logits (the snapshot's logits
  are upsampled the same way before the softmax). The auxiliary head's ``aux_ce`` stays on the labels.
- **RetinaNet / FCOS sigmoid heads** (kdcli's mapping): every non-ignored location gets per-class Bernoulli
  targets ``q̃_c = (1 − α)·1[c = y] + α·σ(z_prev,c)`` (background locations: ``y`` = none, so
  ``q̃ = α·σ(z_prev)``), from the student's own assignment (``extras["match"]``: RetinaNet IoU matcher,
  ignored locations dropped; FCOS centre sampling). The loss is the focal loss written for soft targets,
  ``f(z, q) = [a·q + (1−a)(1−q)] · BCE(z, q) · |q − σ(z)|^γ`` (a = 0.25, γ = 2), which equals
  torchvision's ``sigmoid_focal_loss`` for 0/1 targets; the term is ``Σ (f(z, q̃) − f(z, y))`` with the
  model's own normalisation (RetinaNet: per image ÷ max(1, positives of the image), mean over images;
  FCOS: ÷ max(1, positives of the batch)). So ``classification + pskd`` is the soft-target focal loss.
  Box regression and centreness are untouched. The detection recipe of the paper was not read
  [unverified]; this mapping is ours. Two-stage detectors (Faster/Mask R-CNN) expose no per-location
  ``cls_logits`` and are refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, MethodError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo
from . import register
from ._logits import box_labels, matched_locations
from .base import Method
from .common import float32_region, upcast


def alpha_schedule(epoch: int, epochs: int, alpha_T: float) -> float:
    """Official PS-KD schedule ``α_t = α_T · (t + 1) / T`` (``t`` 0-based), never below 0."""
    return max(0.0, float(alpha_T) * (epoch + 1) / max(1, epochs))


def soft_target_ce(logits: Tensor, labels: Tensor, p_prev: Tensor | None, alpha: float,
                   ignore_index: int = 255) -> Tensor:
    """PS-KD's loss for per-pixel logits ``(N, C, H, W)`` and labels ``(N, H, W)`` at the same size:
    mean over valid pixels of ``−Σ_c ỹ_c log softmax(z)_c`` with ``ỹ = (1−α)·onehot(y) + α·p_prev``."""
    logp = F.log_softmax(upcast(logits), 1)
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0)
    hard = -logp.gather(1, y[:, None])[:, 0]
    per_pixel = hard if p_prev is None or alpha == 0 else (
        (1 - alpha) * hard - alpha * (upcast(p_prev) * logp).sum(1))
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


def soft_focal(z: Tensor, q: Tensor, a: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss for soft targets ``q ∈ [0, 1]``; torchvision's for ``q ∈ {0, 1}``."""
    p = torch.sigmoid(z)
    bce = F.binary_cross_entropy_with_logits(z, q, reduction="none")
    weight = a * q + (1 - a) * (1 - q) if a >= 0 else torch.ones_like(q)
    return weight * bce * (q - p).abs() ** gamma


@register
class PSKD(Method):
    name = "pskd"
    paper = "PS-KD (Kim et al., ICCV 2021), self-KD; snapshot teacher for dense outputs"
    evidence = "loss parity-tested; dense mapping kdcli's (adapted)"
    needs_targets = True
    needs_teacher = False
    binds_student = True  # its soft targets come from a snapshot of the student (bind_student)
    presets = {
        # α_T 0.8: the official default (README / main.py); the other options are the task's own loss
        "segmentation": {"taps": ["seg_logits"], "alpha_T": 0.8, "ignore_index": 255},
        "detection": {"taps": ["cls_logits"], "alpha_T": 0.8, "focal_alpha": 0.25, "gamma": 2.0},
    }

    @dataclass
    class Config:
        """Options of ``pskd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt(
            ('seg_logits',), "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)"
        )
        alpha_T: float = opt(0.8, 'final weight α_T of the soft targets (linear in the epoch)')
        ignore_index: int = opt(255, 'label of ignored pixels')
        focal_alpha: float = opt(0.25, 'focal-loss α of the detection soft targets')
        gamma: float = opt(2.0, 'focal-loss γ of the detection soft targets')

    def __init__(self, student: dict[str, TapInfo], teacher: dict[str, TapInfo], task: str, **hp: Any) -> None:
        super().__init__(student, teacher, task, **hp)
        if len(self.taps) != 1:
            raise MethodError(f"method 'pskd': distils one logit tap (got {', '.join(self.taps)})")
        self.alpha_T = float(hp["alpha_T"])
        if not 0.0 <= self.alpha_T <= 1.0:
            raise ConfigError(f"--set alpha_T: expected a value in [0, 1] (got {self.alpha_T})")
        self.ignore_index = int(hp.get("ignore_index", 255))
        self.focal_alpha = float(hp.get("focal_alpha", 0.25))
        self.gamma = float(hp.get("gamma", 2.0))
        self.epochs = 1
        self.snapshot: nn.Module | None = None
        self.register_buffer("has_snapshot", torch.zeros((), dtype=torch.long))
        self.register_buffer("snapshot_epoch", torch.zeros((), dtype=torch.long))  # epochs done when taken
        self.register_buffer("bn_synced", torch.zeros((), dtype=torch.long))

    # -- snapshot ----------------------------------------------------------------------------
    def bind_student(self, student: nn.Module) -> None:
        """Create the snapshot model (a frozen copy of the student's structure) before any resume.

        It exists from the start so the run's checkpoint always has the same keys; until the first
        :meth:`on_epoch_end` it is unused (``has_snapshot`` = 0)."""
        student = getattr(student, "module", student)
        snap = copy.deepcopy(student)
        snap.requires_grad_(False)  # never trained: the trainer collects parameters with requires_grad
        snap.eval()
        self.snapshot = snap
        self.__dict__["_student"] = student  # a plain reference (not a submodule): BN statistics, below

    def train(self, mode: bool = True) -> PSKD:
        super().train(mode)
        if self.snapshot is not None:
            self.snapshot.eval()  # the teacher is always in eval mode
        return self

    @torch.no_grad()
    def on_epoch_end(self, student: nn.Module, epoch: int) -> None:
        if self.snapshot is None:
            self.bind_student(student)
        assert self.snapshot is not None
        src = getattr(student, "module", student).state_dict()
        self.snapshot.load_state_dict(src)
        self.has_snapshot.fill_(1)
        self.snapshot_epoch.fill_(epoch + 1)
        self.bn_synced.fill_(0)

    # -- schedule ----------------------------------------------------------------------------
    def set_progress(self, epoch: int, it: int, epochs: int, iters_per_epoch: int) -> None:
        super().set_progress(epoch, it, epochs, iters_per_epoch)
        self.epochs = epochs
        if int(self.has_snapshot) and not int(self.bn_synced):
            self._sync_buffers()

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Give the snapshot the student's buffers (BatchNorm statistics) as they are before the first step
        after the snapshot: the engine re-estimates BN statistics for evaluation *after* ``on_epoch_end``,
        and an eval-mode teacher should use those, not the training running averages."""
        student = self.__dict__.get("_student")
        if student is None or self.snapshot is None:
            return
        src = dict(student.named_buffers())
        for name, buf in self.snapshot.named_buffers():
            if name in src and src[name].shape == buf.shape:
                buf.copy_(src[name])
        self.bn_synced.fill_(1)

    def alpha(self) -> float:
        """α of the current epoch; 0 until a snapshot exists (the official epoch 0 is ground truth only)."""
        if self.snapshot is None or int(self.has_snapshot) == 0:
            return 0.0
        return alpha_schedule(self.epoch, self.epochs, self.alpha_T)

    def teacher_forward(self, batch: Any, need: set[str]) -> ModelOutput | None:
        if self.alpha() == 0.0:
            return None  # no soft targets yet: skip the extra forward
        assert self.snapshot is not None
        return self.snapshot(batch, need=set(self.taps), losses=False)

    # -- loss --------------------------------------------------------------------------------
    def forward(self, s: ModelOutput, t: ModelOutput | None, targets: Any = None) -> dict[str, Tensor]:
        tap = self.taps[0]
        key = f"{self.name}.{tap}"
        alpha = self.alpha()
        if t is None or alpha == 0.0:
            # no term at all (not a zero one): before the first snapshot the objective is the task loss
            # alone, and the engine's zero-loss guard must not mistake that epoch for a broken method
            return {}
        z, zt = s.taps[tap], t.taps[tap].detach()
        with float32_region(z):
            if self.task == "segmentation":
                return {key: self._segmentation(z, zt, targets, alpha)}
            return {key: self._detection(s, z, zt, targets, alpha)}

    def _segmentation(self, z: Tensor, zt: Tensor, targets: Any, alpha: float) -> Tensor:
        if not isinstance(targets, Tensor):
            raise MethodError("method 'pskd' needs the label map (targets) for segmentation")
        size = targets.shape[-2:]
        # the model's CE upsamples its logits to the label size: do the same, for both
        up = F.interpolate(upcast(z), size=size, mode="bilinear", align_corners=False)
        up_t = F.interpolate(upcast(zt), size=size, mode="bilinear", align_corners=False)
        logp = F.log_softmax(up, 1)
        valid = targets != self.ignore_index
        y = torch.where(valid, targets, 0)
        hard = -logp.gather(1, y[:, None])[:, 0]
        soft = -(F.softmax(up_t, 1) * logp).sum(1)
        return alpha * ((soft - hard) * valid).sum() / valid.sum().clamp(min=1)

    def _detection(self, s: ModelOutput, z: Tensor, zt: Tensor, targets: Any, alpha: float) -> Tensor:
        z, zt = upcast(z), upcast(zt)
        if z.dim() != 3 or zt.shape != z.shape:
            raise MethodError(f"method 'pskd': cls_logits of shape {tuple(z.shape)} (snapshot {tuple(zt.shape)}); "
                              "a one-stage detector (RetinaNet/FCOS) is needed")
        matched, onehot = location_targets(self.name, s, targets, z.shape[-1])
        onehot = onehot.to(z.dtype)
        q = (1 - alpha) * onehot + alpha * torch.sigmoid(zt)
        diff = soft_focal(z, q, self.focal_alpha, self.gamma) - soft_focal(z, onehot, self.focal_alpha, self.gamma)
        return normalise_like_task(diff, matched, is_fcos(s))


def is_fcos(s: ModelOutput) -> bool:
    head = s.extras.get("head", {})
    return isinstance(head, dict) and "bbox_ctrness" in head


def location_targets(name: str, s: ModelOutput, targets: Any, c: int) -> tuple[Tensor, Tensor]:
    """The student's assignment ``(N, L)`` (>=0 box, −1 background, −2 ignored) and the 0/1 class
    targets ``(N, L, C)`` the task loss uses (torchvision's RetinaNet/FCOS classification targets)."""
    matched = matched_locations(name, s, targets)
    labels = box_labels(matched, targets)
    onehot = F.one_hot(labels.clamp(0, c - 1), c).float() * (matched >= 0)[..., None]
    return matched, onehot


def normalise_like_task(per_element: Tensor, matched: Tensor, fcos: bool) -> Tensor:
    """Sum an ``(N, L, C)`` focal map over non-ignored locations with torchvision's normalisation:
    RetinaNet ÷ max(1, positives) per image then mean over images; FCOS ÷ max(1, positives of the batch)."""
    per_image = (per_element * (matched != -2)[..., None]).sum((1, 2))
    pos = matched >= 0
    if fcos:
        return per_image.sum() / pos.sum().clamp(min=1)
    return (per_image / pos.sum(1).clamp(min=1)).mean()


__all__ = ["PSKD", "alpha_schedule", "location_targets", "normalise_like_task", "soft_focal", "soft_target_ce"]
