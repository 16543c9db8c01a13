r"""CWD — Channel-wise Distillation (Shu et al., "Channel-wise Knowledge Distillation
for Dense Prediction", ICCV 2021, arXiv 2011.13256). Official code: irfanICMLL/TorchDistiller
``SemSeg-distill`` (segmentation), pppppM/mmdetection-distiller (detection); parity reference
open-mmlab/mmrazor ``mmrazor/models/losses/cwd.py`` (``ChannelWiseDivergence``).
Followed exactly. Method page: docs/methods/cwd.md.

Equation implemented, per tap (the paper's channel-wise KL: a spatial softmax turns every channel into a
distribution over its H·W positions, and the KL divergence between teacher and student
distributions is averaged over channels and samples)::

    p_T(n, c, ·) = softmax_{hw}( F_T(n, c, ·) / τ ),   p_S likewise
    L_tap = w · τ² / (N · C) · Σ_{n,c,hw} p_T ( log p_T − log p_S )

The reduction is mmrazor's and TorchDistiller's: the KL is **summed** over positions and
divided by N·C only (not by H·W). Per-tap losses are returned separately (``cwd.<tap>``) and
summed by the engine.

Presets (each value from an official config):

- detection: every FPN level (``taps="fpn"``: P3–P7 for RetinaNet/FCOS, P2–P6 for Faster R-CNN),
  τ = 1, w = 10 per level: mmrazor ``cwd_fpn_{retina,frcnn}_r101_*_r50_1x_coco.py`` (all 5 neck
  outputs). The original authors' detection config (pppppM, RetinaNet X101 → R50) uses P3–P6,
  τ = 1, w = 5: ``--set taps=fpn:4 --set weight=5``.
- segmentation: ``seg_logits`` (decode-head logits), τ = 4, w = 3: the authors' official
  TorchDistiller setting (README: ``exp_cwd.sh channel kl 3 4``, CWD on the logit map). mmrazor's
  Cityscapes config uses τ = 1, w = 5 (``--set tau=1 --set weight=5``). τ = 4, w = 3 is also the
  logit term of MGD's official segmentation recipe (``--method mgd+cwd``).

Implementation notes (identical maths):

- log p is computed with ``log_softmax`` (TorchDistiller takes ``log(softmax)``, which is
  −inf where a probability underflows; mmrazor uses ``LogSoftmax``); p_T = exp(log p_T), so a
  teacher probability that underflows contributes 0 · finite = 0, as in mmrazor.
- Everything runs in float32 with autocast disabled (fp16/bf16 inputs are upcast).

Deviations and options:

- KL form (mmrazor, TorchDistiller). pppppM's detection code writes the cross-entropy
  −Σ p_T log p_S: same gradient, value larger by the teacher's entropy (a constant).
- A student map of a different H×W is resized to the teacher's (bilinear,
  ``align_corners=False``) after the adapter; the official code asserts equal sizes.

Heterogeneous pairs: when channels differ at a feature tap, a 1×1 conv adapter maps the student
to the teacher's channels first (PyTorch default init). Official precedents: pppppM's detection
``ChannelWiseDivergence`` (``align``, 1×1 conv **with** bias, only when channels differ —
detection preset ``adapter_bias=True``) and CIRKD's ``CriterionCWD`` (1×1 conv **without** bias —
segmentation preset ``adapter_bias=False``); mmrazor's configs have equal channels and no
connector. Both official adapters divide by the **student's** channel count (they read C before
aligning), so ``channel_norm="student"`` (default) reproduces that quirk; ``"teacher"`` divides
by the teacher's (adapted) channel count instead. With equal channels the two are the same.
Logit taps with different class counts are refused (a spatial softmax per class needs the same
classes on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, MethodError
from ..hparams import opt
from ..models.taps import TapInfo
from . import register
from .base import Method
from .common import build_adapter, match_spatial

CHANNEL_NORMS = ("student", "teacher")


def channel_wise_divergence(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """Σ_{n,c,hw} KL(softmax_hw(t/τ) ‖ softmax_hw(s/τ)) · τ² for two (N, C, H, W) maps (unnormalised)."""
    log_p_t = F.log_softmax(t.flatten(2) / tau, dim=-1)
    log_p_s = F.log_softmax(s.flatten(2) / tau, dim=-1)
    # p_T = exp(log p_T): an underflowing teacher probability gives 0 · finite = 0, never 0 · (−inf)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum() * tau**2


@register
class CWD(Method):
    """CWD (Shu et al., ICCV 2021): L = w·τ²/(N·C)·Σ_{n,c,hw} p_T(log p_T − log p_S), p = softmax_hw(F/τ).

    Presets, adapter rule, the student-channel normaliser quirk and deviations: module docstring.
    """

    name = "cwd"
    paper = "Shu et al., Channel-wise Knowledge Distillation for Dense Prediction (ICCV 2021)"
    evidence = "parity-tested"
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # mmrazor configs/distill/mmdet/cwd/cwd_fpn_retina_r101_retina_r50_1x_coco.py: 5 neck outputs, τ 1, w 10
        "detection": {
            "taps": "fpn",
            "tau": 1.0,
            "weight": 10.0,
            "adapter_bias": True,
            "adapter_init": "default",
            "channel_norm": "student",
        },
        # TorchDistiller SemSeg-distill README: `exp_cwd.sh channel kl 3 4` → logits, w 3, τ 4
        "segmentation": {
            "taps": "seg_logits",
            "tau": 4.0,
            "weight": 3.0,
            "adapter_bias": False,
            "adapter_init": "default",
            "channel_norm": "student",
        },
    }

    @dataclass
    class Config:
        """Options of ``cwd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('fpn', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        tau: float = opt(1.0, 'softmax temperature τ')
        weight: float = opt(10.0, 'loss weight per tap')
        adapter_bias: bool = opt(True, 'the 1×1 student→teacher adapter has a bias')
        adapter_init: Literal["default", "kaiming"] = opt('default', 'adapter init: PyTorch default or kaiming (mmcv)')
        channel_norm: Literal["student", "teacher"] = opt(
            'student', "divide by the student's (official quirk) or the teacher's channel count"
        )

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
        self.channel_norm = str(hp["channel_norm"])
        if self.channel_norm not in CHANNEL_NORMS:
            raise ConfigError(
                f"--set channel_norm: '{self.channel_norm}' is not one of {', '.join(CHANNEL_NORMS)}"
            )
        self.adapters = nn.ModuleDict()
        for tap in self.taps:
            cs, ct = student[tap].channels, teacher[tap].channels
            if cs == ct:
                continue
            if "logits" in (student[tap].kind, teacher[tap].kind):
                raise MethodError(
                    f"method 'cwd': logit tap '{tap}' has {cs} student and {ct} teacher classes; CWD on "
                    "logits needs the same classes (distil a feature tap instead, e.g. --set taps=seg_feat)"
                )
            self.adapters[tap] = build_adapter(
                cs, ct, bias=bool(hp["adapter_bias"]), init=str(hp["adapter_init"])
            )

    def tap_loss(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        """The weighted loss of one tap (adapter, resize, KL sum, × w, ÷ N·C); the per-tap loop is the base's."""
        n, c_student = fs.shape[:2]
        if tap in self.adapters:
            fs = self.adapters[tap](fs)
        fs = match_spatial(fs, ft)
        c = c_student if self.channel_norm == "student" else ft.shape[1]
        return self.weight * channel_wise_divergence(fs, ft, self.tau) / (n * c)

    def degenerate(self, tap: str, hw: tuple[int, int]) -> str | None:
        if hw[0] * hw[1] == 1:  # the student map is resized to the teacher's H×W before the softmax
            return "a spatial softmax over one position is 1 on both sides, so the KL is 0 for any input"
        return None
