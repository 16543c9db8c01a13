r"""SAMKD — Spatial-aware Adaptive Masking KD (Zhang, Li, Li, Xu; arXiv 2501.07101 v2).

**Reconstructed from the abstract: there is no official code and the method text was not available.** Method
page: docs/methods/samkd.md (kdcli's template, [INF] throughout; it builds on the DMKD template, see
:mod:`kdcli.methods.dmkd`). What the abstract ([ABS]) and secondary summaries give: SFD, coarse-to-fine
spatial-pyramid masking of student features guided by dual (spatial + channel) teacher attention, the masked
features reconstructing the teacher's; and SLD, logit distillation guided by region-specific teacher–student
feature differences. Every number and equation below is kdcli's template, not the paper's. Do not attribute
SAMKD's reported numbers to this module.

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

Assumptions (all [INF], our inference; the switch is named where there is one):

- S1 cells partition the map by ⌊h·g/H⌋, which equals adaptive pooling's floor/ceil boundaries when g
  divides H; when it does not, adaptive-pooling cells overlap and a mask needs a partition.
  A grid larger than the map is clamped to the map (min(g, H) × min(g, W)). No switch.
- S2 hard ranked masks zeroing the most attended positions/channels of each cell — ``mask_select = top |
  bottom`` (the sources conflict, see dmkd D3); ``mask_mode = ranked | random`` (random: MGD Bernoulli from
  :attr:`SAMKD.generator`, per grid, channel masks drawn per cell); ⌈·⌉ with a 1e-6 round-off guard;
  ``grids`` (default 1, 2, 4); ``ratio_spatial`` = ``ratio_channel`` = 0.65 (MGD/DMKD values).
- S3 one DMKD reconstruction module (f_align only if channels differ, two MGD generators, softmax(θ) fusion
  — ``fusion``, ``align`` as in dmkd) per tap, *shared by all grids* (for g = 1 this is exactly the DMKD
  template). No switch. ``loss_weight = none | attention``: ``attention`` weights the sum-MSE by the global
  FGD attention A^S·A^C (τ = ``temperature``); ``none`` (default) does not.
- S4 β_g = 1/|𝒢| — ``grid_weight = mean | sum`` (sum: β_g = 1).
- S5 "coarse-to-fine" — ``pyramid_mode = joint | progressive``: joint uses every grid every
  step; progressive ("g switches 1 → 2 → 4 at fixed epoch fractions") uses only grid
  i = min(⌊progress·|𝒢| + 10⁻⁹⌋, |𝒢| − 1) with β = 1, i.e. equal fractions of the run per grid (no
  source gives the fractions). ``progress`` ∈ [0, 1) is the engine's training fraction (:meth:`Method.set_progress`,
  called before every step: (epoch + it / iters_per_epoch) / epochs), so with a number of epochs divisible by
  |𝒢| the switches fall on epoch boundaries (24 epochs: grid 1 for epochs 0–7, 2 for 8–15, 4 for 16–23), and
  short runs switch mid-epoch rather than never reaching the finest grid. The 10⁻⁹ guards k/|𝒢| against
  round-off. No switch for the fractions.
- S6 SLD regions are the finest grid's cells; ``sld_region = top | soft`` with κ = ``sld_keep`` = 0.5;
  per-image normalisation then batch mean. For segmentation the region weights, computed on the feature
  tap's grid, are resized (nearest) to the logits' size. The discrepancy uses S̃ of the same tap, detached.
- S7 binary KL per class (sigmoid heads), t = ``sld_tau`` = 1, no t² factor, summed over classes and
  anchors; γ = ``sld_weight`` = 1.0 has no source (a starting point: tune so that L_SLD ≈ L_SFD at iteration 0);
  ``sld_weight=0`` switches SLD off (and the logits are then not requested).
- S8 α = 2e-5 (MGD RetinaNet), τ = 0.5 (FGD), taps: all FPN levels, each a level of the dense head
  (RetinaNet/FCOS; for two-stage detectors use ``sld_weight=0`` and e.g. ``taps=fpn:4``).
- S9 segmentation is a kdcli extension (the paper is detection only): SFD on ``seg_feat`` (the head
  feature the classifier reads, so that the SLD regions line up with ``seg_logits``), softmax KL on
  ``seg_logits`` (student logits resized to the teacher's, bilinear), α = 2e-5, ρ = 0.75 (MGD segmentation).

Randomness is injectable: :attr:`SAMKD.generator` (CPU; None = global RNG) for ``mask_mode=random``; any
masks can be passed to :meth:`SAMKD.sfd_tap` (a list of (B^S_g, B^C_g) per grid) and region weights to
:meth:`SAMKD.sld_tap`. :attr:`SAMKD.last_stats` holds per tap and grid the kept fractions, the fusion
weights and the SLD selected fraction. Everything runs in float32 with autocast disabled, except (S10) the
generators' convolutions.

- S10 (kdcli, not a modelling assumption) ``generator_precision = amp | float32``: with ``amp`` (default) the
  masked inputs and the two generators run in the training's autocast dtype (bf16/fp16), as every other
  convolution of the student does, and the reconstruction error, its reduction, the masks and SLD stay in
  float32; without autocast both settings are the same float32 computation. The three grids triple DMKD's
  generator work: with float32 generators a bf16 step took 1.31× the floor, with bf16 ones 1.19–1.23×
  (docs/results/step_time.md; 1.13–1.16× after the computation changes below). ``float32`` restores the
  all-float32 loss.

Computation (same maths, fewer operations; checked against a per-image, per-cell, per-grid reference in
the tests, loss and gradients): the masks of every grid *and every FPN level* come from one spatial and one
channel ranking (:class:`_grid.Pyramid` numbers the cells of all grids consecutively, :meth:`level_masks` offsets
them per level; a cell never spans two levels); the G masked inputs of a tap go through the generators in
one call (stacked along the batch, channels-last, :meth:`DualReconstruction.reconstruct`, whose second
convolutions and fusion are one convolution); S̃ is computed once per tap for SFD and SLD; SLD's region
weights are ranked for all levels at once; on ``cls_logits`` (:meth:`sld_levels`) its binary KL is summed per
level chunk by chunk with its gradient recomputed in the backward pass
(:func:`kdcli.methods._logits.bernoulli_kl_total`), so that ≈ 200 k anchors × 91 classes per 800×1333 image
do not keep an element-wise graph. :func:`binary_kl` is the element-wise form, written independently (two
log-sigmoids): :meth:`sld_tap` on one level's :meth:`level_logits` slice uses it, and the tests use that as
the reference for :meth:`sld_levels` (segmentation's SLD is a softmax KL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, MethodError
from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo, fpn_taps
from . import register
from ._grid import Pyramid, cell_index
from ._logits import bernoulli_kl_total
from .base import Method
from .common import autocast_dtype, check_pair, float32_region, match_spatial, upcast
from .dmkd import (
    DualReconstruction,
    check_choices,
    grid_reconstruction_losses,
    random_keep_mask,
    ranked_keep_mask,
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
    "generator_precision": ("amp", "float32"),
}


PYRAMID_CACHE = 64  # cached Pyramids (map size × grids); the oldest is dropped beyond this


def binary_kl(zs: Tensor, zt: Tensor, tau: float) -> Tensor:
    """Element-wise KL(σ(z^T/t) ‖ σ(z^S/t)) of sigmoid logits.

    With p = σ(a), a = z^T/t, b = z^S/t: p (log σ(a) − log σ(b)) + (1 − p)(log σ(−a) − log σ(−b)), written with
    log σ(−x) = log σ(x) − x as  log σ(a) − log σ(b) − (1 − p)(a − b)  (two log-sigmoids instead of four).
    """
    a, b = zt / tau, zs / tau
    return F.logsigmoid(a) - F.logsigmoid(b) - (1 - torch.sigmoid(a)) * (a - b)


@register
class SAMKD(Method):
    """Hierarchical attention-guided masked reconstruction (SFD) + discrepancy-guided logit KD (SLD)."""

    name = "samkd"
    paper = (
        "Zhang, Li, Li & Xu, SAMKD: Spatial-aware Adaptive Masking KD (arXiv 2501.07101) — "
        "reconstructed from the abstract (kdcli template), no official code"
    )
    evidence = "reconstruction (from the abstract)"
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "detection": {
            "taps": "fpn",  # [ASSUMPTION] all FPN levels of the dense head (MGD levels)
            "grids": (1, 2, 4),  # [ASSUMPTION] S1
            "alpha": 2e-5,  # [ASSUMPTION] MGD RetinaNet value
            "ratio_spatial": 0.65,  # [ASSUMPTION] MGD λ
            "ratio_channel": 0.65,  # [ASSUMPTION] MGD λ
            "temperature": 0.5,  # [ASSUMPTION] FGD τ (only for loss_weight=attention)
            "mask_select": "top",  # [ASSUMPTION] conflicting sources (dmkd D3)
            "mask_mode": "ranked",  # [ASSUMPTION] template
            "fusion": "softmax",  # [ASSUMPTION] DMKD template
            "align": "auto",  # [ASSUMPTION] as MGD
            "loss_weight": "none",  # [ASSUMPTION] S3 (alternative: attention)
            "grid_weight": "mean",  # β_g = 1/|G| [ASSUMPTION] S4
            "pyramid_mode": "joint",  # [ASSUMPTION] S5
            "sld_weight": 1.0,  # γ [ASSUMPTION] no source value
            "sld_keep": 0.5,  # κ [ASSUMPTION] S6
            "sld_region": "top",  # [ASSUMPTION]
            "sld_tau": 1.0,  # t [ASSUMPTION] S7
            "sld_logits": "cls_logits",  # dense classification logits [ASSUMPTION]
            "generator_precision": "amp",  # kdcli: generators in the training's autocast dtype (speed)
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
            "generator_precision": "amp",  # kdcli (speed)
        },
    }

    @dataclass
    class Config:
        """Options of ``samkd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('fpn', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        grids: tuple[int, ...] = opt((1, 2, 4), 'grid sizes of the pyramid')
        alpha: float = opt(2e-05, 'loss weight α of SFD (on the sum, ÷ N)')
        ratio_spatial: float = opt(0.65, 'fraction of spatial positions masked')
        ratio_channel: float = opt(0.65, 'fraction of channels masked')
        temperature: float = opt(0.5, 'temperature of the teacher attention')
        mask_select: str = opt('top', 'which positions the attention masks keep: top or bottom')
        mask_mode: str = opt('ranked', 'how masks are drawn from the attention (ranked or sampled)')
        fusion: str = opt('softmax', 'how the two reconstructions are fused')
        align: str = opt('auto', 'when the student→teacher align conv is applied')
        loss_weight: str = opt('none', 'weighting of the reconstruction error: none or attention')
        grid_weight: str = opt('mean', 'how grids are combined')
        pyramid_mode: str = opt('joint', 'how the pyramid grids are scheduled')
        sld_weight: float = opt(1.0, 'weight of the logit term SLD (0: off)')
        sld_keep: float = opt(0.5, 'fraction of regions SLD keeps')
        sld_region: str = opt('top', 'which regions SLD keeps')
        sld_tau: float = opt(1.0, 'temperature of SLD')
        sld_logits: str = opt('cls_logits', 'logit tap of SLD')
        generator_precision: str = opt('amp', 'dtype of the generators: amp or float32')

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
        self.generator_precision = str(hp["generator_precision"])
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
        self._pyramids: dict[tuple[Any, ...], Pyramid] = {}
        self._stats: dict[str, Tensor] = {}

    # -- schedule and statistics ------------------------------------------------------------
    def active_grids(self) -> tuple[tuple[int, float], ...]:
        """(g, β_g) of the grids used now.

        ``pyramid_mode=progressive``: only grid i = min(⌊progress·|𝒢| + 10⁻⁹⌋, |𝒢| − 1), β = 1 — with 𝒢 = (1, 2, 4) the
        coarsest grid for the first third of training, then 2×2, then 4×4 for the last third. ``progress`` ∈
        [0, 1) is set by the engine before every step (:meth:`Method.set_progress`: epochs done plus the
        fraction of the current epoch, over the run's epochs).
        """
        if self.pyramid_mode == "progressive":
            i = min(max(int(self.progress * len(self.grids) + 1e-9), 0), len(self.grids) - 1)
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

    def pyramid(self, h: int, w: int, grids: tuple[int, ...], device: torch.device) -> Pyramid:
        key = (h, w, grids, str(device))
        if key not in self._pyramids:
            if len(self._pyramids) >= PYRAMID_CACHE:  # detection batches come in many padded sizes
                self._pyramids.pop(next(iter(self._pyramids)))
            self._pyramids[key] = Pyramid(h, w, grids, device)
        return self._pyramids[key]

    # -- SFD ----------------------------------------------------------------------------------
    def grid_masks(self, ft: Tensor, g: int) -> tuple[Tensor, Tensor]:
        """Keep-masks for grid g: B^S (N, 1, H, W), B^C (N, C, H, W) constant inside each cell."""
        keep_s, keep_c = self.pyramid_masks(ft, (g,))
        return keep_s[0], keep_c[0]

    def pyramid_masks(self, ft: Tensor, grids: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Keep-masks of every grid in ``grids``: B^S (G, N, 1, H, W) and B^C (G, N, C, H, W).

        Ranked: :meth:`level_masks` of this one map (every grid ranked in one call). Random: MGD Bernoulli
        masks from :attr:`generator`, channel masks drawn per cell.
        """
        n, c, h, w = ft.shape
        if self.mask_mode == "random":
            pyr = self.pyramid(h, w, tuple(grids), ft.device)
            # per grid, in the order B^S then B^C, so that a seeded generator gives reproducible masks
            pairs = []
            for g, cells in zip(grids, pyr.counts, strict=True):
                cell, _ = cell_index(h, w, g, ft.device)
                keep_s = random_keep_mask((n, 1, h, w), self.ratio_spatial, self.generator, ft)
                per_cell = random_keep_mask((n, c, cells), self.ratio_channel, self.generator, ft)
                pairs.append((keep_s, per_cell[..., cell].view(n, c, h, w)))
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        return self.level_masks([ft], tuple(grids))[0]

    def level_masks(self, fts: list[Tensor], grids: tuple[int, ...],
                    dtype: torch.dtype | None = None) -> list[tuple[Tensor, Tensor]]:
        """Ranked :meth:`pyramid_masks` of several maps of one batch (the FPN levels), all ranked together.

        One ranking of the positions of every cell of every grid of every map, one of the channels of every
        such cell (each cell's local channel attention is a row), then per map one gather that spreads each
        cell's channel mask over its positions. A cell never spans two maps or two grids and the sorts are
        stable, so the masks are those of ranking each map and grid separately (ties by index in both).
        The maps share N and C (FPN levels do; :meth:`tap_masks` groups taps by C). ``dtype``: the masks' dtype
        (default the maps'; 0 and 1 are exact in any), e.g. the generators' autocast dtype, which saves a cast.
        """
        big = len(grids)
        n, c = fts[0].shape[:2]
        with torch.no_grad():
            pyrs = [self.pyramid(ft.shape[2], ft.shape[3], grids, ft.device) for ft in fts]
            absf = [ft.abs().flatten(2) for ft in fts]  # (N, C, P) per map
            score = torch.cat([a.mean(1).repeat(1, big) for a in absf], 1)  # (N, Σ G·P): the spatial score per grid
            offsets, groups, total = [], [], 0
            for pyr in pyrs:
                offsets.append(total)
                groups.append(pyr.group + total)
                total += pyr.total
            keep_s_all = ranked_keep_mask(score, self.ratio_spatial, self.mask_select, torch.cat(groups))
            keep_s_all = keep_s_all.to(dtype or keep_s_all.dtype)
            local = torch.cat([pyr.cell_means(a) for pyr, a in zip(pyrs, absf, strict=True)], 2)  # (N, C, Σ cells)
            keep_rows = ranked_keep_mask(local.transpose(1, 2).reshape(-1, c), self.ratio_channel, self.mask_select)
            keep_rows = keep_rows.view(n, total, c).to(dtype or keep_rows.dtype)
            out, start = [], 0
            for ft, pyr, off in zip(fts, pyrs, offsets, strict=True):
                h, w = ft.shape[2:]
                keep_s = keep_s_all[:, start:start + big * h * w].reshape(n, big, h, w).transpose(0, 1).unsqueeze(2)
                start += big * h * w
                keep_c = keep_rows[:, off:off + pyr.total][:, pyr.group]  # (N, G·P, C)
                # (G, N, C, H, W) laid out channels-last (G, N, H, W, C) in one copy: the masked inputs then come
                # out channels-last for the generators (DualReconstruction.reconstruct) without another copy
                keep_c = keep_c.view(n, big, h, w, c).transpose(0, 1).contiguous().permute(0, 1, 4, 2, 3)
                out.append((keep_s, keep_c))
        return out

    def tap_masks(self, fts: dict[str, Tensor], dtype: torch.dtype | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """(B^S, B^C) of the active grids for every tap: ranked masks of taps with one channel count in one
        :meth:`level_masks` call; random masks tap by tap (the generator's draw order of :meth:`pyramid_masks`)."""
        grids = tuple(g for g, _ in self.active_grids())
        if self.mask_mode == "random":
            return {tap: self.pyramid_masks(ft, grids) for tap, ft in fts.items()}
        by_shape: dict[tuple[Any, ...], list[str]] = {}
        for tap, ft in fts.items():
            by_shape.setdefault((ft.shape[:2], ft.dtype, ft.device), []).append(tap)
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for taps in by_shape.values():
            out.update(zip(taps, self.level_masks([fts[t] for t in taps], grids, dtype), strict=True))
        return out

    def aligned(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        return match_spatial(self.blocks[tap].align(fs), ft)

    def sfd_tap(
        self, tap: str, fs: Tensor, ft: Tensor, masks: list[tuple[Tensor, Tensor]] | None = None
    ) -> Tensor:
        """L_SFD of one tap; ``masks``: one (B^S_g, B^C_g) per active grid, overriding the computed masks."""
        check_pair(self.name, tap, fs, ft)
        amp = autocast_dtype(fs)
        with float32_region(fs):
            fs, ft = upcast(fs), upcast(ft.detach())
            return self._sfd(tap, self.aligned(tap, fs, ft), ft, masks, amp)

    def _sfd(self, tap: str, s_al: Tensor, ft: Tensor, masks: list[tuple[Tensor, Tensor]] | None,
             amp: torch.dtype | None = None, stacked: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Σ_g β_g α Σ (R_g − T)² / N on float32 (or float64) S̃ and T, every active grid in one reconstruction.
        ``masks``: one (B^S_g, B^C_g) per grid given by the caller; ``stacked``: (B^S, B^C) of :meth:`tap_masks`."""
        block: DualReconstruction = self.blocks[tap]  # type: ignore[assignment]
        grids = self.active_grids()
        if masks is not None and len(masks) != len(grids):
            raise MethodError(f"method 'samkd': {len(masks)} mask pairs given for {len(grids)} active grids")
        if stacked is not None:
            keep_s, keep_c = stacked
        elif masks is None:
            keep_s, keep_c = self.pyramid_masks(ft, tuple(g for g, _ in grids))
        else:
            keep_s = torch.stack(torch.broadcast_tensors(*(upcast(m[0]) for m in masks)))
            keep_c = torch.stack(torch.broadcast_tensors(*(upcast(m[1]) for m in masks)))
        weight = None
        if self.loss_weight == "attention":
            a_s, a_c = teacher_attention(ft, self.temperature)
            weight = a_s.view(ft.shape[0], 1, *ft.shape[2:]) * a_c.view(*ft.shape[:2], 1, 1)
        # generator_precision=amp (S10): the generators in the autocast dtype the forward was called under
        amp = amp if self.generator_precision == "amp" and s_al.dtype == torch.float32 else None
        per_grid = grid_reconstruction_losses(block.reconstruct(s_al, keep_s, keep_c, amp), ft, weight)  # (G,)
        beta = torch.tensor([b for _, b in grids], dtype=per_grid.dtype, device=per_grid.device)
        with torch.no_grad():
            kept_s = keep_s.mean((1, 2, 3, 4), dtype=torch.float32)
            kept_c = keep_c.mean((1, 2, 3, 4), dtype=torch.float32)
            for i, (g, _) in enumerate(grids):
                self._stats[f"{tap}.g{g}.spatial_keep"] = kept_s[i]
                self._stats[f"{tap}.g{g}.channel_keep"] = kept_c[i]
            w = block.weights().detach()
            self._stats[f"{tap}.w_spatial"], self._stats[f"{tap}.w_channel"] = w[0], w[1]
        return self.alpha * (beta * per_grid).sum()

    # -- SLD ----------------------------------------------------------------------------------
    def region_weights(self, s_al: Tensor, ft: Tensor) -> Tensor:
        """ω (N, 1, H, W): per-image location weights of SLD, summing to 1 (no gradient)."""
        return self.level_region_weights([(s_al, ft)])[0]

    def level_region_weights(self, pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """:meth:`region_weights` of several (S̃, T) maps with one ranking: each map's regions form a group,
        so each keeps its own top ⌈κ·R⌉ (the same weights as one call per map)."""
        with torch.no_grad():
            pyrs, scores = [], []
            for s_al, ft in pairs:
                pyr = self.pyramid(ft.shape[2], ft.shape[3], (max(self.grids),), ft.device)
                d = (ft - s_al).pow(2).mean(1).flatten(1)  # (N, P)
                scores.append(pyr.cell_means(d.unsqueeze(1)).squeeze(1))  # (N, R)
                pyrs.append(pyr)
            if self.sld_region == "top":
                score = torch.cat(scores, 1)
                level = torch.cat([torch.full((pyr.total,), i, device=score.device) for i, pyr in enumerate(pyrs)])
                # ranked_keep_mask zeros the top ⌈κ·R⌉ regions of each map; SLD keeps exactly those
                regions = (1.0 - ranked_keep_mask(score, self.sld_keep, "top", level)).split(
                    [pyr.total for pyr in pyrs], 1)
            else:
                regions = scores
            out = []
            for region, pyr, (_, ft) in zip(regions, pyrs, pairs, strict=True):
                u = region[:, pyr.group]  # (N, P)
                mass = u.sum(1, keepdim=True)
                u = torch.where(mass > 0, u / mass.clamp_min(1e-30), torch.full_like(u, 1.0 / u.shape[1]))
                out.append(u.view(ft.shape[0], 1, *ft.shape[2:]))
        return out

    def head_layout(self, logits: Tensor, s: ModelOutput) -> tuple[list[str], list[tuple[int, int]], int]:
        """The FPN levels of ``cls_logits`` (N, L, K) in head order, their H×W, and the anchors per position."""
        names = [lv for lv in self.head_levels if lv in s.taps]
        sizes = [(int(s.taps[lv].shape[-2]), int(s.taps[lv].shape[-1])) for lv in names]
        total = sum(h * w for h, w in sizes)
        if total == 0 or logits.shape[1] % total:
            raise MethodError(
                f"method 'samkd': cls_logits has {logits.shape[1]} locations, not a multiple of the FPN "
                f"levels' {total} positions; use --set sld_weight=0"
            )
        return names, sizes, logits.shape[1] // total

    def level_logits(self, logits: Tensor, tap: str, s: ModelOutput) -> Tensor:
        """The slice of ``cls_logits`` (N, L, K) that belongs to FPN level ``tap``, as (N, H, W, A, K)."""
        names, sizes, a = self.head_layout(logits, s)
        i = names.index(tap)
        start = sum(h * w for h, w in sizes[:i]) * a
        h, w = sizes[i]
        return logits[:, start:start + h * w * a].reshape(logits.shape[0], h, w, a, logits.shape[2])

    def sld_levels(self, zs: Tensor, zt: Tensor, weights: dict[str, Tensor], s: ModelOutput) -> dict[str, Tensor]:
        """:meth:`sld_tap` of every level in ``weights`` from the whole ``cls_logits`` (N, L, K) at once: one binary
        KL, summed over classes and anchors, then each level's ω-weighted sum (the same as one call per
        :meth:`level_logits` slice)."""
        names, sizes, a = self.head_layout(zs, s)
        n, starts = zs.shape[0], [0]
        for h, w in sizes:  # rows of the (N, L, K) logits: level by level, A anchors per position
            starts.append(starts[-1] + h * w * a)
        out: dict[str, Tensor] = {}
        with float32_region(zs):
            for lv, lo, hi in zip(names, starts[:-1], starts[1:], strict=True):
                if lv in weights:
                    # ω of a position on each of its A anchor rows; the sum over rows, ÷ N (mean over n), chunked
                    # without the element-wise graph (kdcli.methods._logits.bernoulli_kl_total)
                    omega = upcast(weights[lv].detach()).flatten(1).repeat_interleave(a, dim=1)
                    total = bernoulli_kl_total(zs[:, lo:hi], zt[:, lo:hi], self.sld_tau, "sum", "sum", omega)
                    out[lv] = self.sld_weight * total / n
        return out

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
        """L_SFD and L_SLD of every tap. The taps are processed together where the maths allows it (one mask
        ranking for all levels, one binary KL over the whole ``cls_logits``): the same losses as tap by tap."""
        self._stats = {}
        for tap in self.taps:
            check_pair(self.name, tap, s.taps[tap], t.taps[tap])
        first = s.taps[self.taps[0]]
        amp = autocast_dtype(first)
        sfd: dict[str, Tensor] = {}
        sld: dict[str, Tensor] = {}
        with float32_region(first):
            pairs = {}
            for tap in self.taps:
                fs32, ft32 = upcast(s.taps[tap]), upcast(t.taps[tap].detach())
                pairs[tap] = (self.aligned(tap, fs32, ft32), ft32)  # S̃ once per tap: SFD and SLD share it
            # ranked masks made directly in the generators' dtype (S10), so reconstruct need not cast them
            mask_dtype = amp if self.generator_precision == "amp" else None
            masks = self.tap_masks({tap: ft for tap, (_, ft) in pairs.items()}, mask_dtype)
            for tap, (s_al, ft32) in pairs.items():
                sfd[tap] = self._sfd(tap, s_al, ft32, None, amp, masks[tap])
            if self.sld_weight:
                weights = dict(zip(self.taps, self.level_region_weights(
                    [(s_al.detach(), ft) for s_al, ft in pairs.values()]), strict=True))
        if self.sld_weight:
            zs, zt = s.taps[self.sld_logits], t.taps[self.sld_logits]
            if self.sld_logits == "cls_logits":
                if zs.shape != zt.shape:
                    raise MethodError(
                        f"method 'samkd': SLD needs student and teacher cls_logits of one shape (same anchors "
                        f"and classes); got {tuple(zs.shape)} and {tuple(zt.shape)}"
                    )
                sld = self.sld_levels(zs, zt, weights, s)
            else:
                sld = {tap: self.sld_tap(tap, zs, zt, weights[tap]) for tap in self.taps}
            for tap in self.taps:
                self._stats[f"{tap}.sld_selected"] = (weights[tap] > 0).float().mean()
        out: dict[str, Tensor] = {}
        for tap in self.taps:  # keys in the order tap, tap.sld, next tap, ...
            out[f"{self.name}.{tap}"] = sfd[tap]
            if tap in sld:
                out[f"{self.name}.{tap}.sld"] = sld[tap]
        return out

    def internals(self, s: ModelOutput, t: ModelOutput, targets: Any = None,
                  query: tuple[float, float] = (0.5, 0.5)) -> dict[str, Tensor]:
        """Per tap (kdcli viz, mask statistics): the spatial keep-masks B^S_g of the active grids (``spatial_mask``,
        (N, G, H, W), 1 = kept; S2) and, with SLD on, its region weights ω (``sld_weights``, (N, H, W); S6)."""
        out: dict[str, Tensor] = {}
        grids = tuple(g for g, _ in self.active_grids())
        for tap in self.taps:
            with float32_region(s.taps[tap]):
                fs, ft = upcast(s.taps[tap].detach()), upcast(t.taps[tap].detach())
                keep_s, _ = self.pyramid_masks(ft, grids)  # (G, N, 1, H, W)
                out[f"{tap}.spatial_mask"] = keep_s[:, :, 0].transpose(0, 1).float()
                if self.sld_weight:
                    out[f"{tap}.sld_weights"] = self.region_weights(self.aligned(tap, fs, ft), ft)[:, 0]
        return out


__all__ = ["SAMKD", "binary_kl"]
