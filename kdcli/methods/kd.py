r"""KD — temperature-scaled logit distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge
in a Neural Network", NIPS 2014 Deep Learning Workshop, arXiv 1503.02531), applied per pixel
(segmentation) and per anchor location and class (dense sigmoid detection heads).

Equations implemented (spec: shared/methods/logit-methods.md §1.2–1.4 and §2.1):

- **softmax mode** (segmentation, ``seg_logits`` (N, K, h, w)); Hinton's soft-target term per
  pixel, as in TorchDistiller's pixel-wise KD (Liu et al., "Structured Knowledge Distillation
  for Semantic Segmentation", CVPR 2019)::

      ℓ_i = τ² · Σ_k p_t,k (log p_t,k − log p_s,k),   p_·  = softmax(z_· / τ) over the K classes
      L   = w · (1/|P|) Σ_{i∈P} ℓ_i

  P is every pixel (TorchDistiller's ``norm_type='spatial'``: sum ÷ N·h·w) or, with
  ``ignore_index_mask=True`` and targets given, only pixels whose label ≠ ``ignore_index``.
- **bernoulli mode** (detection, ``cls_logits`` (N, L, C) of a sigmoid head; mode S2 of §1.4,
  the binary KD of BCKD/CrossKD)::

      ℓ_i = τ² · Σ_c [ p log(p/q) + (1−p) log((1−p)/(1−q)) ],  p = σ(z_t/τ), q = σ(z_s/τ)
      L   = w · (1/(N·L)) Σ_i ℓ_i

``class_reduction`` ∈ {sum, mean} replaces Σ_c/Σ_k by a mean; ``sample_reduction`` ∈ {mean, sum}
replaces the 1/|P| average by a plain sum. Every log-probability is computed with
``log_softmax``/``logsigmoid`` in float32 (fp16/bf16 inputs upcast, autocast disabled), so
fp16/bf16 logits neither underflow to ``log 0`` nor overflow.

Deviations and assumptions:

- KL form, not the cross-entropy form: the loss is 0 for identical logits. BCKD writes the
  Bernoulli term as BCE(z_s, σ(z_t)), which differs by the teacher's entropy (a constant for the
  student: same gradient, different value).
- Detection: no positive/negative selection, no ``|σ(z_t) − σ(z_s)|^β`` modulation and no
  division by the number of positives (BCKD's choices); every location counts equally. τ = 1 and
  w = 1 are our choice, not an official config (LD/BCKD modes will come as separate options).
- No hard-label cross-entropy term: the student's own task loss plays that role.
- Segmentation: when the two logit maps differ in size, the smaller is resized to the larger
  (bilinear, ``align_corners=False``), per dimension. The label is resized to that size with
  ``nearest`` (``F.interpolate`` legacy nearest) to build the ignore mask. If every pixel is
  ignored the loss is 0.
- ``ignore_index_mask`` defaults to False (TorchDistiller uses every pixel); it only acts when
  the engine passes targets (``needs_targets`` is False because the masking is optional).

Heterogeneous pairs: the class lists must be the same (same K or C, checked from the tap info
at construction) and, for detection, the same anchor layout (same L, checked at forward time);
otherwise a :class:`~kdcli.errors.MethodError` asks for a feature method instead. Spatial
sizes of segmentation logits may differ (resize, above).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, MethodError
from ..models.taps import ModelOutput, TapInfo
from . import register
from .base import Method
from .common import float32_region, resize_to, upcast

MODES = ("softmax", "bernoulli")
CLASS_REDUCTIONS = ("sum", "mean")
SAMPLE_REDUCTIONS = ("mean", "sum")


def softmax_kl(s: Tensor, t: Tensor, tau: float, dim: int) -> Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) per class entry (not yet reduced over ``dim``)."""
    log_p_t = F.log_softmax(t / tau, dim=dim)
    log_p_s = F.log_softmax(s / tau, dim=dim)
    # exp(log p) is exact where p underflows: those terms are 0 · finite = 0, never 0 · (−inf)
    return log_p_t.exp() * (log_p_t - log_p_s)


def bernoulli_kl(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """Element-wise KL(Bern(σ(t/τ)) ‖ Bern(σ(s/τ)))."""
    zs, zt = s / tau, t / tau
    log_p, log_1mp = F.logsigmoid(zt), F.logsigmoid(-zt)
    log_q, log_1mq = F.logsigmoid(zs), F.logsigmoid(-zs)
    # 1−p as exp(logσ(−z)), not 1 − σ(z): no cancellation for confident teachers
    return log_p.exp() * (log_p - log_q) + log_1mp.exp() * (log_1mp - log_1mq)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--set {key}: '{value}' is not one of {', '.join(choices)}")


@register
class KD(Method):
    """Temperature-scaled logit KD (see the module docstring for equations and deviations)."""

    name = "kd"
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network (arXiv 1503.02531, 2015)"
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # our choice: no official per-location KD config for torchvision sigmoid heads
        "detection": {
            "taps": "cls_logits",
            "weight": 1.0,
            "tau": 1.0,
            "mode": "bernoulli",
            "class_reduction": "sum",
            "sample_reduction": "mean",
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
        self.mode = str(hp["mode"])
        _check_choice("mode", self.mode, MODES)
        self.class_reduction = str(hp["class_reduction"])
        _check_choice("class_reduction", self.class_reduction, CLASS_REDUCTIONS)
        self.sample_reduction = str(hp["sample_reduction"])
        _check_choice("sample_reduction", self.sample_reduction, SAMPLE_REDUCTIONS)
        self.ignore_index_mask = bool(hp.get("ignore_index_mask", False))
        self.ignore_index = int(hp.get("ignore_index", 255))
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
                out[f"{self.name}.{tap}"] = self.weight * self._tap_loss(tap, zs, zt, targets)
        return out

    def _tap_loss(self, tap: str, zs: Tensor, zt: Tensor, targets: Any) -> Tensor:
        zs, zt = upcast(zs), upcast(zt.detach())
        if zs.dim() == 4:
            # (N, K, h, w): classes on dim 1; bring both maps to the larger size per dimension
            if zs.shape[:2] != zt.shape[:2]:
                raise MethodError(
                    f"method 'kd': tap '{tap}' student logits {tuple(zs.shape)} and teacher "
                    f"logits {tuple(zt.shape)} differ in batch or class count"
                )
            size = (max(zs.shape[2], zt.shape[2]), max(zs.shape[3], zt.shape[3]))
            zs, zt = resize_to(zs, size), resize_to(zt, size)
            class_dim = 1
        elif zs.dim() == 3:
            # (N, L, C) dense-detection logits: location i must mean the same prior in both
            if zs.shape != zt.shape:
                raise MethodError(
                    f"method 'kd': tap '{tap}' student logits {tuple(zs.shape)} and teacher "
                    f"logits {tuple(zt.shape)} differ; per-location KD needs the same anchors per "
                    "location, FPN levels and classes (use a feature method instead)"
                )
            class_dim = -1
        else:
            raise MethodError(f"method 'kd': tap '{tap}' must be (N, K, h, w) or (N, L, C), got "
                              f"{tuple(zs.shape)}")

        if self.mode == "softmax":
            per_class = softmax_kl(zs, zt, self.tau, class_dim)
        else:
            per_class = bernoulli_kl(zs, zt, self.tau)
        per_sample = per_class.sum(class_dim) if self.class_reduction == "sum" else per_class.mean(class_dim)
        per_sample = per_sample * self.tau**2  # keeps gradient scale independent of τ (Hinton)

        valid = self._valid_mask(per_sample, targets) if zs.dim() == 4 else None
        if valid is None:
            total, count = per_sample.sum(), per_sample.numel()
            return total / count if self.sample_reduction == "mean" else total
        total = (per_sample * valid).sum()  # multiply, not index: keeps one graph and no sync
        if self.sample_reduction == "sum":
            return total
        return total / valid.sum().clamp(min=1)

    def _valid_mask(self, per_pixel: Tensor, targets: Any) -> Tensor | None:
        """(N, h, w) float mask of non-ignored pixels, or None when masking is off/impossible."""
        if not self.ignore_index_mask or not isinstance(targets, Tensor):
            return None
        labels = targets
        if labels.dim() == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.shape[-2:] != per_pixel.shape[-2:]:
            # nearest keeps label values intact (255 stays 255; no blending of class ids)
            labels = F.interpolate(labels[:, None].float(), size=per_pixel.shape[-2:], mode="nearest")[:, 0]
        return (labels != self.ignore_index).to(per_pixel.dtype)
