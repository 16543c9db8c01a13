r"""FreeKD — Knowledge Distillation via Semantic Frequency Prompt (Zhang et al., CVPR 2024; official
code Gumpest/FreeKD: ``mmrazor/models/losses/freekd.py`` (``FreeKDLoss``), ``mmrazor/models/losses/mse.py``,
``configs/distill/freekd/freekd_retinanet_r101-retinanet_r50_coco.py``), followed exactly. Method page:
docs/methods/freekd.md. Detection only: the segmentation and prompt-learning code are not released and
kdcli offers no adaptation.

Modules per FPN level (C = teacher channels, T prompts):

    mask_token ∈ R^{4×T×C}, init N(0, 0.01²)  (frequency prompts; index 0 = low-pass, unused in the
                                                loss, indices 1, 2, 3 = DWT detail levels 1, 2, 3)
    prob: conv3×3(C→C) → GAP → conv1×1(C→T)   (present in the official module, unused by the loss;
                                                kept so that official prompt checkpoints load 1:1)
    align: 1×1 conv student→teacher channels with bias, PyTorch default init (always applied)

Equations (S̃ = align(F_S), teacher detached):

    (A, {B_j}_{j=1..3}) = DWT_haar,J=3,zero(F)        B_j ∈ R^{N×C×3×H_j×W_j}  (3 orientations)   (1)
    M_j = σ(prompt_j · Σ_o B_j^T[:, :, o]) ∈ R^{N×T×H_j×W_j}      (teacher bands only)              (2)
    L_freq = Σ_{j=1..3} mean_{n,t,c,o,h,w} | M_j ⊙ B_j^S̃ − M_j ⊙ B_j^T |   (L1, official mean)   (3)
    L_mse  = mean_{n,c,h,w} (S̃ − F_T)²                                                             (4)
    per level: w_freq · L_freq  (``freekd.<tap>``)  and  w_mse · L_mse  (``freekd.mse.<tap>``)

(3) is evaluated as Σ_t M_t · |ΔB| / (N·T·C·3·H_j·W_j) (M > 0, so |M·Δ| = M·|Δ| — equal value and
gradient), without the N×T×C×3×H×W tensor. The low-pass band A is not used (official).

DWT: :func:`haar_dwt` reproduces ``pytorch_wavelets.DWTForward(J=3, wave='haar', mode='zero')``: each
level zero-pads an odd H or W by one row/column at the end, then per 2×2 block [[a, b], [c, d]]
returns LL = (a+b+c+d)/2 and the details, in pytorch_wavelets' orientation order,
(a+b−c−d)/2 (low along W, high along H), (a−b+c−d)/2 (high along W, low along H), (a−b−c+d)/2.
Level 1 is the finest. :func:`haar_idwt` inverts it (exact for even sizes).

Official hyper-parameters (RetinaNet R101→R50): T = 6, w_freq = 1, w_mse = 5, all 5 neck outputs;
prompts frozen (``lr_mult 0``; here ``requires_grad=False`` unless ``train_prompts=True``); align
convs trainable. The extra SmoothL1 on ``retina_reg`` (w 1) is a head loss, not part of this method.

Parity layout (:meth:`FreeKD.load_official`): ``mask_modules[tap].mask_token`` ↔
``mask_modules.{i}.mask_token``, ``mask_modules[tap].prob.{0,2}.*`` ↔ ``mask_modules.{i}.prob.{0,2}.*``
(i = index of the tap in ``taps``), ``align[tap].*`` ↔ distiller ``align_modules.component_0.{i}.*``.

Deviations: none in the maths. The official ``custom_mask``/``_iter`` arguments have no effect in
its forward and are not exposed. A student map of a different H×W is resized to the teacher's
(bilinear); the official code assumes equal shapes. Everything runs in float32, autocast disabled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MethodError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo
from . import register
from .base import Method
from .common import build_adapter, check_pair, float32_region, match_spatial, upcast
from .maskd import copy_official_align, copy_official_masks


def haar_dwt_level(x: Tensor) -> tuple[Tensor, Tensor]:
    """One zero-mode Haar level: (N, C, H, W) → LL (N, C, H', W') and details (N, C, 3, H', W')."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2))
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    ll = (a + b + c + d) / 2
    details = torch.stack(((a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2), dim=2)
    return ll, details


def haar_dwt(x: Tensor, levels: int = 3) -> tuple[Tensor, list[Tensor]]:
    """``pytorch_wavelets.DWTForward(J=levels, wave='haar', mode='zero')``: (low-pass, [details_1..J])."""
    details = []
    for _ in range(levels):
        x, d = haar_dwt_level(x)
        details.append(d)
    return x, details


def haar_idwt(low: Tensor, details: list[Tensor]) -> Tensor:
    """Inverse of :func:`haar_dwt` (exact when every level had even H and W)."""
    x = low
    for d in reversed(details):
        x = x[..., : d.shape[-2], : d.shape[-1]]
        h1, h2, h3 = d.unbind(2)
        a = (x + h1 + h2 + h3) / 2
        b = (x + h1 - h2 - h3) / 2
        c = (x - h1 + h2 - h3) / 2
        e = (x - h1 - h2 + h3) / 2
        n, ch, hh, ww = x.shape
        top = torch.stack((a, b), dim=-1).reshape(n, ch, hh, 2 * ww)
        bot = torch.stack((c, e), dim=-1).reshape(n, ch, hh, 2 * ww)
        x = torch.stack((top, bot), dim=-2).reshape(n, ch, 2 * hh, 2 * ww)
    return x


class PromptModule(nn.Module):
    """Frequency prompts of one level, named as the official ``MaskModule``."""

    def __init__(self, channels: int, num_tokens: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.randn(4, num_tokens, channels).normal_(0, 0.01))
        self.prob = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, num_tokens, kernel_size=1),
        )
        for m in self.prob.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)

    def forward_mask(self, x: Tensor, index: int) -> Tensor:
        """σ(prompt_index · x): (N, C, H, W) → (N, T, H, W)."""
        n, c, h, w = x.shape
        return torch.matmul(self.mask_token[index], x.reshape(n, c, h * w)).sigmoid().view(n, -1, h, w)


def masked_l1(mask: Tensor, bs: Tensor, bt: Tensor) -> Tensor:
    """Official ``l1_loss(bs[:, None] * M[:, :, None, None], bt[:, None] * M[:, :, None, None])`` (mean),
    for a positive mask (N, T, H, W) and bands (N, C, 3, H, W), without the (N, T, C, 3, H, W) tensor."""
    n, t = mask.shape[:2]
    c, o, h, w = bs.shape[1:]
    absdiff = (bs - bt).abs().sum((1, 2))  # (N, H, W)
    return (mask.sum(1) * absdiff).sum() / (n * t * c * o * h * w)


@register
class FreeKD(Method):
    """Frequency-prompt masked wavelet distillation + MSE (module docstring: equations, deviations)."""

    name = "freekd"
    paper = "Zhang et al., FreeKD: Knowledge Distillation via Semantic Frequency Prompt (CVPR 2024)"
    evidence = "parity-tested"
    tasks = ("detection",)
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # configs/distill/freekd/freekd_retinanet_r101-retinanet_r50_coco.py
        "detection": {
            "taps": "fpn",
            "weight": 1.0,
            "mse_weight": 5.0,
            "num_tokens": 6,
            "levels": 3,
            "train_prompts": False,
            "pretrained": "",
        },
    }

    @dataclass
    class Config:
        """Options of ``freekd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('fpn', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        weight: float = opt(1.0, 'loss weight per tap')
        mse_weight: float = opt(5.0, 'weight of the plain MSE term')
        num_tokens: int = opt(6, 'mask tokens (learnable queries) per tap')
        levels: int = opt(3, 'levels of the Haar wavelet decomposition')
        train_prompts: bool = opt(False, 'train the prompts with the student (official: frozen)')
        pretrained: str = opt(
            '', "file of pre-trained mask tokens/prompts (safetensors or weights-only torch); '' = none"
        )

    def __init__(self, student: dict[str, TapInfo], teacher: dict[str, TapInfo], task: str, **hp: Any) -> None:
        super().__init__(student, teacher, task, **hp)
        self.mse_weight = float(hp["mse_weight"])
        self.levels = int(hp["levels"])
        if not 1 <= self.levels <= 3:
            raise MethodError(f"method 'freekd': levels must be 1..3 (one prompt per detail level), got {self.levels}")
        self.mask_modules = nn.ModuleDict()
        self.align = nn.ModuleDict()
        for tap in self.taps:
            cs, ct = student[tap].channels, teacher[tap].channels
            self.mask_modules[tap] = PromptModule(ct, int(hp["num_tokens"]))
            self.align[tap] = build_adapter(cs, ct, bias=True, init="default")
        if hp["pretrained"]:
            ckpt = torch.load(hp["pretrained"], map_location="cpu", weights_only=True)
            self.load_official(ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt)
        self.mask_modules.requires_grad_(bool(hp["train_prompts"]))

    def freq_loss(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        """L_freq of Eq. (3) for aligned student ``fs`` and teacher ``ft`` (float32 in, no autocast)."""
        _, bands_t = haar_dwt(ft, self.levels)
        _, bands_s = haar_dwt(fs, self.levels)
        pm = self.mask_modules[tap]
        loss = fs.new_zeros(())
        for j, (bt, bs) in enumerate(zip(bands_t, bands_s, strict=True), start=1):  # 3 wavelet levels, not pixels
            mask = pm.forward_mask(bt.sum(2), j)
            loss = loss + masked_l1(mask, bs, bt)
        return loss

    def forward(self, s: ModelOutput, t: ModelOutput, targets: Any = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for tap in self.taps:
            fs, ft = s.taps[tap], t.taps[tap]
            check_pair(self.name, tap, fs, ft)
            with float32_region(fs):
                fs, ft = upcast(fs), upcast(ft.detach())
                fs = match_spatial(self.align[tap](fs), ft)
                out[f"{self.name}.{tap}"] = self.weight * self.freq_loss(tap, fs, ft)
                out[f"{self.name}.mse.{tap}"] = self.mse_weight * (fs - ft).pow(2).mean()
        return out

    def load_official(self, state_dict: Mapping[str, Tensor], align: Mapping[str, Tensor] | None = None) -> None:
        """Load official ``FreeKDLoss`` prompts (``[...]mask_modules.{i}.{mask_token,prob.*}``; the modules' Haar
        filter buffers ``xfm.*``/``ixfm.*`` are skipped) and, optionally, the distiller's
        ``align_modules.component_0.{i}.*`` convs."""
        copy_official_masks(self.mask_modules, self.taps, state_dict)
        copy_official_align(self.align, self.taps, align or {})
