r"""FitNet — hint learning with a regressor (Romero et al., "FitNets: Hints for Thin Deep Nets",
ICLR 2015), in the dense-prediction form of CIRKD's re-implementation (Yang et al., "Cross-Image
Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022, winycg/CIRKD
``losses/fitnet.py``). Method page: docs/methods/fitnet.md.

Equation implemented, per tap (the paper's hint loss L_HT = ½‖u_h − r(v_g)‖², with a 1×1 conv
regressor r and CIRKD's mean over all elements instead of ½·sum)::

    L_tap = w · mean_{n,c,h,w} ( r(F_S) − F_T )²

Per-tap losses are returned separately and summed by the engine.

Presets:

- segmentation (CIRKD's config): tap ``seg_feat`` (the head feature after the ASPP 3×3 block), r =
  1×1 conv **without bias**, applied even when the channel counts are equal, PyTorch default
  init, w = 10.
- detection (no official config): every FPN level (``taps="fpn"``), r = 1×1 conv with bias
  per level (default init, always applied), w = 1.0 per level — our choice. Mean MSE on raw FPN
  features is O(1e-1..1e0) at the start, so with 4–5 levels the distillation term starts at O(1),
  the same order as RetinaNet's focal + box loss, and shrinks as r fits; PKD/CanKD use effective
  weights 3–5 but on instance/standardised features, whose MSE is larger.

Deviations and assumptions:

- The paper trains the hint stage separately (stage-wise) before KD; here, as in CIRKD, the hint
  loss is added to the task loss from the first iteration.
- CIRKD's official script also adds pixel-wise logit KD (λ = 1); here that is a separate method
  (``--method fitnet+kd``).
- Computed in float32 with autocast disabled (the regressor runs in float32 too).

Heterogeneous pairs: the regressor maps student channels to teacher channels (it exists for every
tap whenever the channel counts differ, and also when they are equal unless
``adapter_always=False``); a student map of a different H×W is resized to the teacher's after the
regressor (bilinear, ``align_corners=False``). A 1×1 conv commutes with bilinear resizing (the
interpolation weights of every output pixel sum to 1, so the bias passes through unchanged), so when
the student map is the larger one it is resized first and the regressor runs on the teacher's
smaller grid: the same result up to round-off, without regressing pixels that are then averaged away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from ..hparams import opt
from ..models.taps import TapInfo
from . import register
from .base import Method
from .common import build_adapter, match_spatial


@register
class FitNet(Method):
    """Adapter + mean-squared hint loss per tap (module docstring: equations and deviations)."""

    name = "fitnet"
    paper = "Romero et al., FitNets: Hints for Thin Deep Nets (ICLR 2015); dense form of CIRKD (CVPR 2022)"
    evidence = "parity-tested"
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # no official detection config: weight is ours, see the module docstring
        "detection": {
            "taps": "fpn",
            "weight": 1.0,
            "adapter_bias": True,
            "adapter_always": True,
            "adapter_init": "default",
        },
        # CIRKD train_fitnet.sh: λ = 10, bias-free 1×1 conv always applied, default init
        "segmentation": {
            "taps": "seg_feat",
            "weight": 10.0,
            "adapter_bias": False,
            "adapter_always": True,
            "adapter_init": "default",
        },
    }

    @dataclass
    class Config:
        """Options of ``fitnet`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('fpn', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        weight: float = opt(1.0, 'loss weight per tap')
        adapter_bias: bool = opt(True, 'the 1×1 student→teacher adapter has a bias')
        adapter_always: bool = opt(True, 'apply the regressor even when the channel counts are equal')
        adapter_init: Literal["default", "kaiming"] = opt('default', 'adapter init: PyTorch default or kaiming (mmcv)')

    def __init__(
        self,
        student: dict[str, TapInfo],
        teacher: dict[str, TapInfo],
        task: str,
        **hp: Any,
    ) -> None:
        super().__init__(student, teacher, task, **hp)
        always = bool(hp["adapter_always"])
        self.adapters = nn.ModuleDict()
        for tap in self.taps:
            cs, ct = student[tap].channels, teacher[tap].channels
            if always or cs != ct:
                self.adapters[tap] = build_adapter(
                    cs, ct, bias=bool(hp["adapter_bias"]), init=str(hp["adapter_init"])
                )

    def regress(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        """r(F_S) on the teacher's H×W: resize then regress when the student map is larger, else the reverse."""
        if tap not in self.adapters:
            return match_spatial(fs, ft)
        adapter = self.adapters[tap]
        if fs.shape[-2] * fs.shape[-1] > ft.shape[-2] * ft.shape[-1]:
            return adapter(match_spatial(fs, ft))
        return match_spatial(adapter(fs), ft)

    def tap_loss(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        """w · mean (r(F_S) − F_T)² of one tap; the per-tap loop is the base's."""
        return self.weight * (self.regress(tap, fs, ft) - ft).pow(2).mean()
