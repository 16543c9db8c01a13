r"""MasKD — Masked Distillation with Receptive Tokens (Huang, Guo, Wang, Chen, Lu, Wang, Xu; ICLR 2023;
official code hunto/MasKD: ``mmrazor/mmrazor/models/losses/maskd.py`` (``MasKDLoss``, detection) and
``segmentation/losses/maskd.py`` (CIRKD code base)), followed exactly. Method page: docs/methods/maskd.md.

Modules per tap (C = teacher channels, T tokens):

    mask_token ∈ R^{T×C}, init N(0, 0.01²)                                   (receptive tokens)
    prob: conv3×3(C→C, pad 1) → GAP → conv1×1(C→T), normal(0, √(2/fan_out)), bias 0   (detection)
    align: 1×1 conv student→teacher channels with bias, PyTorch default init (mmrazor
           ``SingleTeacherDistiller.build_align_module``), used even when C_S = C_T   (detection)

Equations (S̃ = align(F_S), the teacher is detached)::

    M      = σ(tokens · F_T) ∈ R^{N×T×HW}                                                   (1)
    M     ← M ⊙ sg(σ(tokens · S̃))        once iteration ≥ custom_mask_warmup ("custom mask")  (2)
    ℓ_ntc  = Σ_hw M² (S̃ − F_T)² / (Σ_hw M + ε)                                               (3)
    detection:    L = w · mean_n Σ_t softmax_t(prob(F_T))_{n,t} · mean_c ℓ_ntc  (per level)  (4)
    segmentation: L = w · ½ · mean_{n,t,c} ℓ_ntc                                             (4')

Per-level losses are returned separately (``maskd.<tap>``); their sum is the official
``loss_weight · Σ_levels``. ε = 0 in detection (the official code has none), 1e-5 in segmentation.
(3) is evaluated as Σ_hw M²·Δ² with an einsum over (N, T, HW) × (N, C, HW), never materialising
the N×T×C×H×W masked features (same value; checked against the direct form in the tests).

Stage 1 (mask learning) needs the frozen teacher's detection head and is run outside this
loss: :meth:`MaskModule.forward_train` returns the mask-weighted teacher feature
Σ_t w_t (M_t ⊙ F_T) and the Dice diversity term (:func:`dice_coeff`, the official pairwise Dice
over distinct token pairs, ε = 1e-12); the stage-1 objective is detection loss(head(that feature))
+ dice. In stage 2 (this method's ``forward``) tokens and prob head are frozen (official
``lr_mult=0, decay_mult=0``; here ``requires_grad=False`` unless ``train_masks=True``).

Custom-mask counter: the official ``self._iter`` is a plain attribute (lost on resume) incremented
on every call; here it is the persistent buffer ``iteration`` (saved in the state dict), incremented
once per forward in training mode only.

Parity layout (official weights map 1:1; :meth:`MasKD.load_official` does the renaming):
``mask_modules[tap].mask_token`` ↔ ``mask_modules.{i}.mask_token`` (i = index of the tap in
``taps``), ``mask_modules[tap].prob.{0,2}.{weight,bias}`` ↔ ``mask_modules.{i}.prob.{0,2}.*``,
``align[tap].{weight,bias}`` ↔ distiller ``align_modules.component_0.{i}.*``; segmentation:
``mask_modules[tap].mask_token`` ↔ ``mask_module.mask_token``, or the bare ``mask_token`` of the ``MaskModule``
state dict that the official segmentation script saves and loads (``--pretrained-mask``).

Deviations / quirks:

- Official bug (one stored revision, 4e3a36ba): on reaching ``custom_mask_warmup`` the detection code
  reads the undefined attribute ``self.weight_s_mask_warmup`` (for a log message) and would raise
  ``AttributeError``; revision a419ccfd reads ``custom_mask_warmup`` there instead. The maths (2) is the
  same in both and is what is implemented; the crash is not reproduced.
- In (2) only the student's factor is computed without gradient (official); the teacher's mask keeps
  its graph, so with ``train_masks=True`` the tokens get the official gradient through it.
- Official quirk kept by default: no ε in (3) for detection (``eps=0``), so a level whose masks all
  underflow to 0 gives NaN; set ``eps`` (e.g. 1e-5, the segmentation value) to avoid it.
- The segmentation script's extra 0.4× term on auxiliary logits is not applied (no aux tap);
  the segmentation preset distils ``seg_logits`` only.
- A student map of a different H×W is resized to the teacher's (bilinear); the official code
  assumes equal shapes. Everything runs in float32 with autocast disabled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import MethodError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo
from . import register
from .base import Method
from .common import build_adapter, check_pair, float32_region, match_spatial, upcast


def dice_coeff(masks: Tensor) -> Tensor:
    """Official Dice diversity of (N, T, HW) masks: mean over n and ordered pairs i ≠ j of
    2⟨m_i, m_j⟩ / (‖m_i‖² + 1e-12 + ‖m_j‖² + 1e-12)."""
    n, t, _ = masks.shape
    a = masks @ masks.transpose(1, 2)  # (N, T, T)
    sq = masks.pow(2).sum(-1) + 1e-12  # (N, T)
    d = 2 * a / (sq[:, None, :] + sq[:, :, None])
    off = 1.0 - torch.eye(t, dtype=masks.dtype, device=masks.device)
    return (d * off).sum() / (off.sum() * n)


class MaskModule(nn.Module):
    """Receptive tokens (and the optional prob head) of one level, named as the official module."""

    def __init__(self, channels: int, num_tokens: int, weight_mask: bool) -> None:
        super().__init__()
        self.weight_mask = weight_mask
        self.mask_token = nn.Parameter(torch.randn(num_tokens, channels).normal_(0, 0.01))
        if weight_mask:
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

    def forward_mask(self, x: Tensor) -> Tensor:
        """σ(tokens · x): (N, C, H, W) → (N, T, H, W)."""
        n, c, h, w = x.shape
        return torch.matmul(self.mask_token, x.reshape(n, c, h * w)).sigmoid().view(n, -1, h, w)

    def forward_prob(self, x: Tensor) -> Tensor:
        """softmax over tokens of the prob head: (N, T)."""
        return self.prob(x).flatten(1).softmax(1)

    def forward_train(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 1 (mask learning): Σ_t w_t (M_t ⊙ x) and the Dice diversity of the masks."""
        mask = self.forward_mask(x)
        weights = mask
        if self.weight_mask:
            weights = mask * self.forward_prob(x)[:, :, None, None]
        out = x * weights.sum(1, keepdim=True)  # Σ_t w_t M_t ⊙ x, without the (N, T, C, H, W) tensor
        return out, dice_coeff(mask.flatten(2))


def masked_sq_error(mask: Tensor, fs: Tensor, ft: Tensor, eps: float = 0.0) -> Tensor:
    """ℓ_ntc of Eq. (3): Σ_hw M²(S − T)² / (Σ_hw M + ε); mask (N, T, H, W), maps (N, C, H, W) → (N, T, C)."""
    m = mask.flatten(2)
    num = torch.einsum("nth,nch->ntc", m.pow(2), (fs - ft).flatten(2).pow(2))
    return num / (m.sum(-1, keepdim=True) + eps)


@register
class MasKD(Method):
    """Receptive-token masked feature distillation (module docstring: equations, deviations)."""

    name = "maskd"
    paper = "Huang et al., Masked Distillation with Receptive Tokens (ICLR 2023)"
    evidence = "parity-tested"
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # mmrazor/configs/distill/maskd/retinanet_r101-retinanet_r50_coco.py: all 5 neck outputs,
        # 6 tokens, prob weighting, custom mask after 7000 iterations, loss_weight 7, align convs
        "detection": {
            "taps": "fpn",
            "weight": 7.0,
            "num_tokens": 6,
            "weight_mask": True,
            "custom_mask": True,
            "custom_mask_warmup": 7000,
            "align": True,
            "eps": 0.0,
            "scale": 1.0,
            "train_masks": False,
            "pretrained": "",
        },
        # CIRKD code base: logits, 8 tokens, no prob, no custom mask, 0.5 · mean, ε = 1e-5, λ = 1
        "segmentation": {
            "taps": "seg_logits",
            "weight": 1.0,
            "num_tokens": 8,
            "weight_mask": False,
            "custom_mask": False,
            "custom_mask_warmup": 200000000,
            "align": False,
            "eps": 1e-5,
            "scale": 0.5,
            "train_masks": False,
            "pretrained": "",
        },
    }

    @dataclass
    class Config:
        """Options of ``maskd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('fpn', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        weight: float = opt(7.0, 'loss weight per tap')
        num_tokens: int = opt(6, 'mask tokens (learnable queries) per tap')
        weight_mask: bool = opt(True, "weight each mask's loss by its predicted probability")
        custom_mask: bool = opt(True, "multiply by the student's mask after the warm-up")
        custom_mask_warmup: int = opt(7000, "iterations before the student's mask is used")
        align: bool = opt(True, 'always apply the align conv (else only when channels differ)')
        eps: float = opt(0.0, "ε added to the masked error's normaliser")
        scale: float = opt(1.0, 'extra factor on the loss (official)')
        train_masks: bool = opt(False, 'train the mask tokens with the student (official: frozen)')
        pretrained: str = opt(
            '', "file of pre-trained mask tokens/prompts (safetensors or weights-only torch); '' = none"
        )

    def __init__(self, student: dict[str, TapInfo], teacher: dict[str, TapInfo], task: str, **hp: Any) -> None:
        super().__init__(student, teacher, task, **hp)
        self.weight_mask = bool(hp["weight_mask"])
        self.custom_mask = bool(hp["custom_mask"])
        self.custom_mask_warmup = int(hp["custom_mask_warmup"])
        self.eps = float(hp["eps"])
        self.scale = float(hp["scale"])
        self.mask_modules = nn.ModuleDict()
        self.align = nn.ModuleDict()
        for tap in self.taps:
            cs, ct = student[tap].channels, teacher[tap].channels
            self.mask_modules[tap] = MaskModule(ct, int(hp["num_tokens"]), self.weight_mask)
            if hp["align"] or cs != ct:
                self.align[tap] = build_adapter(cs, ct, bias=True, init="default")
        # custom-mask iteration counter: persistent so that a resumed run keeps its schedule
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        if hp["pretrained"]:
            ckpt = torch.load(hp["pretrained"], map_location="cpu", weights_only=True)
            self.load_official(ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt)
        self.mask_modules.requires_grad_(bool(hp["train_masks"]))

    @property
    def custom_mask_active(self) -> bool:
        return self.custom_mask and int(self.iteration) >= self.custom_mask_warmup

    def forward(self, s: ModelOutput, t: ModelOutput, targets: Any = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        use_custom = self.custom_mask_active
        for tap in self.taps:
            fs, ft = s.taps[tap], t.taps[tap]
            check_pair(self.name, tap, fs, ft)
            with float32_region(fs):
                fs, ft = upcast(fs), upcast(ft.detach())
                if tap in self.align:
                    fs = self.align[tap](fs)
                fs = match_spatial(fs, ft)
                mm = self.mask_modules[tap]
                mask = mm.forward_mask(ft)
                if use_custom:
                    with torch.no_grad():  # only the student's factor is constant (official); the teacher's
                        mask_s = mm.forward_mask(fs)  # mask keeps its graph to the tokens
                    mask = mask * mask_s
                loss = masked_sq_error(mask, fs, ft, self.eps)  # (N, T, C)
                if self.weight_mask:
                    loss = (loss.mean(-1) * mm.forward_prob(ft)).sum(-1)  # (N,)
                out[f"{self.name}.{tap}"] = self.weight * self.scale * loss.mean()
        if self.training:
            self.iteration += 1
        return out

    def load_official(self, state_dict: Mapping[str, Tensor], align: Mapping[str, Tensor] | None = None) -> None:
        """Load official MasKD mask weights and, optionally, the distiller's align convs.

        Mask keys: detection ``[...]mask_modules.{i}.{mask_token,prob.*}`` (i = index in ``taps``);
        segmentation ``[...]mask_module.mask_token`` or the bare ``MaskModule`` state dict the CIRKD script
        saves and loads (``mask_token``). Align keys: ``[...]align_modules.component_0.{i}.{weight,bias}``.
        Keys naming nothing of ours are ignored; a shape mismatch raises.
        """
        copy_official_masks(self.mask_modules, self.taps, state_dict)
        copy_official_align(self.align, self.taps, align or {})

    def internals(self, s: ModelOutput, t: ModelOutput, targets: Any = None,
                  query: tuple[float, float] = (0.5, 0.5)) -> dict[str, Tensor]:
        """Per tap (kdcli viz, mask statistics): the receptive-token masks σ(tokens · F_T) the loss uses
        (``token_mask``, (N, T, H, W); times the student's masks once the custom mask is active)."""
        out: dict[str, Tensor] = {}
        for tap in self.taps:
            mm = self.mask_modules[tap]
            with float32_region(s.taps[tap]):
                fs, ft = upcast(s.taps[tap].detach()), upcast(t.taps[tap].detach())
                mask = mm.forward_mask(ft)
                if self.custom_mask_active:
                    fs = match_spatial(self.align[tap](fs) if tap in self.align else fs, ft)
                    mask = mask * mm.forward_mask(fs)
                out[f"{tap}.token_mask"] = mask
        return out


def copy_official_masks(modules: nn.ModuleDict, taps: tuple[str, ...], state_dict: Mapping[str, Tensor]) -> None:
    """Copy official ``mask_modules.{i}.*`` / ``mask_module.*`` / bare ``MaskModule`` tensors into ``modules``.

    Only names that exist in our module are copied (official FreeKD modules also carry the persistent Haar
    filter buffers ``xfm.*``/``ixfm.*``, which are not weights).
    """
    for key, value in state_dict.items():
        if "mask_modules." in key:
            idx, _, rest = key[key.find("mask_modules.") + len("mask_modules."):].partition(".")
            if not idx.isdigit() or int(idx) >= len(taps):
                raise MethodError(f"official mask weight '{key}': level {idx} but only {len(taps)} taps")
            tap = taps[int(idx)]
        elif "mask_module." in key:
            tap, rest = taps[0], key[key.find("mask_module.") + len("mask_module."):]
        elif key == "mask_token" or key.startswith("prob."):
            tap, rest = taps[0], key  # the bare segmentation MaskModule state dict
        else:
            continue
        own = dict(modules[tap].named_parameters())
        if rest in own:
            with torch.no_grad():
                own[rest].copy_(value)


def copy_official_align(align: nn.ModuleDict, taps: tuple[str, ...], state_dict: Mapping[str, Tensor]) -> None:
    """Copy the distiller's ``align_modules.component_0.{i}.{weight,bias}`` convs into ``align[taps[i]]``."""
    for key, value in state_dict.items():
        rest = key[key.find("align_modules.") + len("align_modules."):] if "align_modules." in key else key
        parts = rest.split(".")
        if parts[0].startswith("component_"):
            parts = parts[1:]
        with torch.no_grad():
            align[taps[int(parts[0])]].get_parameter(".".join(parts[1:])).copy_(value)
