r"""FGD — Focal and Global Knowledge Distillation for Detectors (Yang, Li, Jiang, Wang, Wang, Yuan,
Xu; CVPR 2022; official code yzd-v/FGD, ``mmdet/distillation/losses/fgd.py``, ``FeatureLoss``).
Method page: docs/methods/fgd.md (equations, official defaults, parity); the official code is followed
exactly, its reductions included.

Per distilled FPN level, with F_S the (aligned) student map, F_T the teacher map (detached), both
(N, C, H, W), T the temperature and the box masks M_fg, M_bg of :mod:`kdcli.methods.boxes`::

    S(F)   = H·W · softmax_{hw}( mean_c |F| / T )                      (N, H, W)        (1)
    Cat(F) = C · softmax_c( mean_{hw} |F| / T )                        (N, C)           (2)
    L_fg   = Σ_{n,c,h,w} M_fg · S(F_T) · Cat(F_T) · (F_S − F_T)² / N                    (3)
    L_bg   = Σ_{n,c,h,w} M_bg · S(F_T) · Cat(F_T) · (F_S − F_T)² / N                    (4)
    L_at   = Σ |Cat(F_S) − Cat(F_T)| / N + Σ |S(F_S) − S(F_T)| / N                       (5)
    ctx_b  = Σ_{hw} softmax_{hw}( conv_mask_b(F) ) · F                 (N, C, 1, 1)     (6)
    out_b  = F + channel_add_conv_b(ctx_b),  b ∈ {s (on F_S), t (on F_T)}               (7)
    L_glb  = Σ (out_s − out_t)² / N                                                      (8)
    L      = α L_fg + β L_bg + γ L_at + λ L_glb                                          (9)

Only the teacher's attention weights (3)–(4). (1)–(2) are the paper's attention maps, (3)–(5) and (8)
its losses; "/ N" is the batch size (mmdet ``MSELoss(reduction="sum") / len(...)``), so the losses are
sums over C·H·W — the official weights below only make sense with this reduction. The official
code multiplies both maps by √(M·S·Cat) before a sum-MSE; (3)–(4) are the same quantity.
``channel_add_conv_b`` is conv1×1(C→C/2) → LayerNorm([C/2, 1, 1]) → ReLU → conv1×1(C/2→C): a
GcBlock with *separate* student and teacher parameters, both learnable (F_T is detached, the
teacher-branch parameters are not). Each term is returned weighted and separately, as
``fgd.<tap>.fg``, ``.bg``, ``.at``, ``.global``; their sum is the official per-level loss (9).

Initialisation (official ``reset_parameters``): ``conv_mask_{s,t}`` Kaiming-normal, fan_in, ReLU
gain, bias 0 (mmcv ``kaiming_init``); the last conv of ``channel_add_conv_{s,t}`` all zero, so at
start out_b = F and L_glb = Σ (F_S − F_T)² / N; the other layers (and ``align``) PyTorch
defaults. With the zero last conv only that conv (and ``align``) gets gradient at first; the
rest of the GcBlocks start learning once it has moved.

Presets (official configs, yzd-v/FGD ``configs/distillers/fgd/*``; constant, no schedule). ``recipe``
selects an official config row, applied to the weights you do not ``--set``:

=============  ======  =======  ========  ========  ======  ====================================
recipe         T       α        β         γ         λ       official config
=============  ======  =======  ========  ========  ======  ====================================
retinanet      0.5     1e-3     5e-4      5e-4      5e-6    RetinaNet R101/X101 → R50 (2x)
gfl            0.5     1e-3     5e-4      5e-4      5e-6    GFL R101 → R50 (1x)
faster_rcnn    0.5     5e-5     2.5e-5    5e-5      5e-7    Faster R-CNN R101 → R50, Cascade → Faster
fcos           0.8     1.6e-3   8e-4      8e-4      8e-6    FCOS R101 → R50 (2x)
reppoints      0.5     1.6e-3   8e-4      8e-4      8e-6    RepPoints X101 → R50 (2x)
=============  ======  =======  ========  ========  ======  ====================================

``recipe="auto"`` (default) takes the row of the student's detector family, which kdcli's detection
models put on every tap (``TapInfo.family``): ``retinanet`` → retinanet, ``fcos`` → fcos,
``fasterrcnn`` / ``maskrcnn`` → faster_rcnn (the official Mask R-CNN configs use the Faster R-CNN
values). Taps without a family (hand-made tap info) fall back to ``faster_rcnn`` for an FPN that
starts at P2 and ``retinanet`` otherwise. The class default γ of the official code is 1e-3; every
config uses the values above. ``taps="auto"`` (default) takes the official levels: every FPN
level (P3–P7) of a one-stage student, every level but the last (the max-pool P6; P2–P5 on a ResNet
FPN) of a two-stage one. ``box_scaling`` is ``"img_shape"`` (official: boxes
scaled by the level size over the *unpadded* resized image size), or ``"input"`` / ``"stride"``
(see :mod:`kdcli.methods.boxes`). ``init_student=True`` of the official configs is the
"inheriting strategy" (the student starts from the teacher's neck and head), an engine option, not part of this loss.

Parity layout: ``levels[tap]`` has exactly the official ``FeatureLoss`` parameters —
``align`` (only when channels differ: 1×1 conv student→teacher channels with bias, PyTorch
default init), ``conv_mask_s``, ``conv_mask_t``, ``channel_add_conv_s.{0,1,3}``,
``channel_add_conv_t.{0,1,3}`` — so an official state dict loads without renaming:
``levels[<tap>].<key>`` ↔ ``distill_losses.loss_fgd_fpn_<i>.<key>``, with i the neck output
index (RetinaNet/FCOS/GFL/RepPoints: fpn_0..4 = P3..P7; Faster R-CNN: fpn_0..3 = P2..P5).
:meth:`FGD.load_official` loads one level, :meth:`FGD.load_official_distiller` a whole
``distill_losses`` state dict.

Deviations:

- Student and teacher maps of different H×W: the student map is resized (bilinear,
  ``align_corners=False``) to the teacher's; the official code asserts equal sizes.
- Everything runs in float32 with autocast disabled (masks in the features' dtype, like the
  official ``zeros_like(S_attention_t)``; float64 inputs stay float64).
- With C = 1 the official C/2 = 0 channels break; here the hidden width is max(C // 2, 1).
- Images without boxes have M_fg = 0 and a uniform M_bg = 1/(H·W), as in the official code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError, MethodError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo, fpn_taps
from . import register
from .base import Method
from .boxes import SCALINGS, level_masks, normalise_boxes
from .common import build_adapter, check_pair, float32_region, match_spatial, upcast

WEIGHTS = ("temp", "alpha", "beta", "gamma", "lambda")
_RETINA = {"temp": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda": 5e-6}
# the official configs (yzd-v/FGD configs/distillers/fgd/*)
RECIPES: dict[str, dict[str, float]] = {
    "retinanet": dict(_RETINA),
    "gfl": dict(_RETINA),
    "faster_rcnn": {"temp": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5, "lambda": 5e-7},
    "fcos": {"temp": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda": 8e-6},
    "reppoints": {"temp": 0.5, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda": 8e-6},
}


# detector family (TapInfo.family, set by kdcli's detection models) → official config row; the
# official Mask R-CNN configs (R101 → R50, Cascade X101 → R50) use the Faster R-CNN values
FAMILY_RECIPES = {"retinanet": "retinanet", "fcos": "fcos", "fasterrcnn": "faster_rcnn", "maskrcnn": "faster_rcnn"}
TWO_STAGE = ("fasterrcnn", "maskrcnn")


def family(student: dict[str, TapInfo]) -> str:
    """The detector family of the student's FPN levels ('' when unknown or mixed)."""
    names = {student[n].family for n in fpn_taps(student)}
    return names.pop() if len(names) == 1 else ""


def two_stage(student: dict[str, TapInfo]) -> bool:
    """A two-stage student: by its family when known, else an FPN that starts at P2 (torchvision's
    Faster/Mask R-CNN) rather than P3."""
    fam = family(student)
    if fam:
        return fam in TWO_STAGE
    levels = fpn_taps(student)
    return bool(levels) and levels[0] == "p2"


def auto_taps(student: dict[str, TapInfo]) -> list[str]:
    """The official FGD levels: every FPN level of a one-stage student (P3–P7); for a two-stage
    student every level but the last, the max-pool P6 (P2–P5 on a ResNet FPN)."""
    levels = fpn_taps(student)
    return levels[:-1] if two_stage(student) and len(levels) > 1 else levels


def auto_recipe(student: dict[str, TapInfo]) -> str:
    """``recipe=auto``: the row of the student's family; without one, Faster R-CNN for a two-stage-looking
    FPN and RetinaNet otherwise."""
    fam = family(student)
    if fam in FAMILY_RECIPES:
        return FAMILY_RECIPES[fam]
    return "faster_rcnn" if two_stage(student) else "retinanet"


def attention(f: Tensor, temp: float) -> tuple[Tensor, Tensor]:
    """Eqs. (1)–(2): spatial (N, H, W) and channel (N, C) attention of ``f`` (N, C, H, W)."""
    n, c, h, w = f.shape
    a = f.abs()
    spatial = h * w * torch.softmax((a.mean(dim=1) / temp).reshape(n, -1), dim=1).reshape(n, h, w)
    channel = c * torch.softmax(a.mean(dim=(2, 3)) / temp, dim=1)
    return spatial, channel


def _channel_add(channels: int) -> nn.Sequential:
    hidden = max(channels // 2, 1)
    return nn.Sequential(
        nn.Conv2d(channels, hidden, kernel_size=1),
        nn.LayerNorm([hidden, 1, 1]),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, kernel_size=1),
    )


class FGDLevel(nn.Module):
    """The learnable parts of one level, named as the official ``FeatureLoss``; unweighted terms."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        c = teacher_channels
        self.align: nn.Module | None = (
            build_adapter(student_channels, c, bias=True, init="default") if student_channels != c else None
        )
        self.conv_mask_s = nn.Conv2d(c, 1, kernel_size=1)
        self.conv_mask_t = nn.Conv2d(c, 1, kernel_size=1)
        self.channel_add_conv_s = _channel_add(c)
        self.channel_add_conv_t = _channel_add(c)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.conv_mask_s, self.conv_mask_t):  # mmcv kaiming_init(mode="fan_in")
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for seq in (self.channel_add_conv_s, self.channel_add_conv_t):  # last_zero_init
            nn.init.zeros_(seq[-1].weight)
            nn.init.zeros_(seq[-1].bias)

    @staticmethod
    def context(f: Tensor, conv_mask: nn.Module) -> Tensor:
        """Eq. (6): softmax-pooled context (N, C, 1, 1)."""
        n, c, h, w = f.shape
        weights = torch.softmax(conv_mask(f).reshape(n, 1, h * w), dim=2)  # (N, 1, HW)
        return (f.reshape(n, c, h * w) @ weights.transpose(1, 2)).reshape(n, c, 1, 1)

    def global_out(self, f: Tensor, branch: str) -> Tensor:
        """Eq. (7) for branch ``"s"`` or ``"t"``."""
        conv_mask = self.conv_mask_s if branch == "s" else self.conv_mask_t
        add = self.channel_add_conv_s if branch == "s" else self.channel_add_conv_t
        return f + add(self.context(f, conv_mask))

    def forward(self, fs: Tensor, ft: Tensor, fg: Tensor, bg: Tensor, temp: float) -> dict[str, Tensor]:
        """Unweighted L_fg, L_bg, L_at, L_glb (Eqs. 3–5, 8); ``fs`` already aligned and resized."""
        n = fs.shape[0]
        s_t, c_t = attention(ft, temp)
        s_s, c_s = attention(fs, temp)
        # Σ_c Cat_t · (F_S − F_T)² first, then the spatial weights: (N, H, W)
        per_pixel = ((fs - ft).pow(2) * c_t[:, :, None, None]).sum(dim=1) * s_t
        return {
            "fg": (per_pixel * fg).sum() / n,
            "bg": (per_pixel * bg).sum() / n,
            "at": (c_s - c_t).abs().sum() / n + (s_s - s_t).abs().sum() / n,
            "global": (self.global_out(fs, "s") - self.global_out(ft, "t")).pow(2).sum() / n,
        }


@register
class FGD(Method):
    """Focal (box-masked, attention-weighted) + attention + global (GcBlock) feature distillation."""

    name = "fgd"
    paper = "Yang et al., Focal and Global Knowledge Distillation for Detectors (CVPR 2022)"
    evidence = "parity-tested"
    tasks = ("detection",)
    needs_targets = True
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # configs/distillers/fgd/*: the RetinaNet row; recipe="auto" swaps rows by architecture
        "detection": {"taps": "auto", "recipe": "auto", **_RETINA, "box_scaling": "img_shape"},
    }

    @dataclass
    class Config:
        """Options of ``fgd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('auto', 'taps distilled (auto: P3–P7 one-stage, P2–P5 two-stage)')
        recipe: Literal["auto", "retinanet", "gfl", "faster_rcnn", "fcos", "reppoints"] = opt(
            'auto', "row of the official configs (auto: by the student's detector)"
        )
        temp: float | None = opt(0.5, 'attention temperature T (none: from the recipe)')
        alpha: float | None = opt(0.001, 'foreground weight α (none: from the recipe)')
        beta: float | None = opt(0.0005, 'background weight β (none: from the recipe)')
        gamma: float | None = opt(0.0005, 'attention-loss weight γ (none: from the recipe)')
        lambda_: float | None = opt(5e-06, 'global-loss weight λ (none: from the recipe)', key="lambda")
        box_scaling: Literal["img_shape", "input", "stride"] = opt('img_shape', 'how boxes map onto the feature maps')

    @classmethod
    def resolve_hparams(
        cls, task: str, overrides: dict[str, Any] | None = None, where: str = "--set "
    ) -> dict[str, Any]:
        """Preset, then the recipe's row for the weights not overridden, then the overrides.

        With ``recipe="auto"`` the row depends on the student, so the weights not overridden are
        left as ``None`` here and filled in by the constructor (``self.hp`` shows the values used).
        """
        hp = super().resolve_hparams(task, overrides, where)
        recipe = str(hp["recipe"])
        if recipe != "auto" and recipe not in RECIPES:
            raise ConfigError(f"--set recipe={recipe}: not one of auto, {', '.join(RECIPES)}")
        for key in WEIGHTS:
            if key not in (overrides or {}):
                hp[key] = None if recipe == "auto" else RECIPES[recipe][key]
        return hp

    def tap_spec(self, hp: dict[str, Any], student: dict[str, TapInfo]) -> Any:
        # "auto": P3–P7 for one-stage students, P2–P5 for two-stage ones (official configs)
        return auto_taps(student) if hp["taps"] == "auto" else hp["taps"]

    def __init__(
        self,
        student: dict[str, TapInfo],
        teacher: dict[str, TapInfo],
        task: str,
        **hp: Any,
    ) -> None:
        super().__init__(student, teacher, task, **hp)
        recipe = str(hp.get("recipe", "auto"))
        if recipe == "auto":
            recipe = auto_recipe(student)
        if recipe not in RECIPES:
            raise ConfigError(f"--set recipe={recipe}: not one of auto, {', '.join(RECIPES)}")
        for key in WEIGHTS:
            if hp.get(key) is None:
                self.hp[key] = RECIPES[recipe][key]
        self.recipe = self.hp["recipe"] = recipe  # the run report shows the row actually used
        self.temp = float(self.hp["temp"])
        self.alpha = float(self.hp["alpha"])
        self.beta = float(self.hp["beta"])
        self.gamma = float(self.hp["gamma"])
        self.lambda_ = float(self.hp["lambda"])
        if self.temp <= 0:
            raise ConfigError(f"--set temp={self.temp}: the temperature must be > 0")
        self.box_scaling = str(hp.get("box_scaling", "img_shape"))
        if self.box_scaling not in SCALINGS:
            raise ConfigError(f"--set box_scaling={self.box_scaling}: not one of {', '.join(SCALINGS)}")
        self.strides = {tap: teacher[tap].stride for tap in self.taps}
        self.levels = nn.ModuleDict(
            {tap: FGDLevel(student[tap].channels, teacher[tap].channels) for tap in self.taps}
        )

    def _boxes(self, s: ModelOutput, t: ModelOutput, targets: Any, n: int) -> tuple[list[Tensor], dict[str, Any]]:
        if targets is None:
            raise MethodError("method 'fgd' needs the ground-truth boxes (targets) of the batch")
        if len(targets) != n:
            raise MethodError(f"method 'fgd': {len(targets)} targets for a batch of {n} images")
        extras = {**t.extras, **s.extras}
        needed = {"img_shape": "image_sizes", "input": "input_shape"}.get(self.box_scaling)
        if needed is not None and needed not in extras:
            raise MethodError(
                f"method 'fgd': box_scaling={self.box_scaling} needs the model's extras['{needed}'] "
                "(a kdcli detection model provides it)"
            )
        return [tg["boxes"] for tg in targets], extras

    def forward(self, s: ModelOutput, t: ModelOutput, targets: Any = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        first = t.taps[self.taps[0]]
        boxes, extras = self._boxes(s, t, targets, first.shape[0])
        boxes = [b.detach().to(first.device) for b in boxes]
        u, index = normalise_boxes(
            boxes,
            scaling=self.box_scaling,
            image_sizes=extras.get("image_sizes"),
            input_shape=extras.get("input_shape"),
        )
        weights = {"fg": self.alpha, "bg": self.beta, "at": self.gamma, "global": self.lambda_}
        for tap in self.taps:
            fs, ft = s.taps[tap], t.taps[tap]
            check_pair(self.name, tap, fs, ft)
            level = self.levels[tap]
            with float32_region(fs):
                fs, ft = upcast(fs), upcast(ft.detach())
                if level.align is not None:
                    fs = level.align(fs)
                fs = match_spatial(fs, ft)
                fg, bg = level_masks(
                    u, index, ft.shape[0], (ft.shape[-2], ft.shape[-1]),
                    scaling=self.box_scaling, stride=self.strides[tap], dtype=ft.dtype,
                )
                terms = level(fs, ft, fg, bg, self.temp)
                for key, value in terms.items():
                    out[f"{self.name}.{tap}.{key}"] = weights[key] * value
        return out

    def load_official(self, tap: str, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load one official ``FeatureLoss`` state dict (same key names) into the level ``tap``."""
        self.levels[tap].load_state_dict(dict(state_dict), strict=strict)

    def load_official_distiller(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load ``distill_losses.loss_fgd_fpn_<i>.*`` keys: level i is the i-th of :attr:`taps`."""
        for i, tap in enumerate(self.taps):
            prefix = f"distill_losses.loss_fgd_fpn_{i}."
            part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if not part and not strict:
                continue
            self.load_official(tap, part, strict=strict)

    def internals(self, s: ModelOutput, t: ModelOutput, targets: Any = None,
                  query: tuple[float, float] = (0.5, 0.5)) -> dict[str, Tensor]:
        """Per tap (kdcli viz, mask statistics): the box masks ``fg_mask``/``bg_mask`` (boxes.py), the teacher's and
        the student's spatial attention S(F) (Eq. 1), the teacher's channel attention Cat(F_T) (Eq. 2) and the
        teacher branch's global-context weights softmax_hw(conv_mask_t(F_T)) (Eq. 6)."""
        out: dict[str, Tensor] = {}
        first = t.taps[self.taps[0]]
        boxes, extras = self._boxes(s, t, targets, first.shape[0])
        u, index = normalise_boxes([b.detach().to(first.device) for b in boxes], scaling=self.box_scaling,
                                   image_sizes=extras.get("image_sizes"), input_shape=extras.get("input_shape"))
        for tap in self.taps:
            level = self.levels[tap]
            with float32_region(s.taps[tap]):
                fs, ft = upcast(s.taps[tap].detach()), upcast(t.taps[tap].detach())
                fs = match_spatial(level.align(fs) if level.align is not None else fs, ft)
                n, _, h, w = ft.shape
                fg, bg = level_masks(u, index, n, (h, w), scaling=self.box_scaling, stride=self.strides[tap],
                                     dtype=ft.dtype)
                s_t, c_t = attention(ft, self.temp)
                context = torch.softmax(level.conv_mask_t(ft).reshape(n, h * w), dim=1).reshape(n, h, w)
                out.update({f"{tap}.fg_mask": fg, f"{tap}.bg_mask": bg, f"{tap}.teacher_attention": s_t,
                            f"{tap}.student_attention": attention(fs, self.temp)[0],
                            f"{tap}.channel_attention": c_t, f"{tap}.context_attention": context})
        return out
