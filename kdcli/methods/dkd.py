r"""DKD — Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, arXiv 2203.08679).

Official code: megvii-research/mdistiller, ``mdistiller/distillers/DKD.py`` (method
page: docs/methods/dkd.md). Per sample, with ``p = softmax(z/τ)``, ``b = [p_y, 1 − p_y]``
and the non-target distribution ``p̂_i = p_i / (1 − p_y)`` (i ≠ y)::

    TCKD = τ² · KL(b_t ‖ b_s)          NCKD = τ² · KL(p̂_t ‖ p̂_s)
    L    = min((epoch + 1) / warmup, 1) · w · S_i[ α · TCKD_i + β · NCKD_i ]

summed over classes and averaged over the samples (mdistiller: ``size_average=False`` sum ÷ batch
size; ``sample_reduction=sum`` gives mmrazor's batch sum). KD = TCKD + (1 − p_t,y)·NCKD, so DKD is
KD with the non-target weight freed. The decomposition is shared with NKD
(:class:`kdcli.methods._logits.DecoupledKD`).

Samples (kdcli's dense mapping, [adaptation]; see :mod:`kdcli.methods._logits`):

- segmentation: every pixel whose label ≠ ``ignore_index`` (255), at the larger of the two logit
  resolutions (label map resized with ``nearest``); the label is the pixel's class;
- RetinaNet/FCOS (sigmoid heads): only the student's positive locations: the softmax runs over
  the C − 1 real classes (torchvision's background column 0 dropped) with the matched box's class
  as target; background and ignored locations get no DKD term (there is no target class there).
  "Positive" is the student's own assignment (RetinaNet IoU ≥ 0.5 + low-quality matches; FCOS
  centre sampling + scale ranges), read from ``extras["match"]``.

Warm-up: mdistiller multiplies the loss by ``min(epoch / WARMUP, 1)`` with epochs counted from 1;
kdcli's engine counts from 0, hence ``epoch + 1``. ``warmup=0`` switches it off. The factor is a
step per epoch, as in the official code.

Presets: detection = the official Detectron2 Faster R-CNN config (α = 1, β = 0.25, τ = 1, no
warm-up), applied at positive locations of a one-stage head instead of sampled RoIs (the official
setup divides by all 512 sampled RoIs per image, 75 % background; here ÷ positives). Segmentation
has no official config: the ImageNet R34→R18 row (α = 1, β = 0.5, τ = 1, warm-up 1, i.e. none),
our choice. The official student CE term is the student's own task loss here.

Numerics: log-probabilities from ``logsumexp`` in float32 (``log(1 − p_y)`` as
``logsumexp_{j≠y} − logsumexp``), where mdistiller takes ``log`` of summed softmax outputs; on the
same float64 inputs the two agree to rounding (checked in tests/test_methods_logit.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..errors import ConfigError
from ..hparams import opt
from . import register
from ._logits import DecoupledKD


@register
class DKD(DecoupledKD):
    """Decoupled KD: α·TCKD + β·NCKD with warm-up (module docstring)."""

    name = "dkd"
    paper = "Zhao et al., Decoupled Knowledge Distillation (CVPR 2022)"
    evidence = "parity-tested"
    target_term = "binary_kl"
    nontarget_form = "kl"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # mdistiller detection/configs/DKD: α 1, β 0.25, τ 1, no warm-up (RoI head → positives here)
        "detection": {"taps": "cls_logits", "weight": 1.0, "alpha": 1.0, "beta": 0.25, "tau": 1.0,
                      "warmup": 0, "sample_reduction": "mean"},
        # no official segmentation config: the ImageNet R34→R18 row
        "segmentation": {"taps": "seg_logits", "weight": 1.0, "alpha": 1.0, "beta": 0.5, "tau": 1.0,
                         "warmup": 1, "sample_reduction": "mean", "ignore_index": 255},
    }

    @dataclass
    class Config:
        """Options of ``dkd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('cls_logits', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        weight: float = opt(1.0, 'loss weight per tap')
        alpha: float = opt(1.0, 'weight α of the target-class term')
        beta: float = opt(0.25, 'weight β of the non-target term')
        tau: float = opt(1.0, 'softmax temperature τ')
        warmup: int = opt(0, 'epochs of linear warm-up of the loss (0: none)')
        sample_reduction: Literal["mean", "sum", "avg_factor", "level"] = opt(
            'mean', 'how per-sample losses are reduced'
        )
        ignore_index: int = opt(255, 'label of ignored pixels')

    def coefficients(self, hp: dict[str, Any]) -> tuple[float, float]:
        self.warmup = int(hp.get("warmup", 0))
        if self.warmup < 0:
            raise ConfigError(f"--set warmup: the warm-up is a number of epochs ≥ 0 (got {self.warmup})")
        # TCKD already carries τ² (target_term=binary_kl); the base class adds τ² to NCKD
        return float(hp["alpha"]), float(hp["beta"])

    def schedule(self) -> float:
        if self.warmup <= 0:
            return 1.0
        return min((self.epoch + 1) / self.warmup, 1.0)
