r"""MGD — Masked Generative Distillation (Yang et al., "Masked Generative
Distillation", ECCV 2022, arXiv 2205.01529). Official code: yzd-v/MGD
(``det/mmdet/distillation/losses/mgd.py`` and ``seg/...``, ``FeatureLoss``) and open-mmlab/mmrazor
(``MGDConncetor`` + ``MGDLoss``), followed exactly. Method page: docs/methods/mgd.md (equations, official
defaults, parity).

Modules per tap (C_T = teacher channels; PyTorch default init throughout, as in both official
implementations)::

    align:      1×1 conv C_S → C_T with bias — only when C_S ≠ C_T (else absent)
    generation: Sequential(conv3×3 C_T→C_T pad 1, ReLU, conv3×3 C_T→C_T pad 1), both with bias

Equations implemented::

    S̃ = align(F_S)                                                                        (1)
    M(n, 1, h, w) = 0 if u > 1 − λ else 1,   u ~ U[0, 1) drawn on the CPU                   (2)
    L_tap = α · Σ_{n,c,h,w} ( G(M ⊙ S̃) − F_T )² / N                                        (3)

Each position is zeroed with probability λ (``lambda_mgd``); one mask per sample and position is
shared by all channels (``mask_on_channel=True``: one per sample and channel, shape N×C×1×1,
mmrazor's option). The reduction is the official sum/N (``MSELoss(reduction='sum') / N``): α is
tiny (2e-5) because the sum runs over C·H·W.

Randomness (the only non-determinism): the mask is drawn with ``torch.rand``
on the CPU and then moved to the feature's device, as both official versions do. It uses
:attr:`MGD.generator` — ``None`` (default) means the global CPU RNG, exactly the official
behaviour, so ``torch.manual_seed`` reproduces an official run's masks given the same draw
order; tests set ``m.generator = torch.Generator().manual_seed(k)``. A fixed mask can be given
instead: ``m(s, t, masks={tap: mask})`` or ``m.loss_tap(tap, fs, ft, mask)`` (any tensor that
broadcasts against the aligned student map, 1 = keep). Draw order over taps (``draw_order``):
``"reverse"`` draws the coarsest level first, as yzd-v's detection configs list ``fpn_convs.4``
first; ``"forward"`` draws the taps in order (mmrazor's ``fpn0..fpn4``). Losses are returned in
tap order either way.

Presets (official configs):

- detection: every FPN level (``taps="fpn"``: P3–P7 for RetinaNet/FCOS), α = 2e-5, λ = 0.65 —
  yzd-v ``retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py`` and mmrazor
  ``mgd_fpn_retina_x101_retina_r50_2x_coco.py`` (also RepPoints). The Cascade Mask R-CNN →
  Faster R-CNN config uses P2–P5, α = 5e-7, λ = 0.45:
  ``--set taps=fpn:4 --set alpha_mgd=5e-7 --set lambda_mgd=0.45``. Both official detection
  recipes also inherit the teacher's neck/head (engine flag, not part of this loss).
- segmentation: the last backbone stage (``taps="c5"``; ``extract_feat(img)[-1]``), α = 2e-5,
  λ = 0.75 — yzd-v ``seg/configs/distillers/mgd/psp_r101_distill_*_r18_40k_512x512_city.py``.
  The official segmentation distiller **also** adds logit CWD (τ = 4, weight 3, ÷ N·C) on the
  decode-head logits; here that is the separate ``cwd`` method, whose segmentation preset is
  exactly that term: ``--method mgd+cwd`` reproduces the official objective.

Implementation notes: everything (align, generator, loss) runs in float32 with autocast
disabled. The ReLU is not in-place (the official one is; same values and gradients).

Deviations: a student map of a different H×W is resized to the teacher's (bilinear,
``align_corners=False``) after ``align`` and before masking; the official code asserts equal
sizes. The mask is drawn at the teacher's H×W.

Parity layout: per tap, ``blocks[tap]`` has exactly the official module's parameter names —
``align.weight/bias`` (when present) and ``generation.0.weight/bias``, ``generation.2.weight/bias``.
Official checkpoint keys map as: yzd-v ``distill_losses.loss_mgd_fpn_{i}.{align,generation}.*``
→ ``blocks.<tap>.{align,generation}.*`` (i = 0..4 is P3..P7; segmentation
``distill_losses.loss_mgd_fea.*`` → ``blocks.c5.*``); mmrazor
``distiller.connectors.s_fpn{i}_connector.{align,generation}.*`` → ``blocks.<tap>.*``.
:meth:`MGD.load_official` strips such a prefix and loads one tap.

Heterogeneous pairs: ``align`` is the adapter (only when channels differ, as in the official
code: R18 ``c5`` 512 → 2048 for an R101 teacher, so G then has 2048 channels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo
from . import register
from .base import Method
from .common import check_pair, float32_region, match_spatial, upcast

DRAW_ORDERS = ("reverse", "forward")


class MGDBlock(nn.Module):
    """``align`` (or None) and ``generation`` of one tap, named as in the official modules."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.align: nn.Module | None = None
        if student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)
        c = teacher_channels
        self.generation = nn.Sequential(
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )


@register
class MGD(Method):
    """MGD (Yang et al., ECCV 2022): L = α·Σ(G(M ⊙ align(F_S)) − F_T)²/N, M zeroes positions w.p. λ.

    Masks come from :attr:`generator` (CPU; None = global RNG) or are passed in (``masks=``,
    :meth:`loss_tap`). Presets, parity key layout and deviations: module docstring.
    """

    name = "mgd"
    paper = "Yang et al., Masked Generative Distillation (ECCV 2022)"
    evidence = "parity-tested"
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # yzd-v/MGD and mmrazor RetinaNet X101 → R50: 5 FPN levels, α 2e-5, λ 0.65
        "detection": {
            "taps": "fpn",
            "alpha_mgd": 2e-5,
            "lambda_mgd": 0.65,
            "mask_on_channel": False,
            "draw_order": "reverse",
        },
        # yzd-v/MGD seg (PSPNet-R101 → R18, 512×512, 40k): last backbone stage, α 2e-5, λ 0.75
        "segmentation": {
            "taps": "c5",
            "alpha_mgd": 2e-5,
            "lambda_mgd": 0.75,
            "mask_on_channel": False,
            "draw_order": "reverse",
        },
    }

    @dataclass
    class Config:
        """Options of ``mgd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('fpn', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        alpha_mgd: float = opt(2e-05, 'loss weight α (on the sum over C·H·W, ÷ N)')
        lambda_mgd: float = opt(0.65, 'fraction λ of positions masked')
        mask_on_channel: bool = opt(False, 'mask channels (N×C×1×1) instead of positions')
        draw_order: Literal["reverse", "forward"] = opt(
            'reverse', 'order of the mask draws over taps (reverse: coarsest first)'
        )

    def __init__(
        self,
        student: dict[str, TapInfo],
        teacher: dict[str, TapInfo],
        task: str,
        **hp: Any,
    ) -> None:
        super().__init__(student, teacher, task, **hp)
        self.alpha = float(hp["alpha_mgd"])
        self.lam = float(hp["lambda_mgd"])
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"--set lambda_mgd: the mask ratio must be in [0, 1] (got {self.lam})")
        self.mask_on_channel = bool(hp["mask_on_channel"])
        self.draw_order = str(hp["draw_order"])
        if self.draw_order not in DRAW_ORDERS:
            raise ConfigError(f"--set draw_order: '{self.draw_order}' is not one of {', '.join(DRAW_ORDERS)}")
        # CPU generator the masks are drawn from; None = the global CPU RNG (the official behaviour)
        self.generator: torch.Generator | None = None
        self.blocks = nn.ModuleDict(
            {tap: MGDBlock(student[tap].channels, teacher[tap].channels) for tap in self.taps}
        )

    # -- randomness ---------------------------------------------------------------------
    def draw_mask(self, like: Tensor) -> Tensor:
        """Eq. (2) for an (N, C, H, W) map: 0 with probability λ, else 1; float, on ``like``'s device.

        Drawn on the CPU from :attr:`generator` (official: ``torch.rand`` on the CPU, then moved).
        Shape N×1×H×W, or N×C×1×1 with ``mask_on_channel``.
        """
        n, c, h, w = like.shape
        shape = (n, c, 1, 1) if self.mask_on_channel else (n, 1, h, w)
        u = torch.rand(shape, generator=self.generator)
        mask = torch.where(u > 1 - self.lam, 0.0, 1.0)
        return mask.to(device=like.device, dtype=like.dtype)

    # -- loss -----------------------------------------------------------------------------
    def loss_tap(self, tap: str, fs: Tensor, ft: Tensor, mask: Tensor | None = None) -> Tensor:
        """The weighted loss of one tap, Eqs. (1)–(3); ``mask`` (1 = keep) or a fresh random one."""
        check_pair(self.name, tap, fs, ft)
        block = self.blocks[tap]
        with float32_region(fs):
            fs, ft = upcast(fs), upcast(ft.detach())
            if block.align is not None:
                fs = block.align(fs)
            fs = match_spatial(fs, ft)
            if mask is None:
                mask = self.draw_mask(fs)
            else:
                mask = upcast(mask.to(fs.device))
            gen = block.generation(fs * mask)
            return self.alpha * (gen - ft).pow(2).sum() / ft.shape[0]

    def forward(
        self,
        s: ModelOutput,
        t: ModelOutput,
        targets: Any = None,
        masks: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        masks = masks or {}
        order = self.taps[::-1] if self.draw_order == "reverse" else self.taps
        losses = {tap: self.loss_tap(tap, s.taps[tap], t.taps[tap], masks.get(tap)) for tap in order}
        return {f"{self.name}.{tap}": losses[tap] for tap in self.taps}

    def load_official(self, tap: str, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load one official ``FeatureLoss``/``MGDConncetor`` state dict (any key prefix) into ``tap``."""
        mapped: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            for part in ("align.", "generation."):
                if key.startswith(part) or f".{part}" in key:
                    mapped[part + key.split(part, 1)[1]] = value
                    break
        self.blocks[tap].load_state_dict(mapped, strict=strict)

    def internals(self, s: ModelOutput, t: ModelOutput, targets: Any = None,
                  query: tuple[float, float] = (0.5, 0.5)) -> dict[str, Tensor]:
        """Per tap (kdcli viz, mask statistics): a fresh random keep-mask M of Eq. (2) (``random_mask``, 1 = kept;
        (N, H, W), or (N, C) with ``mask_on_channel``) and the squared error of the generation from it,
        mean_c (G(M ⊙ S̃) − F_T)² (``generation_error``, (N, H, W))."""
        out: dict[str, Tensor] = {}
        for tap in self.taps:
            block = self.blocks[tap]
            with float32_region(s.taps[tap]):
                fs, ft = upcast(s.taps[tap].detach()), upcast(t.taps[tap].detach())
                fs = match_spatial(block.align(fs) if block.align is not None else fs, ft)
                mask = self.draw_mask(fs)
                out[f"{tap}.random_mask"] = mask.flatten(1) if self.mask_on_channel else mask[:, 0]
                out[f"{tap}.generation_error"] = (block.generation(fs * mask) - ft).pow(2).mean(1)
        return out
