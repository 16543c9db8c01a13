r"""DMKD — Dual Masked Knowledge Distillation (Yang, Tang, Wu, Li, Xu, Wan; ICASSP 2024, arXiv 2309.02719).

**Reconstructed from the abstract: there is no official code and the method text was not available.** Method
page: docs/methods/dmkd.md (kdcli's template, [INF] throughout; tag legend there). What the abstract gives
([ABS]): two masking branches, one guided by spatial and one by channel attention; each reconstructs the
teacher feature from the masked student feature; the two reconstructions are fused with a "self-adjustable
weighting strategy" before the loss. Everything quantitative below is kdcli's template built from MGD/FGD
primitives checked against their official code, not DMKD's own maths.
No number of the paper has been reproduced with it.

Per tap (teacher T, N×C×H×W; student S; P = H·W):

    S̃ = f_align(S)                             1×1 conv C_S→C only if C_S ≠ C (as MGD)          D1
    A^S = P · softmax_p(mean_c |T| / τ)          teacher spatial attention (FGD), no gradient      D2
    A^C = C · softmax_c(mean_p |T| / τ)          teacher channel attention (FGD)
    B^S[n,p] = 0 on the top ⌈ρ_s·P⌉ positions of A^S (ties by index), 1 elsewhere                D3
    B^C[n,c] = 0 on the top ⌈ρ_c·C⌉ channels of A^C                                              D3
    R_s = G_s(S̃ ⊙ B^S),  R_c = G_c(S̃ ⊙ B^C)      G = conv3×3 → ReLU → conv3×3 (MGD), 2 generators D4
    (w_s, w_c) = softmax(θ), θ ∈ R² init 0       learnable, per tap                               D5
    R = w_s R_s + w_c R_c
    loss = α · Σ_{n,c,h,w} (R − T)² / N          MGD sum-MSE/N; key ``dmkd.<tap>``                D6

Assumptions (all [INF], our inference; the switch is named where there is one):

- D1 ``align = auto | always``: the adapter only when channels differ (as MGD). PyTorch default
  init. A student map of another H×W is resized to the teacher's after it (bilinear).
- D2 FGD attention with τ = 0.5 (FGD's value) — ``temperature``. The ranking uses the logits
  mean|T| directly (softmax is monotone; this avoids ties from underflow), so τ only matters for
  ``loss_weight=attention``.
- D3 hard ranked masks, zeroing the *most* attended positions/channels (disputed: the AMD abstract says
  "important regions", a DFMSD review says the "less important") — ``mask_select = top | bottom``;
  ``mask_mode = ranked | random`` (random: MGD's Bernoulli mask, zero where u > 1 − ρ, u ~ U[0,1) drawn on
  the CPU from :attr:`DMKD.generator`, None = global RNG; with ρ = 0 the loss is MGD without masking). ⌈ρ·n⌉
  is taken with a 1e-6 guard against round-off (0.65·20 = 13.000000000000002 → 13).
- D4 two separate MGD generators (conv3×3 → ReLU → conv3×3, C→C, default init); whether DMKD shares
  one generator is unknown.
  No switch.
- D5 fusion (the abstract's "self-adjustable weighting") — ``fusion = softmax | sigmoid | free``:
  softmax(θ), θ ∈ R² init 0 (w sums to 1);
  sigmoid gate w_s = σ(θ_0), w_c = 1 − w_s (θ_0 init 0); free: unconstrained scalars init (½, ½). A
  fourth reading (a 1×1 conv over the concatenation) is not offered. Per tap, not global.
- D6 plain sum-MSE/N (MGD), α = 2e-5, ρ_s = ρ_c = 0.65 (one-stage MGD values; two-stage: α = 5e-7,
  ρ = 0.45 via ``--set``) — ``loss_weight = none | attention`` (attention: FGD-style
  weight A^S·A^C per element; whether DMKD weights its loss is unknown).
- D7 taps: all FPN levels (``fpn``; MGD uses P3–P7 one-stage, P2–P5 two-stage: ``fpn:4``).
- D8 segmentation is a kdcli extension (the paper is detection only): MGD's segmentation tap and values
  (``c5``, α = 2e-5, ρ = 0.75; MGD's official configs) [ASSUMPTION].

Reusable pieces (``samkd`` is built on them): :func:`teacher_attention`,
:func:`ranked_keep_mask`, :class:`DualReconstruction`, :func:`reconstruction_loss`.

Randomness is injectable: ``mask_mode=random`` draws from :attr:`DMKD.generator`; any mask can be passed
to :meth:`DMKD.loss_tap`. :attr:`DMKD.last_stats` holds per tap the kept fractions of both masks and the
fusion weights. Everything runs in float32 with autocast disabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo
from . import register
from .base import Method
from .common import build_adapter, check_pair, float32_region, match_spatial, upcast

CHOICES: dict[str, tuple[Any, ...]] = {
    "align": ("auto", "always"),
    "mask_select": ("top", "bottom"),
    "mask_mode": ("ranked", "random"),
    "fusion": ("softmax", "sigmoid", "free"),
    "loss_weight": ("none", "attention"),
}

ROUND_GUARD = 1e-6  # ⌈ρ·n − 1e-6⌉: keeps 0.65·20 = 13.000000000000002 at 13


def check_choices(name: str, hp: dict[str, Any], choices: dict[str, tuple[Any, ...]]) -> None:
    for key, allowed in choices.items():
        if hp[key] not in allowed:
            raise ConfigError(
                f"--set {key}={hp[key]}: method '{name}' expects one of {', '.join(map(str, allowed))}"
            )
    for key in ("ratio_spatial", "ratio_channel"):
        if key in hp and not 0.0 <= float(hp[key]) <= 1.0:
            raise ConfigError(f"--set {key}={hp[key]}: method '{name}' needs a ratio in [0, 1]")


def num_masked(ratio: float, n: Tensor | int) -> Tensor:
    """⌈ρ·n⌉ (with a 1e-6 round-off guard, never below 0) as a long tensor."""
    n_t = torch.as_tensor(n, dtype=torch.float64)
    return torch.ceil(n_t * ratio - ROUND_GUARD).clamp_min(0).long()


def teacher_attention(ft: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """FGD attention of the teacher (N, C, H, W): spatial P·softmax_p(mean_c|T|/τ) (N, P), channel
    C·softmax_c(mean_p|T|/τ) (N, C)."""
    a = ft.abs()
    n, c, h, w = ft.shape
    a_s = (h * w) * torch.softmax(a.mean(1).flatten(1) / tau, dim=1)
    a_c = c * torch.softmax(a.mean((2, 3)) / tau, dim=1)
    return a_s, a_c


def ranked_keep_mask(score: Tensor, ratio: float, select: str = "top", group: Tensor | None = None) -> Tensor:
    """Keep-mask (B, L) in {0, 1}: 0 on the ⌈ρ·|g|⌉ highest (``top``) or lowest (``bottom``) scores of every
    group g along the last dim (``group``: (L,) long cell ids; None = one group), ties by index.

    Vectorised: a stable sort by score, then a stable sort by group id gives each group's positions in
    rank order; the rank inside the group is the sorted position minus the group's start.
    """
    b, length = score.shape
    key = score if select == "top" else -score
    order = torch.argsort(key, dim=-1, descending=True, stable=True)  # (B, L)
    if group is None:  # one group: the rank is the sorted position
        k = int(num_masked(ratio, length))
        keep_sorted = (torch.arange(length, device=score.device) >= k).to(score.dtype).expand(b, length)
        return torch.zeros_like(score).scatter(1, order, keep_sorted)
    group = group.to(score.device)
    order = order.gather(1, torch.argsort(group[order], dim=-1, stable=True))
    counts = torch.bincount(group, minlength=int(group.max().item()) + 1 if length else 1)
    starts = torch.cumsum(counts, 0) - counts
    cell = group[order]  # (B, L): group of each sorted slot
    rank = torch.arange(length, device=score.device).expand(b, length) - starts[cell]
    k = num_masked(ratio, counts).to(score.device)
    keep_sorted = (rank >= k[cell]).to(score.dtype)
    return torch.zeros_like(score).scatter(1, order, keep_sorted)


def random_keep_mask(shape: tuple[int, ...], ratio: float, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """MGD's Bernoulli keep-mask: 0 where u > 1 − ρ, u ~ U[0, 1) drawn on the CPU, then moved to ``like``."""
    u = torch.rand(shape, generator=generator)
    return (u <= 1.0 - ratio).to(device=like.device, dtype=like.dtype)


def mgd_generator(channels: int) -> nn.Sequential:
    """conv3×3 → ReLU → conv3×3 (C→C, padding 1, bias, PyTorch default init) — MGD's generator."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
    )


def reconstruction_loss(r: Tensor, ft: Tensor, weight: Tensor | None = None) -> Tensor:
    """Σ w·(R − T)² / N (MGD's sum-MSE divided by the batch); ``weight`` broadcasts to (N, C, H, W)."""
    sq = (r - ft).pow(2)
    if weight is not None:
        sq = sq * weight
    return sq.sum() / ft.shape[0]


def grid_reconstruction_losses(r: Tensor, ft: Tensor, weight: Tensor | None = None) -> Tensor:
    """:func:`reconstruction_loss` of every reconstruction in ``r`` (G, N, C, H, W) against ``ft`` → (G,), in ``ft``'s
    dtype whatever ``r``'s (SAMKD's generators may run in bf16; the error is taken in float32)."""
    return _GridSquaredError.apply(r, ft, weight) / ft.shape[0]


class _GridSquaredError(torch.autograd.Function):
    """Σ w·(R_g − T)² of every R_g in ``r`` (G, N, C, H, W) → (G,), computed in T's dtype.

    One node: R is cast to T's dtype and plain layout in one copy, and the backward is one product 2·g·w·(R − T)
    returned in R's dtype. (Autograd's chain of cast, subtraction, square, weighting and sum, with their backward
    passes over a channels-last R and a plain T, measured about 1.5× slower on CPU.)
    """

    @staticmethod
    def forward(ctx: Any, r: Tensor, ft: Tensor, weight: Tensor | None) -> Tensor:
        d = r.to(ft.dtype, memory_format=torch.contiguous_format, copy=True).sub_(ft)  # (G, N, C, H, W)
        wd = d if weight is None else d * weight
        ctx.save_for_backward(d, wd, weight)
        ctx.r_dtype = r.dtype
        return torch.linalg.vecdot(wd.flatten(1), d.flatten(1))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        d, wd, weight = ctx.saved_tensors
        g = grad.view(-1, *([1] * (d.dim() - 1)))
        grad_wd = wd * (2 * g)  # ∂/∂R of Σ w (R − T)²
        grad_r = grad_wd.to(ctx.r_dtype) if ctx.needs_input_grad[0] else None
        grad_ft = -grad_wd.sum(0) if ctx.needs_input_grad[1] else None
        grad_w = (d * d * g).sum(0) if weight is not None and ctx.needs_input_grad[2] else None
        return grad_r, grad_ft, grad_w


class _MaskedInputs(torch.autograd.Function):
    """S̃ ⊙ B^S_g and S̃ ⊙ B^C_g of every grid g, in the generators' dtype and memory layout.

    Backward: ∂S̃ = Σ_g (∂xs_g ⊙ B^S_g + ∂xc_g ⊙ B^C_g): both branches of every grid in one multiply-add pass, then
    the grids added one by one in S̃'s dtype. Autograd's own backward (per branch, a reduction over the grid axis of
    a channels-last gradient, then a cast) measured 3–4× slower on CPU. The masks are constants (no gradient).
    """

    @staticmethod
    def forward(ctx: Any, s_al: Tensor, keep_s: Tensor, keep_c: Tensor, dtype: torch.dtype,
                layout: torch.memory_format) -> tuple[Tensor, Tensor]:
        grids = max(keep_s.shape[0], keep_c.shape[0])  # one side may be given for a single grid: shared by all
        keep_s = keep_s.to(dtype).expand(grids, *keep_s.shape[1:])
        keep_c = keep_c.to(dtype).expand(grids, *keep_c.shape[1:])
        x = s_al.to(dtype, memory_format=layout)
        ctx.save_for_backward(keep_s, keep_c)
        ctx.dtype = s_al.dtype
        return x * keep_s, x * keep_c

    @staticmethod
    def backward(ctx: Any, grad_s: Tensor, grad_c: Tensor) -> tuple[Tensor | None, ...]:
        keep_s, keep_c = ctx.saved_tensors
        dtype = ctx.dtype
        per_grid = (grad_s * keep_s).addcmul_(grad_c, keep_c)  # (G, N, C, H, W) in the gradients' dtype
        grad = per_grid[0].to(dtype, copy=True)
        for g in range(1, per_grid.shape[0]):  # the grids (SAMKD: 3), not positions or channels
            grad.add_(per_grid[g])
        return grad, None, None, None, None


class DualReconstruction(nn.Module):
    """f_align, the spatial/channel generators G_s, G_c and the fusion logits θ of one tap.

    :meth:`reconstruct` runs several mask pairs (SAMKD's pyramid grids) through each generator in one call,
    stacked along the batch: the same maths as one call per pair, without the per-call overhead that
    dominates the small FPN levels. The generators run channels-last; their second convolutions and the
    fusion w_s·G_s + w_c·G_c are one convolution (kernels scaled by w and stacked along the input channels,
    exact since the convolution is linear); the masked inputs (:class:`_MaskedInputs`) and the squared
    error (:class:`_GridSquaredError`) are single autograd nodes with hand-written backward passes (both
    gradient-checked in the tests). A grouped convolution for the two first convolutions was measured
    slower on CPU at P3 sizes and is not used.
    """

    def __init__(self, student_channels: int, channels: int, align: str = "auto", fusion: str = "softmax") -> None:
        super().__init__()
        self.align: nn.Module = (
            build_adapter(student_channels, channels)
            if align == "always" or student_channels != channels
            else nn.Identity()
        )
        self.gen_spatial = mgd_generator(channels)
        self.gen_channel = mgd_generator(channels)
        self.fusion = fusion
        init = torch.full((2,), 0.5) if fusion == "free" else torch.zeros(2 if fusion == "softmax" else 1)
        self.theta = nn.Parameter(init)

    def weights(self) -> Tensor:
        """(w_s, w_c): softmax(θ) | (σ(θ), 1 − σ(θ)) | θ."""
        if self.fusion == "softmax":
            return torch.softmax(self.theta, 0)
        if self.fusion == "sigmoid":
            g = torch.sigmoid(self.theta)
            return torch.cat([g, 1 - g])
        return self.theta

    def forward(self, s_al: Tensor, keep_s: Tensor, keep_c: Tensor) -> Tensor:
        """R = w_s G_s(S̃ ⊙ B^S) + w_c G_c(S̃ ⊙ B^C); masks broadcast to S̃ (N, C, H, W)."""
        return self.reconstruct(s_al, keep_s.unsqueeze(0), keep_c.unsqueeze(0))[0]

    def reconstruct(self, s_al: Tensor, keep_s: Tensor, keep_c: Tensor, amp: torch.dtype | None = None) -> Tensor:
        """R_g for G mask pairs at once: ``keep_s``, ``keep_c`` (G, N, ·, ·, ·) broadcast to (G, N, C, H, W);
        returns (G, N, C, H, W), the same as G calls of :meth:`forward`.

        ``amp`` (bf16/fp16): the masked inputs and the generators' convolutions run in that dtype under
        autocast (the training's mixed precision) and R is returned in it (channels-last);
        :func:`grid_reconstruction_losses` takes the error in float32. None: all in ``s_al``'s dtype."""
        n, c, h, w = s_al.shape
        # channels-last convolutions (forward and backward) are faster on oneDNN and cuDNN; masks laid out
        # channels-last too (SAMKD's are) give channels-last products, so the reshape below is a view
        layout = torch.channels_last if h * w > 1 else torch.contiguous_format
        xs, xc = _MaskedInputs.apply(s_al, keep_s, keep_c, amp or s_al.dtype, layout)  # (G, N, C, H, W) each
        xs = xs.reshape(-1, c, h, w).contiguous(memory_format=layout)  # (G·N, C, H, W)
        xc = xc.reshape(-1, c, h, w).contiguous(memory_format=layout)
        ws = self.weights()
        (conv1_s, _, conv2_s), (conv1_c, _, conv2_c) = self.gen_spatial, self.gen_channel
        # w_s G_s(xs) + w_c G_c(xc) = one convolution of the two hidden maps stacked along the channels, with the
        # second convolutions' kernels scaled by w_s, w_c and stacked alike (conv2 is linear): one convolution
        # instead of two, and no element-wise fusion pass over (G·N, C, H, W) forward and backward
        weight = torch.cat([ws[0] * conv2_s.weight, ws[1] * conv2_c.weight], 1)
        bias = ws[0] * conv2_s.bias + ws[1] * conv2_c.bias
        with torch.autocast(s_al.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            hidden = torch.cat([conv1_s(xs), conv1_c(xc)], 1).relu_()
            r = F.conv2d(hidden, weight, bias, padding=conv2_s.padding)
        return r.view(-1, n, c, h, w)


@register
class DMKD(Method):
    """Dual (spatial + channel) attention-guided masked reconstruction, fused by learnable weights."""

    name = "dmkd"
    paper = (
        "Yang et al., DMKD: Dual Masked Knowledge Distillation (ICASSP 2024, arXiv 2309.02719) — "
        "reconstructed from the abstract (kdcli template), no official code"
    )
    evidence = "reconstruction (from the abstract)"
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "detection": {
            "taps": "fpn",  # [ASSUMPTION] MGD levels (P3–P7 one-stage; fpn:4 = P2–P5 two-stage)
            "alpha": 2e-5,  # [ASSUMPTION] MGD RetinaNet value (two-stage 5e-7)
            "ratio_spatial": 0.65,  # [ASSUMPTION] MGD λ (two-stage 0.45)
            "ratio_channel": 0.65,  # [ASSUMPTION] MGD λ
            "temperature": 0.5,  # [ASSUMPTION] FGD τ
            "mask_select": "top",  # [ASSUMPTION] AMD abstract "important regions"; conflicting sources
            "mask_mode": "ranked",  # [ASSUMPTION] template; random = MGD Bernoulli
            "fusion": "softmax",  # [ASSUMPTION] kdcli template (D5)
            "align": "auto",  # [ASSUMPTION] as MGD
            "loss_weight": "none",  # [ASSUMPTION] MGD sum-MSE/N
        },
        "segmentation": {
            "taps": "c5",  # [ASSUMPTION] kdcli extension; MGD segmentation tap
            "alpha": 2e-5,  # [ASSUMPTION] MGD segmentation
            "ratio_spatial": 0.75,  # [ASSUMPTION] MGD segmentation λ
            "ratio_channel": 0.75,  # [ASSUMPTION]
            "temperature": 0.5,  # [ASSUMPTION] FGD τ
            "mask_select": "top",  # [ASSUMPTION]
            "mask_mode": "ranked",  # [ASSUMPTION]
            "fusion": "softmax",  # [ASSUMPTION]
            "align": "auto",  # [ASSUMPTION]
            "loss_weight": "none",  # [ASSUMPTION]
        },
    }

    @dataclass
    class Config:
        """Options of ``dmkd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('fpn', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        alpha: float = opt(2e-05, 'loss weight α (on the sum, ÷ N)')
        ratio_spatial: float = opt(0.65, 'fraction of spatial positions masked')
        ratio_channel: float = opt(0.65, 'fraction of channels masked')
        temperature: float = opt(0.5, 'temperature of the teacher attention')
        mask_select: str = opt('top', 'which positions the attention masks keep: top or bottom')
        mask_mode: str = opt('ranked', 'how masks are drawn from the attention (ranked or sampled)')
        fusion: str = opt('softmax', 'how the two reconstructions are fused')
        align: str = opt('auto', 'when the student→teacher align conv is applied')
        loss_weight: str = opt('none', 'weighting of the reconstruction error: none or attention')

    def __init__(self, student: dict[str, TapInfo], teacher: dict[str, TapInfo], task: str, **hp: Any) -> None:
        super().__init__(student, teacher, task, **hp)
        check_choices(self.name, hp, CHOICES)
        self.alpha = float(hp["alpha"])
        self.ratio_spatial = float(hp["ratio_spatial"])
        self.ratio_channel = float(hp["ratio_channel"])
        self.temperature = float(hp["temperature"])
        self.mask_select = str(hp["mask_select"])
        self.mask_mode = str(hp["mask_mode"])
        self.loss_weight = str(hp["loss_weight"])
        self.blocks = nn.ModuleDict(
            {
                tap: DualReconstruction(student[tap].channels, teacher[tap].channels, str(hp["align"]),
                                        str(hp["fusion"]))
                for tap in self.taps
            }
        )
        # CPU generator of the random masks (mask_mode=random); None = the global CPU RNG
        self.generator: torch.Generator | None = None
        self._stats: dict[str, Tensor] = {}

    @property
    def last_stats(self) -> dict[str, float]:
        """Per tap: kept fractions of B^S and B^C and the fusion weights of the last forward."""
        if not self._stats:
            return {}
        values = torch.stack([v.float() for v in self._stats.values()]).tolist()
        return dict(zip(self._stats.keys(), values, strict=True))

    def masks(self, ft: Tensor) -> tuple[Tensor, Tensor]:
        """Keep-masks B^S (N, 1, H, W) and B^C (N, C, 1, 1) for the teacher map ``ft``."""
        n, c, h, w = ft.shape
        if self.mask_mode == "random":
            return (random_keep_mask((n, 1, h, w), self.ratio_spatial, self.generator, ft),
                    random_keep_mask((n, c, 1, 1), self.ratio_channel, self.generator, ft))
        with torch.no_grad():
            a = ft.abs()
            keep_s = ranked_keep_mask(a.mean(1).flatten(1), self.ratio_spatial, self.mask_select)
            keep_c = ranked_keep_mask(a.mean((2, 3)), self.ratio_channel, self.mask_select)
        return keep_s.view(n, 1, h, w), keep_c.view(n, c, 1, 1)

    def loss_tap(self, tap: str, fs: Tensor, ft: Tensor, masks: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """α Σ (R − T)² / N of one tap; ``masks`` = (B^S, B^C) overrides the attention/random masks."""
        check_pair(self.name, tap, fs, ft)
        block: DualReconstruction = self.blocks[tap]  # type: ignore[assignment]
        with float32_region(fs):
            fs, ft = upcast(fs), upcast(ft.detach())
            s_al = match_spatial(block.align(fs), ft)
            keep_s, keep_c = self.masks(ft) if masks is None else (upcast(masks[0]), upcast(masks[1]))
            r = block(s_al, keep_s, keep_c)
            weight = None
            if self.loss_weight == "attention":
                a_s, a_c = teacher_attention(ft, self.temperature)
                weight = a_s.view(ft.shape[0], 1, *ft.shape[2:]) * a_c.view(*ft.shape[:2], 1, 1)
            loss = self.alpha * reconstruction_loss(r, ft, weight)
            with torch.no_grad():
                w = block.weights()
                self._stats.update({
                    f"{tap}.spatial_keep": keep_s.float().mean(),
                    f"{tap}.channel_keep": keep_c.float().mean(),
                    f"{tap}.w_spatial": w[0],
                    f"{tap}.w_channel": w[1],
                })
        return loss

    def forward(self, s: ModelOutput, t: ModelOutput, targets: Any = None) -> dict[str, Tensor]:
        self._stats = {}
        return {f"{self.name}.{tap}": self.loss_tap(tap, s.taps[tap], t.taps[tap]) for tap in self.taps}

    def internals(self, s: ModelOutput, t: ModelOutput, targets: Any = None,
                  query: tuple[float, float] = (0.5, 0.5)) -> dict[str, Tensor]:
        """Per tap (kdcli viz, mask statistics): the keep-masks B^S (``spatial_mask``, (N, H, W), 1 = kept) and
        B^C (``channel_mask``, (N, C)) of D3, and the teacher spatial attention A^S of D2 (N, H, W)."""
        out: dict[str, Tensor] = {}
        for tap in self.taps:
            ft = upcast(t.taps[tap].detach().float())
            n, c, h, w = ft.shape
            keep_s, keep_c = self.masks(ft)
            out[f"{tap}.spatial_mask"] = keep_s.reshape(n, h, w)
            out[f"{tap}.channel_mask"] = keep_c.reshape(n, c)
            out[f"{tap}.teacher_attention"] = teacher_attention(ft, self.temperature)[0].reshape(n, h, w)
        return out


__all__ = [
    "DMKD",
    "DualReconstruction",
    "grid_reconstruction_losses",
    "random_keep_mask",
    "ranked_keep_mask",
    "reconstruction_loss",
    "teacher_attention",
]
