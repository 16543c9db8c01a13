r"""KD — temperature-scaled logit distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge
in a Neural Network", NIPS 2014 Deep Learning Workshop, arXiv 1503.02531), applied per pixel
(segmentation) and per anchor location (dense sigmoid detection heads).

Method page: docs/methods/kd.md. Samples, reductions and the student's assignment come from
:mod:`kdcli.methods._logits`. Per sample ``i`` (a pixel or a location)::

    softmax    ℓ_i = τ² · R_c[ p_t,c (log p_t,c − log p_s,c) ],          p = softmax(z/τ) over the classes
    bernoulli  ℓ_i = τ² · R_c[ p log(p/q) + (1−p) log((1−p)/(1−q)) ],   p = σ(z_t,c/τ), q = σ(z_s,c/τ)
    positives  the softmax form at the student's positive locations only, over the C−1 real classes
               (torchvision's background column 0 dropped)                                   (LD)
    L = w · S_i[ ℓ_i ]

``R_c`` is ``class_reduction`` (``sum`` | ``mean``) and ``S_i`` is ``sample_reduction``: ``mean`` over
the samples that count, ``sum``, ``avg_factor`` (mmdet's: ÷ (Σ_images max(#positives, 1) + float32 eps);
detection) or ``level`` (per FPN level ÷ that level's positives, summed, no ε as in LD's mmdet 2.10;
detection). Which codebase does what, and how to reproduce it:

===========================================  ==========================================================
official loss                                kdcli settings
===========================================  ==========================================================
mdistiller / cls_KD KD (per image)           ``class_reduction=sum sample_reduction=mean`` (default)
TorchDistiller pixel-wise KD (``spatial``)   segmentation preset: softmax, sum, mean over N·h·w pixels
LD main KD (``KnowledgeDistillationKLDiv``)  ``mode=positives class_reduction=mean sample_reduction=level
                                             weight=10 tau=8`` (RetinaNet; ``tau=2`` for FCOS)
Bernoulli KD, BCKD's / CrossKD's reduction   ``mode=bernoulli drop_ignored=true sample_reduction=avg_factor``
(both also multiply by ``|σ_t − σ_s|^β``)    (the modulated loss with box KD is method ``bckd``)
===========================================  ==========================================================

Deviations and assumptions:

- KL form, not the cross-entropy form: the loss is 0 for identical logits. cls_KD and BCKD write
  the term as a cross-entropy, which differs by the teacher's entropy (a constant for the
  student: same gradient, different value).
- Detection default (our choice, no official per-location KD config for torchvision heads): the
  Bernoulli form at every location, τ = 1, w = 1, ÷ the number of locations. ``drop_ignored=true``
  drops the locations RetinaNet's matcher ignores (IoU in [0.4, 0.5)); FCOS ignores none.
- No hard-label cross-entropy term: the student's own task loss plays that role.
- Segmentation: when the two logit maps differ in size, the smaller is resized to the larger
  (bilinear, ``align_corners=False``), per dimension; the label is resized with ``nearest`` to
  build the ignore mask. ``ignore_index_mask`` defaults to False (TorchDistiller uses every pixel);
  with it the 255 pixels are dropped, and if every pixel is ignored the loss is 0.
- Every log-probability is computed with ``log_softmax``/``logsigmoid`` in float32 (fp16/bf16
  inputs upcast, autocast disabled).

Heterogeneous pairs: the class lists must be the same (same K or C, checked from the tap info at
construction) and, for detection, the same anchor layout (same L, checked at forward time);
otherwise a :class:`~kdcli.errors.MethodError` asks for a feature method instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from ..errors import ConfigError, MethodError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo
from . import register
from ._logits import (
    CLASS_REDUCTIONS,
    SAMPLE_REDUCTIONS,
    bernoulli_kl,
    bernoulli_kl_total,
    check_choice,
    location_samples,
    pixel_samples,
    reduce_classes,
    reduce_samples,
    softmax_kl,
)
from .base import Method
from .common import float32_region, upcast

MODES = ("softmax", "bernoulli", "positives")

__all__ = ["KD", "bernoulli_kl", "softmax_kl"]


@register
class KD(Method):
    """Temperature-scaled logit KD (see the module docstring for equations and deviations)."""

    name = "kd"
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network (arXiv 1503.02531, 2015)"
    evidence = "parity-tested (LD mode)"
    tasks = ("detection", "segmentation")
    needs_targets = False  # only the positives mode, the detection reductions and the ignore mask use them
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # our choice: no official per-location KD config for torchvision sigmoid heads
        "detection": {
            "taps": "cls_logits",
            "weight": 1.0,
            "tau": 1.0,
            "mode": "bernoulli",
            "class_reduction": "sum",
            "sample_reduction": "mean",
            "drop_ignored": False,
        },
        # TorchDistiller pixel-wise KD: τ = 1, weight 1, sum over classes ÷ N·h·w
        "segmentation": {
            "taps": "seg_logits",
            "weight": 1.0,
            "tau": 1.0,
            "mode": "softmax",
            "class_reduction": "sum",
            "sample_reduction": "mean",
            "ignore_index_mask": False,
            "ignore_index": 255,
        },
    }

    @dataclass
    class Config:
        """Options of ``kd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('cls_logits', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        weight: float = opt(1.0, 'loss weight per tap')
        tau: float = opt(1.0, 'softmax temperature τ')
        mode: Literal["softmax", "bernoulli", "positives"] = opt(
            'bernoulli', 'softmax over classes, per-class bernoulli, or positives only'
        )
        class_reduction: Literal["sum", "mean"] = opt('sum', 'sum or mean of the KL over classes')
        sample_reduction: Literal["mean", "sum", "avg_factor", "level"] = opt(
            'mean', 'how per-sample losses are reduced'
        )
        drop_ignored: bool = opt(False, 'drop locations the detector ignores')
        ignore_index_mask: bool = opt(False, 'leave out pixels labelled ignore_index')
        ignore_index: int = opt(255, 'label of ignored pixels')

    def __init__(
        self,
        student: dict[str, TapInfo],
        teacher: dict[str, TapInfo],
        task: str,
        **hp: Any,
    ) -> None:
        super().__init__(student, teacher, task, **hp)
        self.tau = float(hp["tau"])
        if self.tau <= 0:
            raise ConfigError(f"--set tau: the temperature must be > 0 (got {self.tau})")
        self.mode = check_choice("mode", str(hp["mode"]), MODES)
        self.class_reduction = check_choice("class_reduction", str(hp["class_reduction"]), CLASS_REDUCTIONS)
        self.sample_reduction = check_choice("sample_reduction", str(hp["sample_reduction"]), SAMPLE_REDUCTIONS)
        if task == "segmentation" and (self.mode == "positives" or self.sample_reduction in ("avg_factor", "level")):
            raise ConfigError(f"--set mode={self.mode}, sample_reduction={self.sample_reduction}: positives, "
                              "avg_factor and level are for detection heads")
        self.ignore_index_mask = bool(hp.get("ignore_index_mask", False))
        self.ignore_index = int(hp.get("ignore_index", 255))
        self.drop_ignored = bool(hp.get("drop_ignored", False))
        for tap in self.taps:
            cs, ct = student[tap].channels, teacher[tap].channels
            if cs != ct:
                raise MethodError(
                    f"method 'kd': tap '{tap}' has {cs} classes in the student but {ct} in the "
                    "teacher; logit KD needs the same class list (use a feature method instead)"
                )

    def forward(self, s: ModelOutput, t: ModelOutput, targets: Any = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for tap in self.taps:
            zs, zt = s.taps[tap], t.taps[tap]
            with float32_region(zs):
                out[f"{self.name}.{tap}"] = self.weight * self._tap_loss(tap, s, zs, zt, targets)
        return out

    def _tap_loss(self, tap: str, s: ModelOutput, zs: Tensor, zt: Tensor, targets: Any) -> Tensor:
        if zs.dim() == 4:
            smp = pixel_samples(self.name, tap, zs, zt, targets, self.ignore_index, need_labels=False,
                                mask_ignored=self.ignore_index_mask)
        elif zs.dim() == 3:
            needs_match = (self.mode == "positives" or self.drop_ignored
                           or self.sample_reduction in ("avg_factor", "level"))
            if needs_match:
                smp = location_samples(self.name, tap, s, zs, zt, targets, positives=self.mode == "positives",
                                       drop_ignored=self.drop_ignored)
            else:
                if zs.shape != zt.shape:
                    raise MethodError(
                        f"method 'kd': tap '{tap}' student logits {tuple(zs.shape)} and teacher "
                        f"logits {tuple(zt.shape)} differ; per-location KD needs the same anchors per "
                        "location, FPN levels and classes (use a feature method instead)"
                    )
                return self._plain(zs, zt)
        else:
            raise MethodError(f"method 'kd': tap '{tap}' must be (N, K, h, w) or (N, L, C), got "
                              f"{tuple(zs.shape)}")
        assert smp.t is not None
        per_row = self._per_row(smp.s, smp.t)
        return reduce_samples(per_row, smp, self.sample_reduction, self.name)

    def _per_row(self, zs: Tensor, zt: Tensor) -> Tensor:
        per_class = bernoulli_kl(zs, zt, self.tau) if self.mode == "bernoulli" else softmax_kl(zs, zt, self.tau)
        return reduce_classes(per_class, self.class_reduction) * self.tau**2  # τ²: Hinton's gradient scale

    def _plain(self, zs: Tensor, zt: Tensor) -> Tensor:
        """Every location of (N, L, C) logits, no assignment needed (mean or sum over N·L). The Bernoulli form
        (the detection preset) runs without the element-wise graph (:func:`bernoulli_kl_total`): same value
        and gradient, a fraction of the memory over ≈ 200 k anchors × 91 classes per image."""
        if self.mode == "bernoulli":
            total = bernoulli_kl_total(zs, zt, self.tau, self.class_reduction, self.sample_reduction)
            return total * self.tau**2
        zs, zt = upcast(zs), upcast(zt.detach())
        per_row = self._per_row(zs, zt)
        return per_row.mean() if self.sample_reduction == "mean" else per_row.sum()
