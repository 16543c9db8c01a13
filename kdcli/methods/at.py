r"""AT — activation-based attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention:
Improving the Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv
1612.03928). Official code: szagoruyko/attention-transfer (``utils.at``, ``utils.at_loss``, ``cifar.py``).
Method page: docs/methods/at.md.

Equation implemented, per tap (the official reductions)::

    Q(n, hw) = mean_c |F(n, c, hw)|^p                          (p = 2: utils.at's x.pow(2).mean(1))
    q̂(n, ·) = Q(n, ·) / max(‖Q(n, ·)‖₂, 1e-12)                 (F.normalize over each image's H·W)
    L_tap = β · mean_{n,hw} ( q̂_S(n, hw) − q̂_T(n, hw) )²       (utils.at_loss; cifar.py: β · Σ_taps)

β = 1000 (README and ``cifar.py --beta 1e+3``). The paper's Eq. (2) writes β/2 · Σ_j ‖q̂_S − q̂_T‖_p with
β "10³ divided by the number of elements in the attention map and batch size": the official code takes
the mean of the squares (that division) and has no ½; kdcli follows the code, so ``weight`` is β.

Presets (the paper has no dense-prediction config; **our choice**): every FPN level for detection, the
last backbone stage ``c5`` for segmentation (the paper transfers at the ends of residual groups), β = 1000.

kdcli choices: the maps need no channel adapter (Q averages the channels); when the student's H×W
differs from the teacher's, its attention map Q_S is resized to the teacher's H×W (bilinear,
``align_corners=False``) before normalisation (the official code compares equal sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..hparams import opt
from . import register
from .base import Method
from .common import resize_to


def attention_map(x: Tensor, p: int) -> Tensor:
    """Q = mean_c |x|^p of an (N, C, H, W) map: (N, 1, H, W)."""
    return x.abs().pow(p).mean(1, keepdim=True)


@register
class AT(Method):
    """AT (Zagoruyko & Komodakis, ICLR 2017): L = β·mean_{n,hw}(q̂_S − q̂_T)², q̂ = normalize(mean_c |F|^p)."""

    name = "at"
    paper = "Zagoruyko & Komodakis, Paying More Attention to Attention (ICLR 2017)"
    evidence = "loss checked against the official equation; dense mapping kdcli's"
    presets = {
        "detection": {"taps": "fpn", "weight": 1000.0, "p": 2},
        "segmentation": {"taps": "c5", "weight": 1000.0, "p": 2},
    }

    @dataclass
    class Config:
        """Options of ``at`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt("fpn", "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        weight: float = opt(1000.0, "β: weight of the mean squared difference of the normalised maps, per tap")
        p: int = opt(2, "exponent p of the attention map mean_c |F|^p")

        def __post_init__(self) -> None:
            if self.p < 1:
                raise ConfigError(f"--set p: the exponent of mean_c |F|^p must be >= 1 (got {self.p})")

    def tap_loss(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        q_t = attention_map(ft, self.cfg.p)
        q_s = resize_to(attention_map(fs, self.cfg.p), (q_t.shape[-2], q_t.shape[-1]))
        diff = F.normalize(q_s.flatten(1), dim=1) - F.normalize(q_t.flatten(1), dim=1)
        return self.weight * diff.pow(2).mean()

    def degenerate(self, tap: str, hw: tuple[int, int]) -> str | None:
        if hw[0] * hw[1] == 1:
            return "a normalised map of one position is 1 on both sides, so the difference is 0 for any input"
        return None
