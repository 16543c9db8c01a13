r"""SAMKD — Spatial-aware Adaptive Masking KD (Zhang, Li, Li, Xu; arXiv 2501.07101 v2).

**Reconstructed from the abstract: there is no official code and the method text was not available.** Spec:
shared/methods/masked-methods.md §5 (the template implemented here, [INF] throughout; it builds on the DMKD
template of §4, see :mod:`kdcli.methods.dmkd`) and feature-methods.md §3. What the abstract and summaries
give ([ABS]/[SS]): SFD, coarse-to-fine spatial-pyramid masking of student features guided by dual (spatial
+ channel) teacher attention, the masked features reconstructing the teacher's; and SLD, logit
distillation guided by region-specific teacher–student feature differences. Every number and equation
below is the spec's template, not the paper's. Do not attribute SAMKD's reported numbers to this module.

Per tap (teacher T, N×C×H×W; student S; S̃ = f_align(S); Δ = T − S̃), for each grid g ∈ 𝒢:

    cells   g×g, position (h, w) in cell (⌊h·g/H⌋, ⌊w·g/W⌋)                                       S1
    B^S_g   per cell, 0 on the top ⌈ρ_s·|r|⌉ positions by mean_c |T| (the cell's local spatial
            attention; softmax inside the cell is monotone), 1 elsewhere                             S2
    B^C_g   per cell, 0 on the top ⌈ρ_c·C⌉ channels by mean_{p∈r} |T| (local channel attention);
            N×C×H×W, constant inside each cell                                                       S2
    L_g     = α Σ (w_s G_s(S̃ ⊙ B^S_g) + w_c G_c(S̃ ⊙ B^C_g) − T)² / N     (DMKD branches)          S3
    L_SFD   = Σ_g β_g L_g,  β_g = 1/|𝒢|                              → key ``samkd.<tap>``           S4

SLD, on the same tap's dense classification logits (detection: the level's slice of ``cls_logits``,
(H·W·A, K) ordered (h, w, anchor) as torchvision's heads; segmentation: ``seg_logits``):

    d[n,p]  = mean_c Δ²[n,·,p]  (no gradient); region score = mean of d over each cell of the finest grid
    u       = 1 on the top ⌈κ·R⌉ regions (``sld_region=top``) or the region score (``soft``), at every
              position of the region;  ω = u / Σ_p u  (uniform when Σ u = 0)                         S6
    kl[n,p] = Σ_{anchors, classes} binary KL(σ(z^T/t) ‖ σ(z^S/t))   (segmentation: softmax KL over classes)
    L_SLD   = γ · mean_n Σ_p ω kl                                    → key ``samkd.<tap>.sld``       S7

Assumptions (all [INF] in masked-methods §5.2 / feature-methods §3.2; the switch is named where the spec
offers one):

- S1 cells partition the map by ⌊h·g/H⌋, which equals adaptive pooling's floor/ceil boundaries when g
  divides H (§5.2 step 1); when it does not, adaptive-pooling cells overlap and a mask needs a partition.
  A grid larger than the map is clamped to the map (min(g, H) × min(g, W)). No switch.
- S2 hard ranked masks zeroing the most attended positions/channels of each cell — ``mask_select = top |
  bottom`` (§4.4 conflict); ``mask_mode = ranked | random`` (random: MGD Bernoulli from
  :attr:`SAMKD.generator`, per grid, channel masks drawn per cell); ⌈·⌉ with a 1e-6 round-off guard;
  ``grids`` (default 1, 2, 4; §5.2 step 1); ``ratio_spatial`` = ``ratio_channel`` = 0.65 (MGD/DMKD values).
- S3 one DMKD reconstruction module (f_align only if channels differ, two MGD generators, softmax(θ) fusion
  — ``fusion``, ``align`` as in dmkd) per tap, *shared by all grids* (§5.2 step 4: "for g = 1 this is
  exactly the DMKD template"). No switch. ``loss_weight = none | attention``: feature-methods §3.2 weights
  the sum-MSE by the global FGD attention A^S·A^C (τ = ``temperature``); masked §5.2 (default) does not.
- S4 β_g = 1/|𝒢| (masked §5.2) — ``grid_weight = mean | sum`` (feature §3.2: "sum over g").
- S5 "coarse-to-fine" — ``pyramid_mode = joint | progressive`` (§5.2 step 5): joint uses every grid every
  step; progressive uses only grid ⌊progress·|𝒢|⌋ (β = 1), where ``progress`` ∈ [0, 1] is set with
  :meth:`SAMKD.set_progress`. **kdcli's engine does not call it yet**, so progressive stays on the coarsest
  grid unless the caller updates it.
- S6 SLD regions are the finest grid's cells; ``sld_region = top | soft`` with κ = ``sld_keep`` = 0.5;
  per-image normalisation then batch mean. For segmentation the region weights, computed on the feature
  tap's grid, are resized (nearest) to the logits' size. The discrepancy uses S̃ of the same tap, detached.
- S7 binary KL per class (sigmoid heads), t = ``sld_tau`` = 1, no t² factor, summed over classes and
  anchors; γ = ``sld_weight`` = 1.0 has no source (§5.2: "start so that L_SLD ≈ L_SFD at iteration 0");
  ``sld_weight=0`` switches SLD off (and the logits are then not requested).
- S8 α = 2e-5 (MGD RetinaNet), τ = 0.5 (FGD), taps: all FPN levels, each a level of the dense head
  (RetinaNet/FCOS; for two-stage detectors use ``sld_weight=0`` and e.g. ``taps=fpn:4``).
- S9 segmentation is a kdcli extension (the paper is detection only): SFD on ``seg_feat`` (the head
  feature the classifier reads, so that the SLD regions line up with ``seg_logits``), softmax KL on
  ``seg_logits`` (student logits resized to the teacher's, bilinear), α = 2e-5, ρ = 0.75 (MGD segmentation).

Randomness is injectable: :attr:`SAMKD.generator` (CPU; None = global RNG) for ``mask_mode=random``; any
masks can be passed to :meth:`SAMKD.sfd_tap` (a list of (B^S_g, B^C_g) per grid) and region weights to
:meth:`SAMKD.sld_tap`. :attr:`SAMKD.last_stats` holds per tap and grid the kept fractions, the fusion
weights and the SLD selected fraction. Everything runs in float32 with autocast disabled.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, MethodError
from ..models.taps import ModelOutput, TapInfo, fpn_taps
from . import register
from .base import Method
from .common import check_pair, float32_region, match_spatial, upcast
from .dmkd import (
    DualReconstruction,
    check_choices,
    random_keep_mask,
    ranked_keep_mask,
    reconstruction_loss,
    teacher_attention,
)

CHOICES: dict[str, tuple[Any, ...]] = {
    "align": ("auto", "always"),
    "mask_select": ("top", "bottom"),
    "mask_mode": ("ranked", "random"),
    "fusion": ("softmax", "sigmoid", "free"),
    "loss_weight": ("none", "attention"),
    "grid_weight": ("mean", "sum"),
    "pyramid_mode": ("joint", "progressive"),
    "sld_region": ("top", "soft"),
}


def cell_index(h: int, w: int, g: int, device: torch.device | None = None) -> tuple[Tensor, int]:
    """Cell id (H·W,) of every position for a g×g grid clamped to the map, and the number of cells."""
    gh, gw = min(g, h), min(g, w)
    rows = torch.arange(h, device=device) * gh // h
    cols = torch.arange(w, device=device) * gw // w
    return (rows.view(h, 1) * gw + cols.view(1, w)).flatten(), gh * gw


def cell_mean(x: Tensor, cell: Tensor, num_cells: int) -> Tensor:
    """Mean of x (N, C, P) over the positions of each cell → (N, C, G)."""
    onehot = F.one_hot(cell, num_cells).to(x.dtype)  # (P, G)
    return (x @ onehot) / onehot.sum(0).clamp_min(1)


def binary_kl(zs: Tensor, zt: Tensor, tau: float) -> Tensor:
    """Element-wise KL(σ(z^T/t) ‖ σ(z^S/t)) of sigmoid logits, computed with logsigmoid."""
    zs, zt = zs / tau, zt / tau
    p = torch.sigmoid(zt)
    return p * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - p) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))


@register
class SAMKD(Method):
    """Hierarchical attention-guided masked reconstruction (SFD) + discrepancy-guided logit KD (SLD)."""

    name = "samkd"
    paper = (
        "Zhang, Li, Li & Xu, SAMKD: Spatial-aware Adaptive Masking KD (arXiv 2501.07101) — "
        "reconstructed from the abstract (spec template), no official code"
    )
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "detection": {
            "taps": "fpn",  # [ASSUMPTION] all FPN levels of the dense head (MGD levels)
            "grids": (1, 2, 4),  # masked §5.2 step 1 [ASSUMPTION]
            "alpha": 2e-5,  # [ASSUMPTION] MGD RetinaNet value
            "ratio_spatial": 0.65,  # [ASSUMPTION] MGD λ
            "ratio_channel": 0.65,  # [ASSUMPTION] MGD λ
            "temperature": 0.5,  # [ASSUMPTION] FGD τ (only for loss_weight=attention)
            "mask_select": "top",  # [ASSUMPTION] conflicting sources (masked §4.4)
            "mask_mode": "ranked",  # [ASSUMPTION] template
            "fusion": "softmax",  # [ASSUMPTION] DMKD template
            "align": "auto",  # [ASSUMPTION] as MGD
            "loss_weight": "none",  # [ASSUMPTION] masked §5.2 (feature §3.2: attention)
            "grid_weight": "mean",  # masked §5.2 β_g = 1/|G| [ASSUMPTION]
            "pyramid_mode": "joint",  # masked §5.2 step 5 default [ASSUMPTION]
            "sld_weight": 1.0,  # γ [ASSUMPTION] no source value
            "sld_keep": 0.5,  # κ masked §5.2 [ASSUMPTION]
            "sld_region": "top",  # [ASSUMPTION]
            "sld_tau": 1.0,  # t masked §5.2 [ASSUMPTION]
            "sld_logits": "cls_logits",  # dense classification logits [ASSUMPTION]
        },
        "segmentation": {
            "taps": "seg_feat",  # [ASSUMPTION] kdcli extension
            "grids": (1, 2, 4),  # [ASSUMPTION]
            "alpha": 2e-5,  # [ASSUMPTION] MGD segmentation
            "ratio_spatial": 0.75,  # [ASSUMPTION] MGD segmentation λ
            "ratio_channel": 0.75,  # [ASSUMPTION]
            "temperature": 0.5,  # [ASSUMPTION]
            "mask_select": "top",  # [ASSUMPTION]
            "mask_mode": "ranked",  # [ASSUMPTION]
            "fusion": "softmax",  # [ASSUMPTION]
            "align": "auto",  # [ASSUMPTION]
            "loss_weight": "none",  # [ASSUMPTION]
            "grid_weight": "mean",  # [ASSUMPTION]
            "pyramid_mode": "joint",  # [ASSUMPTION]
            "sld_weight": 1.0,  # [ASSUMPTION]
            "sld_keep": 0.5,  # [ASSUMPTION]
            "sld_region": "top",  # [ASSUMPTION]
            "sld_tau": 1.0,  # [ASSUMPTION]
            "sld_logits": "seg_logits",  # [ASSUMPTION]
        },
    }

    def __init__(self, student: dict[str, TapInfo], teacher: dict[str, TapInfo], task: str, **hp: Any) -> None:
        super().__init__(student, teacher, task, **hp)
        check_choices(self.name, hp, CHOICES)
        self.grids = tuple(int(g) for g in hp["grids"])
        if not self.grids or min(self.grids) < 1:
            raise ConfigError(f"--set grids={hp['grids']}: method 'samkd' needs grid sizes ≥ 1")
        self.alpha = float(hp["alpha"])
        self.ratio_spatial = float(hp["ratio_spatial"])
        self.ratio_channel = float(hp["ratio_channel"])
        self.temperature = float(hp["temperature"])
        self.mask_select = str(hp["mask_select"])
        self.mask_mode = str(hp["mask_mode"])
        self.loss_weight = str(hp["loss_weight"])
        self.grid_weight = str(hp["grid_weight"])
        self.pyramid_mode = str(hp["pyramid_mode"])
        self.sld_weight = float(hp["sld_weight"])
        self.sld_keep = float(hp["sld_keep"])
        self.sld_region = str(hp["sld_region"])
        self.sld_tau = float(hp["sld_tau"])
        self.sld_logits = str(hp["sld_logits"])
        if not 0.0 <= self.sld_keep <= 1.0:
            raise ConfigError(f"--set sld_keep={self.sld_keep}: method 'samkd' needs a fraction in [0, 1]")
        needs: tuple[str, ...] = self.taps
        self.head_levels: tuple[str, ...] = ()
        if self.sld_weight:
            for who, info in (("student", student), ("teacher", teacher)):
                if self.sld_logits not in info:
                    raise MethodError(
                        f"method 'samkd': SLD needs tap '{self.sld_logits}' but the {who} has only "
                        f"{', '.join(info)}; use --set sld_weight=0 to switch SLD off"
                    )
            if self.sld_logits == "cls_logits":
                self.head_levels = tuple(fpn_taps(student))
                bad = [tap for tap in self.taps if tap not in self.head_levels]
                if bad:
                    raise ConfigError(f"method 'samkd': SLD on cls_logits needs FPN taps, got {', '.join(bad)}")
            needs = tuple(dict.fromkeys((*needs, *self.head_levels, self.sld_logits)))
        self.needs = needs
        self.blocks = nn.ModuleDict(
            {
                tap: DualReconstruction(student[tap].channels, teacher[tap].channels, str(hp["align"]),
                                        str(hp["fusion"]))
                for tap in self.taps
            }
        )
        self.generator: torch.Generator | None = None  # CPU generator for mask_mode=random; None = global RNG
        self.progress = 0.0  # training fraction for pyramid_mode=progressive (see set_progress)
        self._stats: dict[str, Tensor] = {}

    # -- schedule and statistics ------------------------------------------------------------
    def set_progress(self, fraction: float) -> None:
        """Training fraction in [0, 1] (``pyramid_mode=progressive`` uses grid ⌊fraction·|𝒢|⌋)."""
        self.progress = min(max(float(fraction), 0.0), 1.0)

    def active_grids(self) -> tuple[tuple[int, float], ...]:
        """(g, β_g) of the grids used now."""
        if self.pyramid_mode == "progressive":
            i = min(int(self.progress * len(self.grids)), len(self.grids) - 1)
            return ((self.grids[i], 1.0),)
        beta = 1.0 / len(self.grids) if self.grid_weight == "mean" else 1.0
        return tuple((g, beta) for g in self.grids)

    @property
    def last_stats(self) -> dict[str, float]:
        """Per tap: kept mask fractions per grid, fusion weights, SLD selected fraction (last forward)."""
        if not self._stats:
            return {}
        values = torch.stack([v.float() for v in self._stats.values()]).tolist()
        return dict(zip(self._stats.keys(), values, strict=True))

    # -- SFD ----------------------------------------------------------------------------------
    def grid_masks(self, ft: Tensor, g: int) -> tuple[Tensor, Tensor]:
        """Keep-masks for grid g: B^S (N, 1, H, W), B^C (N, C, H, W) constant inside each cell."""
        n, c, h, w = ft.shape
        cell, cells = cell_index(h, w, g, ft.device)
        if self.mask_mode == "random":
            keep_s = random_keep_mask((n, 1, h, w), self.ratio_spatial, self.generator, ft)
            per_cell = random_keep_mask((n, c, cells), self.ratio_channel, self.generator, ft)
            return keep_s, per_cell[..., cell].view(n, c, h, w)
        with torch.no_grad():
            a = ft.abs().flatten(2)  # (N, C, P)
            keep_s = ranked_keep_mask(a.mean(1), self.ratio_spatial, self.mask_select, cell)
            local = cell_mean(a, cell, cells).transpose(1, 2).reshape(n * cells, c)  # (N·G, C)
            keep_c = ranked_keep_mask(local, self.ratio_channel, self.mask_select).view(n, cells, c)
            keep_c = keep_c.transpose(1, 2)[..., cell]  # (N, C, P)
        return keep_s.view(n, 1, h, w), keep_c.reshape(n, c, h, w)

    def aligned(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        return match_spatial(self.blocks[tap].align(fs), ft)

    def sfd_tap(
        self, tap: str, fs: Tensor, ft: Tensor, masks: list[tuple[Tensor, Tensor]] | None = None
    ) -> Tensor:
        """L_SFD of one tap; ``masks``: one (B^S_g, B^C_g) per active grid, overriding the computed masks."""
        check_pair(self.name, tap, fs, ft)
        block: DualReconstruction = self.blocks[tap]  # type: ignore[assignment]
        grids = self.active_grids()
        if masks is not None and len(masks) != len(grids):
            raise MethodError(f"method 'samkd': {len(masks)} mask pairs given for {len(grids)} active grids")
        with float32_region(fs):
            fs, ft = upcast(fs), upcast(ft.detach())
            s_al = self.aligned(tap, fs, ft)
            weight = None
            if self.loss_weight == "attention":
                a_s, a_c = teacher_attention(ft, self.temperature)
                weight = a_s.view(ft.shape[0], 1, *ft.shape[2:]) * a_c.view(*ft.shape[:2], 1, 1)
            total = s_al.sum() * 0.0
            for i, (g, beta) in enumerate(grids):
                keep_s, keep_c = self.grid_masks(ft, g) if masks is None else (upcast(masks[i][0]),
                                                                               upcast(masks[i][1]))
                total = total + beta * self.alpha * reconstruction_loss(block(s_al, keep_s, keep_c), ft, weight)
                self._stats[f"{tap}.g{g}.spatial_keep"] = keep_s.detach().float().mean()
                self._stats[f"{tap}.g{g}.channel_keep"] = keep_c.detach().float().mean()
            w = block.weights().detach()
            self._stats[f"{tap}.w_spatial"], self._stats[f"{tap}.w_channel"] = w[0], w[1]
        return total

    # -- SLD ----------------------------------------------------------------------------------
    def region_weights(self, s_al: Tensor, ft: Tensor) -> Tensor:
        """ω (N, 1, H, W): per-image location weights of SLD, summing to 1 (no gradient)."""
        with torch.no_grad():
            n, _, h, w = ft.shape
            d = (ft - s_al).pow(2).mean(1).flatten(1)  # (N, P)
            cell, cells = cell_index(h, w, max(self.grids), ft.device)
            score = cell_mean(d.unsqueeze(1), cell, cells).squeeze(1)  # (N, G)
            if self.sld_region == "top":
                # ranked_keep_mask zeros the top ⌈κ·R⌉ regions; SLD keeps exactly those
                region = 1.0 - ranked_keep_mask(score, self.sld_keep, "top")
            else:
                region = score
            u = region[:, cell]  # (N, P)
            mass = u.sum(1, keepdim=True)
            u = torch.where(mass > 0, u / mass.clamp_min(1e-30), torch.full_like(u, 1.0 / u.shape[1]))
        return u.view(n, 1, h, w)

    def level_logits(self, logits: Tensor, tap: str, s: ModelOutput) -> Tensor:
        """The slice of ``cls_logits`` (N, L, K) that belongs to FPN level ``tap``, as (N, H, W, A, K)."""
        sizes = [tuple(s.taps[lv].shape[-2:]) for lv in self.head_levels if lv in s.taps]
        names = [lv for lv in self.head_levels if lv in s.taps]
        total = sum(h * w for h, w in sizes)
        if total == 0 or logits.shape[1] % total:
            raise MethodError(
                f"method 'samkd': cls_logits has {logits.shape[1]} locations, not a multiple of the FPN "
                f"levels' {total} positions; use --set sld_weight=0"
            )
        a = logits.shape[1] // total
        i = names.index(tap)
        start = sum(h * w for h, w in sizes[:i]) * a
        h, w = sizes[i]
        return logits[:, start:start + h * w * a].reshape(logits.shape[0], h, w, a, logits.shape[2])

    def sld_tap(self, tap: str, zs: Tensor, zt: Tensor, weights: Tensor) -> Tensor:
        """γ · mean_n Σ_p ω · kl. Detection: zs, zt (N, H, W, A, K) sigmoid logits; segmentation: (N, K, h, w).
        ``weights`` ω (N, 1, H, W) (any H×W for segmentation: resized, nearest, and renormalised)."""
        with float32_region(zs):
            zs, zt, weights = upcast(zs), upcast(zt.detach()), upcast(weights.detach())
            if zs.dim() == 5:
                kl = binary_kl(zs, zt, self.sld_tau).sum((3, 4))  # (N, H, W)
            else:
                zs = match_spatial(zs, zt)
                kl = (F.softmax(zt / self.sld_tau, 1) * (F.log_softmax(zt / self.sld_tau, 1)
                                                          - F.log_softmax(zs / self.sld_tau, 1))).sum(1)
                if weights.shape[-2:] != kl.shape[-2:]:
                    weights = F.interpolate(weights, size=kl.shape[-2:], mode="nearest")
                    weights = weights / weights.sum((2, 3), keepdim=True).clamp_min(1e-30)
            return self.sld_weight * (weights[:, 0] * kl).sum((1, 2)).mean()

    # -- forward ------------------------------------------------------------------------------
    def forward(self, s: ModelOutput, t: ModelOutput, targets: Any = None) -> dict[str, Tensor]:
        self._stats = {}
        out: dict[str, Tensor] = {}
        for tap in self.taps:
            fs, ft = s.taps[tap], t.taps[tap]
            out[f"{self.name}.{tap}"] = self.sfd_tap(tap, fs, ft)
            if not self.sld_weight:
                continue
            zs, zt = s.taps[self.sld_logits], t.taps[self.sld_logits]
            if self.sld_logits == "cls_logits":
                if zs.shape != zt.shape:
                    raise MethodError(
                        f"method 'samkd': SLD needs student and teacher cls_logits of one shape (same anchors "
                        f"and classes); got {tuple(zs.shape)} and {tuple(zt.shape)}"
                    )
                zs, zt = self.level_logits(zs, tap, s), self.level_logits(zt, tap, s)
            with float32_region(fs):
                f32s, f32t = upcast(fs), upcast(ft.detach())
                weights = self.region_weights(self.aligned(tap, f32s, f32t), f32t)
            out[f"{self.name}.{tap}.sld"] = self.sld_tap(tap, zs, zt, weights)
            self._stats[f"{tap}.sld_selected"] = (weights > 0).float().mean()
        return out


__all__ = ["SAMKD", "binary_kl", "cell_index", "cell_mean"]
