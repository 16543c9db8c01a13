r"""NKD — Normalized Knowledge Distillation (Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge
Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized
Soft Labels", ICCV 2023, arXiv 2303.13005).

Official code: yzd-v/cls_KD, ``NKDLoss`` (``mmcls/models/dis_losses/nkd.py``, branch 1.0, and
``mmcls/distillation/losses/nkd.py``, master, in their fixed versions of 2023-10-10; method page
docs/methods/nkd.md). Per sample::

    L_tgt = − p_t,y · log p_s,y                                   (τ = 1; teacher prob. as a weight)
    L_nt  = − γ · τ² · Σ_{i≠y} p̂_t,i(τ) · log p̂_s,i(τ)            (non-target softmaxes, renormalised)
    L     = w · S_i[ L_tgt + L_nt ]

mean over the samples (cls_KD: ``.mean()`` over the batch). This is the cross-entropy form of the
official code (``form=ce``): ``L_nt = γ·(NCKD + τ²·H(p̂_t))``, so its value includes the teacher's
non-target entropy and is not 0 for identical logits; ``form=kl`` drops that constant (same
gradient). The target/non-target decomposition is shared with DKD
(:class:`kdcli.methods._logits.DecoupledKD`); NKD replaces DKD's binary KL by the teacher-weighted
target CE, sets β = γ and puts the temperature only on the non-target part.

Samples (kdcli's dense mapping, [adaptation]; see :mod:`kdcli.methods._logits`): valid pixels (label ≠ 255)
for segmentation; the student's positive locations of a RetinaNet/FCOS head (softmax over the C − 1 real classes,
background column 0 dropped, target = the matched box's class) for detection. See
:mod:`kdcli.methods.dkd` for what "positive" means per detector.

Presets: the ImageNet CNN configs (R34→R18, R50→MV1): τ = 1, γ = 1.5, for both tasks — no
official dense config exists. The official student CE term is the student's own task loss here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..hparams import opt
from . import register
from ._logits import NONTARGET_FORMS, DecoupledKD, check_choice


@register
class NKD(DecoupledKD):
    """Normalized KD: teacher-weighted target CE + γ·τ²·normalised non-target CE (module docstring)."""

    name = "nkd"
    paper = "Yang et al., From KD to Self-KD: Normalized Loss and Customized Soft Labels (ICCV 2023)"
    evidence = "loss parity-tested; dense mapping kdcli's"
    target_term = "weighted_ce"
    nontarget_form = "ce"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # cls_KD configs/distillers/imagenet (CNN pairs): temp 1, gamma 1.5
        "detection": {"taps": "cls_logits", "weight": 1.0, "gamma": 1.5, "tau": 1.0, "form": "ce",
                      "sample_reduction": "mean"},
        "segmentation": {"taps": "seg_logits", "weight": 1.0, "gamma": 1.5, "tau": 1.0, "form": "ce",
                         "sample_reduction": "mean", "ignore_index": 255},
    }

    @dataclass
    class Config:
        """Options of ``nkd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('cls_logits', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        weight: float = opt(1.0, 'loss weight per tap')
        gamma: float = opt(1.5, 'weight γ of the non-target term')
        tau: float = opt(1.0, 'softmax temperature τ')
        form: Literal["kl", "ce"] = opt('ce', 'non-target term: kl or ce')
        sample_reduction: Literal["mean", "sum", "avg_factor", "level"] = opt(
            'mean', 'how per-sample losses are reduced'
        )
        ignore_index: int = opt(255, 'label of ignored pixels')

    def coefficients(self, hp: dict[str, Any]) -> tuple[float, float]:
        self.nontarget_form = check_choice("form", str(hp.get("form", "ce")), NONTARGET_FORMS)
        return 1.0, float(hp["gamma"])
