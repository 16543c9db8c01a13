r"""MCMI — maximum conditional mutual information teacher training (``kdcli train --objective mcmi``).

Paper: L. Ye, S. Mohajer Hamidi, R. Tan, E.-H. Yang, *Bayes Conditional Distribution Estimation for
Knowledge Distillation Based on Conditional Mutual Information*, ICLR 2024 (arXiv 2401.08732).
Official code: iclr2024mcmi/ICLRMCMI (``CIFAT-100KD/FineTuneTeacher.py``, ``centroid.py``,
``CIFAR100-FewShot/losses.py`` ``CE_KL_PWCE_loss``). Method page: docs/methods/mcmi.md.

Not a distillation loss: a *teacher-training objective*. A normally trained model is fine-tuned with

    L = CE(z, y) − λ · Î(X; Ŷ | Y),      Î = (1/n) Σ_i KL(P_{x_i} ‖ Q_{y_i}),   λ = 0.15        (MCMI)

``P_x = softmax(z(x))`` (τ = 1) and the class centroid ``Q_y`` = the mean of ``P_x`` over samples of class
``y`` (rows renormalised), detached [code: ``F.kl_div(Q[y].log(), log_softmax(z), log_target=True,
reduction="batchmean")`` is KL(P ‖ Q_y) ÷ batch]. Subtracting the CMI *maximises* it: each sample's
prediction is pushed away from its class prototype (more "contextual" soft labels), while CE keeps it
correct. λ = 0.15 is the value of the official KD example script (``runKD0.sh``) and of the few-shot
logs. The resulting model is an ordinary checkpoint, usable as ``--teacher`` by any method.

The engine adds the model's task loss (the CE); this method returns only ``−λ · Î`` (key ``mcmi.<tap>``,
negative by design).

Dense mapping [adaptation, kdcli's]:

- **segmentation**: one sample per valid pixel of ``seg_logits`` (labels resized to the logit size with
  ``nearest``; ignore index 255 dropped from the term *and* from the centroids); ``Q`` is C×C.
- **RetinaNet / FCOS**: one sample per *positive* location of the student's own assignment, ``P`` =
  softmax over the C−1 real class logits (as in :mod:`kdcli.methods._logits`; torchvision's never-used
  background column 0 is dropped), ``Q`` is (C−1)×(C−1). Background and ignored locations take no part. Two-stage
  detectors expose no per-location logits and are refused.

Centroids (``centroids`` option) [code + deviation]: the released script computes ``Q`` *once*, before
fine-tuning, with one no-grad pass over the training loader in train mode; a per-batch EMA exists in
``centroid.py`` but is commented out; whether the paper refreshes per batch or per epoch is
[unverified]. kdcli has no extra data pass in its loop, so:

- ``epoch`` (default): ``Q`` for epoch t is the mean of the (detached, train-mode) predictions of epoch
  t−1's own training steps — the released script's "one train-mode pass", refreshed each epoch at no
  extra cost. During the first epoch (no previous epoch) and for a class the previous epoch never saw,
  ``Q`` is the running mean of the current epoch's predictions so far, the current batch included.
- ``batch``: ``Q`` from the current batch alone.

The running sums (C×C, a count per class) and the centroids are buffers: saved with the run
(``method.*``) and resumed; in DDP each step's class sums are all-reduced (C×C + C numbers), so the
centroids are those of the global batch and identical on every rank. The fine-tuning recipe
of the official code (20 epochs, SGD lr 0.05 momentum 0.9, wd 5e-4, cosine) is a matter of ``kdcli train``
options; its model selection on the *test* set is not reproduced (kdcli keeps the best validation epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, MethodError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo
from . import register
from ._logits import check_choice, location_samples, pixel_samples
from .base import Method
from .common import float32_region, zero_loss

CENTROID_MODES = ("epoch", "batch")
_EPS = 1e-12


def class_means(p: Tensor, labels: Tensor, weight: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-class sums ``(k, k)`` of the rows ``p`` (weighted) and the per-class counts ``(k,)``."""
    sums = torch.zeros(k, p.shape[1], dtype=p.dtype, device=p.device).index_add_(0, labels, p * weight[:, None])
    counts = torch.zeros(k, dtype=p.dtype, device=p.device).index_add_(0, labels, weight)
    return sums, counts


def cmi(logits: Tensor, labels: Tensor, centroids: Tensor, weight: Tensor | None = None) -> Tensor:
    """``Î = mean_i KL(softmax(z_i) ‖ Q_{y_i})`` over rows with weight 1 (``Q`` rows renormalised)."""
    logp = F.log_softmax(logits, -1)
    q = centroids.clamp_min(_EPS)
    log_q = (q / q.sum(-1, keepdim=True)).log()[labels]
    kl = (logp.exp() * (logp - log_q)).sum(-1)
    if weight is None:
        return kl.mean()
    return (kl * weight).sum() / weight.sum().clamp(min=1)


@register
class MCMI(Method):
    name = "mcmi"
    paper = "MCMI (Ye et al., ICLR 2024): teacher objective CE − λ·CMI"
    evidence = "loss parity-tested; dense mapping kdcli's"
    needs_targets = True
    needs_teacher = False
    teacher_note = "no (teacher training: kdcli train --objective mcmi)"
    presets = {
        "segmentation": {"taps": ["seg_logits"], "weight": 0.15, "centroids": "epoch", "ignore_index": 255},
        "detection": {"taps": ["cls_logits"], "weight": 0.15, "centroids": "epoch"},
    }

    @dataclass
    class Config:
        """Options of ``mcmi`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt(
            ('seg_logits',), "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)"
        )
        weight: float = opt(0.15, 'weight λ of the CMI term (subtracted)')
        centroids: Literal["epoch", "batch"] = opt('epoch', 'class centroids per epoch or per batch')
        ignore_index: int = opt(255, 'label of ignored pixels')

    def __init__(self, student: dict[str, TapInfo], teacher: dict[str, TapInfo], task: str, **hp: Any) -> None:
        super().__init__(student, teacher, task, **hp)
        if len(self.taps) != 1:
            raise MethodError(f"method 'mcmi': works on one logit tap (got {', '.join(self.taps)})")
        if self.weight < 0:
            raise ConfigError(f"--set weight: λ must be >= 0 (got {self.weight})")
        self.mode = check_choice("centroids", str(hp["centroids"]), CENTROID_MODES)
        self.ignore_index = int(hp.get("ignore_index", 255))
        c = student[self.taps[0]].channels
        # detection: softmax over the C-1 real classes at positives (torchvision's column 0 is background)
        k = c if task == "segmentation" else c - 1
        if k < 2:
            raise MethodError(f"method 'mcmi': tap '{self.taps[0]}' has {c} outputs; CMI needs >= 2 classes")
        self.k = k
        self.register_buffer("centroids", torch.full((k, k), 1.0 / k))  # Q used in this epoch
        self.register_buffer("seen", torch.zeros(k))  # samples behind each row of `centroids`
        self.register_buffer("sums", torch.zeros(k, k))  # this epoch's running sums
        self.register_buffer("counts", torch.zeros(k))

    def forward(self, s: ModelOutput, t: ModelOutput | None, targets: Any = None) -> dict[str, Tensor]:
        tap = self.taps[0]
        z = s.taps[tap]
        with float32_region(z):
            if z.dim() == 4:
                smp = pixel_samples(self.name, tap, z, None, targets, self.ignore_index, need_labels=True)
            else:
                smp = location_samples(self.name, tap, s, z, None, targets, positives=True)
            if smp.labels is None:
                return {f"{self.name}.{tap}": zero_loss(z)}
            # no valid pixel / no positive location: the weighted mean below is 0 (no host sync here)
            q = self._centroids(smp.s, smp.labels, smp.weight)
            value = cmi(smp.s, smp.labels, q, smp.weight)
        return {f"{self.name}.{tap}": -self.weight * value}

    @torch.no_grad()
    def _centroids(self, logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """Q for this step (detached); in training also accumulates this epoch's sums."""
        p = F.softmax(logits.detach(), -1)
        sums, counts = class_means(p, labels, weight, self.k)
        if self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank adds the global batch: the buffers stay identical across ranks (DDP broadcasts
            # rank 0's buffers before each forward, which would otherwise drop the other ranks' data)
            stacked = torch.cat([sums, counts[:, None]], 1)
            torch.distributed.all_reduce(stacked)
            sums, counts = stacked[:, :-1], stacked[:, -1]
        if self.mode == "batch":
            return sums / counts.clamp(min=1)[:, None]
        run_sums = self.sums + sums.to(self.sums)
        run_counts = self.counts + counts.to(self.counts)
        if self.training:
            self.sums.copy_(run_sums)
            self.counts.copy_(run_counts)
        running = run_sums / run_counts.clamp(min=1)[:, None]
        return torch.where((self.seen > 0)[:, None], self.centroids, running.to(self.centroids))

    @torch.no_grad()
    def on_epoch_end(self, student: Any, epoch: int) -> None:
        """This epoch's class means become next epoch's centroids (classes not seen keep theirs)."""
        if self.mode == "batch":
            return
        sums, counts = self.sums, self.counts  # already global in DDP (see _centroids)
        got = counts > 0
        self.centroids.copy_(torch.where(got[:, None], sums / counts.clamp(min=1)[:, None], self.centroids))
        self.seen.copy_(torch.where(got, counts, self.seen))
        self.sums.zero_()
        self.counts.zero_()


__all__ = ["CENTROID_MODES", "MCMI", "class_means", "cmi"]
