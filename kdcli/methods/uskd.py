r"""USKD — Universal Self-Knowledge Distillation (Yang et al., "From Knowledge Distillation to
Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels",
ICCV 2023, arXiv 2303.13005). No teacher: the soft labels are built from the student itself.

Official code: yzd-v/cls_KD, ``USKDLoss`` (``mmcls/models/dis_losses/uskd.py``;
method page: docs/methods/uskd.md). Per sample with logits ``z`` (K classes), label ``y``, an
intermediate feature ``f`` and a learnable weak classifier ``W`` (discarded after training)::

    q      = p_y² − mean_batch(p_y²) + 1                              (detached; p = softmax(z))
    L_tgt  = − q · log p_y
    L_weak = − μ · Σ_c ỹ_c · log softmax(W f)_c,      ỹ = 0.9·onehot(y) + 0.1/K
    r_c    = w_c / (1 − w_y + 1e-6) + ℓ_c / (1 − ℓ_y + 1e-6),   w = softmax(W f), ℓ = log softmax(z)
    ẑ_c    = 1 / (rank of r_c, descending, from 1)   for c ≠ y; 0 for y; renormalised   (Zipf)
    L_nt   = − Σ_{c≠y} ẑ_c · log p̂_c                  (p̂: softmax over the non-target logits)
    L      = w · S_i[ α·L_tgt + β·L_nt + L_weak ]

``S_i`` = mean over the samples (official ``.mean()`` over the batch). ``rank=official`` is the
code's ranking, which mixes the weak classifier's *probabilities* with the student's
*log-probabilities* (so the student's logits dominate the order); ``rank=prob`` is the paper-text
reading with probabilities on both sides (``ℓ`` replaced by ``p``). The two orders were
measured to give Zipf labels about 0.72 apart in L1 on random logits. The sort is stable (ties →
lower class index first); the official sort is not, which only matters for exact ties.

Dense mapping ([adaptation], untested in any publication):

- **Segmentation**: samples = pixels whose label ≠ ``ignore_index`` (255), at the logit
  resolution (label map resized with ``nearest``). ``f`` = an intermediate backbone feature
  (``feat_taps=auto``: ``c4`` when the model has it — ResNet stage 3, the stage cls_KD uses — else
  ``c3``); ``W`` = a 1×1 conv D→K whose output is resized (bilinear) to the logit resolution.
  ``mean_batch`` in ``q`` is the mean over all valid pixels of the minibatch.
- **RetinaNet/FCOS**: samples = the student's positive locations (positives mode, see :mod:`kdcli.methods.dkd`):
  softmax over the C − 1 real classes (torchvision's background column 0 dropped), target = the
  matched box's class. ``f`` = the FPN level the location belongs to (``feat_taps=fpn``), ``W`` =
  one 1×1 conv D→C−1 shared by all levels (like the head's convs); its output at a location is
  used for every anchor there (features are per location, anchors are not). ``mean_batch`` is
  over the positives of the minibatch; a batch without positives gives 0.

The student's own task loss plays the role of the official ``CE(z, y)`` term. Presets: the
ImageNet configs (α = 1, β = 0.1, μ = 0.005) for both tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, MethodError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo, fpn_taps
from . import register
from ._logits import check_choice, location_samples, pixel_samples, reduce_samples, target_split
from .base import Method
from .common import float32_region, upcast

RANKS = ("official", "prob")


def zipf_labels(z: Tensor, weak: Tensor, labels: Tensor, rank: str = "official") -> Tensor:
    """USKD's soft non-target labels ``ẑ`` (M, K): Zipf weights by rank, 0 at the target, rows sum to 1."""
    k = z.shape[-1]
    log_p = F.log_softmax(z, -1)
    w = F.softmax(weak, -1)
    col = labels[:, None]
    w_y = w.gather(-1, col)
    own = log_p if rank == "official" else log_p.exp()
    score = w / (1 - w_y + 1e-6) + own / (1 - own.gather(-1, col) + 1e-6)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(k, device=z.device).expand_as(order))
    zipf = (1.0 / (ranks + 1).to(z.dtype)).scatter(-1, col, 0.0)
    return zipf / zipf.sum(-1, keepdim=True)


def uskd_terms(z: Tensor, weak: Tensor, labels: Tensor, weight: Tensor, rank: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``L_tgt``, ``L_nt``, ``L_weak / μ`` for rows ``z``, ``weak`` (M, K) (module docstring)."""
    k = z.shape[-1]
    log_p = F.log_softmax(z, -1)
    log_py = log_p.gather(-1, labels[:, None])[:, 0]
    with torch.no_grad():
        p2 = log_py.exp() ** 2
        q = p2 - (p2 * weight).sum() / weight.sum().clamp(min=1) + 1  # batch mean over the valid samples
        zhat = zipf_labels(z, weak, labels, rank)
    l_tgt = -q * log_py
    l_nt = -(zhat * target_split(z, labels, 1.0).log_phat).sum(-1)
    log_w = F.log_softmax(weak, -1)
    l_weak = -(0.9 * log_w.gather(-1, labels[:, None])[:, 0] + (0.1 / k) * log_w.sum(-1))
    return l_tgt, l_nt, l_weak


@register
class USKD(Method):
    """Universal self-KD with a weak classifier and Zipf soft non-target labels (module docstring)."""

    name = "uskd"
    paper = "Yang et al., From KD to Self-KD: Normalized Loss and Customized Soft Labels (ICCV 2023)"
    evidence = "loss parity-tested; dense mapping kdcli's"
    tasks = ("detection", "segmentation")
    needs_targets = True
    needs_teacher = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # cls_KD configs/distillers/imagenet/*uskd*: alpha 1, beta 0.1, mu 0.005
        "detection": {"taps": "cls_logits", "feat_taps": "fpn", "weight": 1.0, "alpha": 1.0, "beta": 0.1,
                      "mu": 0.005, "rank": "official"},
        "segmentation": {"taps": "seg_logits", "feat_taps": "auto", "weight": 1.0, "alpha": 1.0, "beta": 0.1,
                         "mu": 0.005, "rank": "official", "ignore_index": 255},
    }

    @dataclass
    class Config:
        """Options of ``uskd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('cls_logits', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        feat_taps: str = opt('fpn', "feature tap of the weak supervision (auto: the model's)")
        weight: float = opt(1.0, 'loss weight per tap')
        alpha: float = opt(1.0, 'weight of the target term')
        beta: float = opt(0.1, 'weight of the non-target term')
        mu: float = opt(0.005, 'weight μ of the weak (feature) term')
        rank: Literal["official", "prob"] = opt('official', 'ranking of the non-target classes: official or prob')
        ignore_index: int = opt(255, 'label of ignored pixels')

    def __init__(self, student: dict[str, TapInfo], teacher: dict[str, TapInfo], task: str, **hp: Any) -> None:
        super().__init__(student, student, task, **hp)  # self-distillation: only the student's taps matter
        if len(self.taps) != 1:
            raise ConfigError(f"--set taps: uskd distils one logit tap, got {', '.join(self.taps)}")
        self.alpha, self.beta, self.mu = float(hp["alpha"]), float(hp["beta"]), float(hp["mu"])
        self.rank = check_choice("rank", str(hp["rank"]), RANKS)
        self.ignore_index = int(hp.get("ignore_index", 255))
        logit = self.taps[0]
        classes = student[logit].channels - (1 if task == "detection" else 0)  # detection: drop background 0
        if classes < 2:
            raise MethodError(f"method 'uskd': tap '{logit}' has too few classes for a non-target distribution")
        self.feat_taps = self._feature_taps(str(hp["feat_taps"]), student, task)
        dims = {student[n].channels for n in self.feat_taps}
        if len(dims) != 1:
            raise MethodError(f"method 'uskd': feature taps {', '.join(self.feat_taps)} differ in channels "
                              f"({sorted(dims)}); the shared weak classifier needs one width")
        # the weak classifier (official: Linear D→C); a 1×1 conv is the same map at every position
        self.weak = nn.Conv2d(dims.pop(), classes, kernel_size=1)
        self.needs = (logit, *self.feat_taps)

    @staticmethod
    def _feature_taps(spec: str, student: dict[str, TapInfo], task: str) -> tuple[str, ...]:
        if spec == "auto":
            spec = "fpn" if task == "detection" else next((n for n in ("c4", "c3") if n in student), "")
        names = tuple(fpn_taps(student)) if spec == "fpn" else tuple(n.strip() for n in spec.split(",") if n.strip())
        missing = [n for n in names if n not in student]
        if not names or missing:
            raise MethodError(f"method 'uskd': --set feat_taps={spec!r} names no usable feature tap of the student "
                              f"(it has {', '.join(student)})")
        if task == "segmentation" and len(names) != 1:
            raise MethodError("method 'uskd': segmentation takes one feature tap (--set feat_taps=c4)")
        return names

    def forward(self, s: ModelOutput, t: ModelOutput | None = None, targets: Any = None) -> dict[str, Tensor]:
        tap = self.taps[0]
        z = s.taps[tap]
        with float32_region(z):
            if z.dim() == 4:
                weak = self.weak(upcast(s.taps[self.feat_taps[0]]).to(self.weak.weight.dtype))
                smp = pixel_samples(self.name, tap, z, None, targets, self.ignore_index, need_labels=True, extra=weak)
            else:
                weak = self._weak_locations(s, z.shape[1])
                smp = location_samples(self.name, tap, s, z, None, targets, positives=True, extra=weak)
            assert smp.labels is not None and smp.extra is not None
            l_tgt, l_nt, l_weak = uskd_terms(smp.s, smp.extra, smp.labels, smp.weight, self.rank)
            per_row = self.alpha * l_tgt + self.beta * l_nt + self.mu * l_weak
            loss = reduce_samples(per_row, smp, "mean", self.name)
        return {f"{self.name}.{tap}": self.weight * loss}

    def _weak_locations(self, s: ModelOutput, num_locations: int) -> Tensor:
        """Weak logits of every FPN level laid out like ``cls_logits``: (N, L, C−1)."""
        feats = [upcast(s.taps[n]).to(self.weak.weight.dtype) for n in self.feat_taps]
        cells = sum(f.shape[-2] * f.shape[-1] for f in feats)
        if num_locations % cells:
            raise MethodError(f"method 'uskd': feature taps {', '.join(self.feat_taps)} have {cells} positions, "
                              f"which does not divide the {num_locations} locations of the logits")
        a = num_locations // cells
        # torchvision's head order: level, then row, column, anchor
        per_level = [self.weak(f).flatten(2).transpose(1, 2) for f in feats]
        return torch.cat(per_level, 1).repeat_interleave(a, dim=1)
