r"""ACAM-KD — Adaptive and Cooperative Attention Masking for knowledge distillation (Lan & Tian, ICCV 2025,
arXiv 2503.06307). **Reconstructed: there is no official code.** Method page: docs/methods/acam.md
(equations, assumptions, tag legend). The equations come from secondary summaries of the paper ([C2] = two
or more independent summaries, [S1] = one); the gaps are filled by analogy with MasKD, the method's
direct ancestor (hunto/MasKD, tag [ANC]) or by our choice ([INF]). Nothing here has been checked against the
authors' code or the paper's PDF, and no reported number has been reproduced with it.

Per tap (teacher T and student S, both N×C×H×W after alignment; C = teacher channels, P = H·W, M masks,
C_q = ⌊C/2⌋):

    S̃ = f_align(S)                        1×1 conv C_S→C, bias, always applied            [INF/ANC]
    Q = W_q T,  K = W_k S̃,  V = W_v S̃      1×1 convs: W_q, W_k C→C_q; W_v C→C               [C2]
    F = softmax(Q Kᵀ / √C_q) V             P×P attention, softmax over the student positions [C2]
    M^c[n,m,k] = σ(m^c_m · v[n,k])         v = mean_{h,w} F;  m^c ∈ R^M  (N×M×C)            [C2]
    M^s[n,m,p] = σ(Σ_k m^s_{m,k} F[n,k,p]) m^s ∈ R^{M×C}             (N×M×P)            [C2]
    Δ = T − S̃,  E_c[n,k] = Σ_p Δ²,  E_s[n,p] = Σ_k Δ²
    L^c = mean_{n,m} Σ_k (M^c)² E_c / (P · (Σ_k M^c + ε))                                   [C2 + ANC]
    L^s = mean_{n,m} Σ_p (M^s)² E_s / (C · (Σ_p M^s + ε))                                   [S1 + ANC]
    L_div = D(M^s) + D(M^c),  D = mean_{n, i≠j} 2⟨X_i, X_j⟩ / (‖X_i‖² + ‖X_j‖² + 2·1e-12)  [ANC MasKD]
    loss  = α (L^c + L^s)  → key ``acam.<tap>``;   λ L_div → key ``acam.<tap>.div``        [S1: α = λ = 1]

The engine sums the keys, i.e. the level losses are summed ([INF/ANC]: MasKD sums its levels).
The masked terms never form the N×M×C×P tensor: ``‖M_m ⊙ Δ‖²`` is factorised through E_c / E_s. The
attention uses :func:`torch.nn.functional.scaled_dot_product_attention` (one head; head dims zero-padded so
that a fused kernel applies — CUDA memory-efficient, CPU flash — and the P×P matrix is never formed, neither by
this code nor by SDPA's math fallback; identical maths; :func:`fused_attention`). Everything runs in float32 with
autocast disabled, by default the attention too; ``attention_precision=amp`` (not a modelling assumption, off by
default) runs Q, K, V and the attention in the training's autocast dtype (bf16/fp16), the rest in float32: the
attention's O(P²·C) FLOPs dominate at 800×1333 (docs/methods/acam.md, Compute) and a GPU runs them far faster
in bf16 than in float32. It changes the values by the autocast dtype's round-off; without autocast it is the
float32 computation.

Assumptions (each tagged in docs/methods/acam.md; the switch is named where there is one):

- A1 taps: all FPN neck outputs, one independent module set per level — ``taps`` (default ``fpn``; e.g.
  ``fpn:4``). Segmentation: the main logits (the summaries' "predicted segmentation maps") —
  ``taps=seg_logits``.
- A2 ``f_align`` (PyTorch default init) is applied even for equal channels on FPN features, as MasKD's
  detection code does — ``align = always | auto``. Segmentation preset ``auto``: logits of equal
  class counts are compared as they are (S̃ = S), as MasKD's segmentation loss does (hunto/MasKD
  segmentation/losses/maskd.py has no align conv) [ANC]. A randomly initialised 1×1 conv on logits lets the
  student match W·S + b to the teacher with S a channel mix of the teacher's logits: measured on shapes, one
  seed in three of each segmentation pair collapsed with ``always`` (docs/methods/acam.md).
- A3 K/V come from the aligned student S̃, not the raw student the summaries write —
  ``kv_input = aligned | raw`` (raw needs C_S = C_T).
- A4 W_q, W_k, W_v: 1×1 convs with bias, PyTorch default init. Note that the key bias
  b_k cancels in the softmax (it adds Qᵀb_k to every logit of a row), so it never receives a gradient.
- A5 no residual, output projection or normalisation in the fusion (none is
  described). No switch.
- A6 C_q = ⌊C/2⌋ (at least 1); for 19-channel logits C_q = 9, scale 1/√9 — ``c_q`` (0 = this
  rule, else the value given).
- A7 selection units m^s, m^c ~ N(0, 0.01²) (MasKD's token init; masks start ≈ 0.5) — ``mask_init_std``.
- A8 the loss normalisers 1/(P·Σ_k M^c) and 1/(C·Σ_p M^s) with the mask squared in the numerator (only the
  first factor is legible in the sources); ε = 1e-6 on each mask mass
  (``mask_eps``) — ``mask_power = 2 | 1`` (1: Σ M·E / Σ M, scale-invariant, against the scale collapse
  described under the collapse monitor).
- A9 per-image terms, mean over masks and batch (MasKD).
- A10 Dice per ordered pair with ε = 1e-12 on each squared norm (MasKD code), not the printed global-sum
  form — ``div_form = pairwise | global`` (global = Σ_{i≠j}⟨X_i,X_j⟩ / Σ_i‖X_i‖², which is M−1, not 1, for
  identical masks).
- A11 Dice on both the spatial and the channel masks, the two terms summed — ``div_on = both | spatial |
  channel``.
- A12 masks receive gradients from L^c, L^s and L_div (the paper's "by optimising the two losses, the
  adaptive masks dynamically adjust", [S1]) — ``mask_grad = full | detach | detach_mass``: ``detach``
  feeds the masked terms detached masks, so mask units, W_q, W_k
  and W_v learn from L_div alone; ``detach_mass`` detaches only the normaliser Σ M.
- A13 the channel selection unit is one scalar per mask as printed ([C2]), so the M channel masks are
  monotone re-scalings of the same pooled vector — ``channel_units = scalar | vector``
  (vector: m^c ∈ R^{M×C}, element-wise).
- A14 query from the teacher ([C2], Table 9) — ``query_source = teacher | student``; ``student`` swaps the
  roles: Q = W_q S̃, K = W_k T, V = W_v T (the ablation row "query from student"; which side gives V there
  is our reading).
- A15 masks from the fused feature ([C2]) — ``mask_input = fused | teacher`` (teacher: ASCM on T, the
  attention is skipped; the Table 10 "teacher, adaptive mask" ablation). The "fixed offline mask" row
  needs MasKD's pre-learned tokens and is not offered.
- A16 α = λ = 1 constant ([S1]); M = 6 (detection), 19 (segmentation) ([S1]).
- The ACAM parameters are trained by the student's optimizer with the same LR and weight decay [INF]; the
  inheriting strategy and the 2x schedule are engine settings, not part of this module.

Not offered: MasKD's 0.4× auxiliary-logit term (unknown for ACAM; kdcli exposes no aux logits), a
MasKD-style regression-head KD term (nothing says ACAM uses one).

Collapse monitor (squared masks over a linear mass: a common scale s of a mask group scales its loss by s,
so the masks can shrink; and a mask-weighted mean of Δ² favours regions the student already matches; Dice
stops neither): after each forward, :attr:`ACAM.last_stats` holds per tap the mask
means, the normalised entropies of the masks seen as distributions, the pairwise Dice of each mask group,
the unweighted L^s, L^c and their ratio to mean(Δ²) (0.5 at init with ``mask_power=2``; a steady fall means
the masks are shrinking).

Heterogeneous pairs: ``f_align`` maps C_S → C_T; a student map of another H×W is resized to the teacher's
after it (bilinear, ``align_corners=False``).
"""

from __future__ import annotations

import math
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
from .common import autocast_dtype, build_adapter, check_pair, float32_region, match_spatial, upcast

CHOICES: dict[str, tuple[Any, ...]] = {
    "align": ("always", "auto"),
    "query_source": ("teacher", "student"),
    "kv_input": ("aligned", "raw"),
    "mask_input": ("fused", "teacher"),
    "mask_grad": ("full", "detach", "detach_mass"),
    "mask_power": (2, 1),
    "div_form": ("pairwise", "global"),
    "div_on": ("both", "spatial", "channel"),
    "channel_units": ("scalar", "vector"),
    "attention_precision": ("float32", "amp"),
}

DICE_EPS = 1e-12  # MasKD dice_coeff: added to each squared norm


def fused_attention(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """softmax(QᵀK / √C_q) applied to V, channel-first: q, k (N, C_q, P_q / P_k), v (N, C, P_k) → (N, C, P_q).

    One head of :func:`F.scaled_dot_product_attention` with the scale 1/√C_q given explicitly; row i of the
    attention is query position i, normalised over the key positions. The head dims are zero-padded and the
    inputs made contiguous (position-major): zero columns change neither QKᵀ nor the first C columns of the
    output. The padding is what keeps SDPA on a fused kernel instead of the "math" fallback that forms (and,
    for backward, stores) the P×P matrix:

    - CUDA (memory-efficient kernel): each head dim to a multiple of 8 — odd sizes (C_q = 9, C = 19 for
      logits) would be refused; Q/K and V may keep different widths.
    - CPU (flash kernel for CPU): Q, K and V to one common width, a multiple of 8 — that kernel refuses a V
      width different from the Q/K width (measured: torch 2.14, ``saved_tensors_hooks`` + profiler test).

    ``dtype``: the attention computed in that dtype (``attention_precision=amp``), the output cast back.
    """
    c_q, c = q.shape[1], v.shape[1]
    out_dtype = v.dtype
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

    def width(d: int) -> int:
        return d + (-d % 8)

    if q.device.type == "cuda":
        dq, dv = width(c_q), width(c)
    else:
        dq = dv = width(max(c_q, c))

    def heads(x: Tensor, d: int) -> Tensor:
        x = x.transpose(1, 2)  # (N, P, c)
        pad = d - x.shape[-1]
        return (F.pad(x, (0, pad)) if pad else x).contiguous().unsqueeze(1)  # (N, 1, P, d)

    out = F.scaled_dot_product_attention(heads(q, dq), heads(k, dq), heads(v, dv), scale=1.0 / math.sqrt(c_q))
    return out.squeeze(1)[..., :c].transpose(1, 2).to(out_dtype)


def dice_diversity(x: Tensor, form: str = "pairwise", eps: float = DICE_EPS) -> Tensor:
    """Dice diversity of masks ``x`` (N, M, L), averaged over the batch.

    ``pairwise`` (MasKD): mean over ordered pairs i ≠ j of 2⟨x_i, x_j⟩ / (‖x_i‖² + ε + ‖x_j‖² + ε); 1 for
    identical masks, 0 for disjoint supports. ``global`` (the printed form read literally):
    2 Σ_{i≠j}⟨x_i, x_j⟩ / (2 Σ_i ‖x_i‖² + ε) — M − 1 for identical masks. A single mask has no pair: 0.
    """
    n, m, _ = x.shape
    if m < 2:
        return x.sum() * 0.0
    gram = x @ x.transpose(1, 2)  # (N, M, M)
    sq = gram.diagonal(dim1=1, dim2=2)  # (N, M): squared norms
    off = ~torch.eye(m, dtype=torch.bool, device=x.device)
    if form == "pairwise":
        d = 2 * gram / (sq.unsqueeze(2) + sq.unsqueeze(1) + 2 * eps)
        return d[:, off].mean()
    if form == "global":
        cross = gram[:, off].sum(1)
        return (2 * cross / (2 * sq.sum(1) + eps)).mean()
    raise ConfigError(f"div_form '{form}' is not one of {', '.join(CHOICES['div_form'])}")


def masked_error(
    mask: Tensor, err: Tensor, scale: float, power: int = 2, eps: float = 1e-6, detach_mass: bool = False
) -> Tensor:
    """mean_{n,m} Σ_l mask^power · err / (scale · (Σ_l mask + ε)); mask (N, M, L), err (N, L)."""
    num = (mask.pow(power) @ err.unsqueeze(-1)).squeeze(-1)  # (N, M)
    mass = mask.sum(-1)
    if detach_mass:
        mass = mass.detach()
    return (num / (scale * (mass + eps))).mean()


def mask_entropy(mask: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean Shannon entropy of each mask (N, M, L) seen as a distribution over L, divided by log L (1 = flat)."""
    length = mask.shape[-1]
    if length < 2:
        return mask.new_zeros(())
    p = mask / (mask.sum(-1, keepdim=True) + eps)
    return (-torch.special.xlogy(p, p).sum(-1) / math.log(length)).mean()


class ACAMBlock(nn.Module):
    """f_align, STCA-FF (W_q, W_k, W_v) and ASCM (m^s, m^c) of one tap."""

    def __init__(
        self,
        student_channels: int,
        channels: int,
        c_q: int,
        num_masks: int,
        channel_units: str = "scalar",
        init_std: float = 0.01,
        align: str = "always",
    ) -> None:
        super().__init__()
        # "auto": no f_align when the channels already match (S̃ = S), as MasKD's segmentation code on logits
        self.align: nn.Module = (
            build_adapter(student_channels, channels, bias=True, init="default")
            if align == "always" or student_channels != channels
            else nn.Identity()
        )
        self.q = nn.Conv2d(channels, c_q, kernel_size=1)
        self.k = nn.Conv2d(channels, c_q, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.spatial_units = nn.Parameter(torch.empty(num_masks, channels))  # m^s
        shape = (num_masks,) if channel_units == "scalar" else (num_masks, channels)
        self.channel_units = nn.Parameter(torch.empty(shape))  # m^c
        nn.init.normal_(self.spatial_units, 0.0, init_std)
        nn.init.normal_(self.channel_units, 0.0, init_std)

    def fuse(self, query_in: Tensor, kv_in: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """F = softmax(W_q(query_in)ᵀ W_k(kv_in) / √C_q) W_v(kv_in), (N, C, H, W); ``dtype``: the attention's."""
        n, _, h, w = query_in.shape
        q = self.q(query_in).flatten(2)
        k = self.k(kv_in).flatten(2)
        v = self.v(kv_in).flatten(2)
        return fused_attention(q, k, v, dtype).reshape(n, v.shape[1], h, w)

    def masks(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Spatial masks (N, M, P) = σ(m^s · x) and channel masks (N, M, C) = σ(m^c ⊗ mean_{h,w} x)."""
        z = x.flatten(2)  # (N, C, P)
        spatial = torch.sigmoid(torch.einsum("mc,ncp->nmp", self.spatial_units, z))
        pooled = z.mean(-1)  # (N, C)
        units = self.channel_units
        if units.dim() == 1:
            units = units.unsqueeze(1)  # (M, 1): outer product with the pooled vector
        channel = torch.sigmoid(units.unsqueeze(0) * pooled.unsqueeze(1))
        return spatial, channel


# a spatial mask mean under this (from 0.5 at the start) is the scale collapse: the evidence suite's runs
# reached 0.0003 at P3 in two epochs (docs/methods/acam.md)
COLLAPSED = 0.01


@register
class ACAM(Method):
    """Cross-attention fusion + adaptive spatial/channel masks (reconstruction; module docstring)."""

    name = "acam"
    paper = (
        "Lan & Tian, ACAM-KD: Adaptive and Cooperative Attention Masking (ICCV 2025, arXiv 2503.06307) — "
        "reconstructed, no official code"
    )
    evidence = "reconstruction (no official code)"
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "detection": {
            "taps": "fpn",  # FPN neck [S1]; all levels [INF, as MasKD]
            "num_masks": 6,  # [S1]
            "c_q": 0,  # 0 = C // 2 (128 for FPN) [C2]
            "align": "always",  # f_align even for 256 → 256, as MasKD's detection code [INF/ANC]
            "alpha": 1.0,  # [S1]
            "lambda_div": 1.0,  # [S1]
            "query_source": "teacher",  # [C2]; student = Table 9 ablation
            "kv_input": "aligned",  # [INF]
            "mask_input": "fused",  # [C2]; teacher = Table 10 ablation
            "mask_grad": "full",  # [S1 quote + INF]
            "mask_power": 2,  # printed ‖M ⊙ Δ‖² [S1] = MasKD [ANC]
            "div_form": "pairwise",  # MasKD [ANC/INF]
            "div_on": "both",  # [INF]
            "channel_units": "scalar",  # printed m^c ∈ R^{M×1} [C2]
            "mask_init_std": 0.01,  # MasKD token init [INF]
            "mask_eps": 1e-6,  # [INF]
            "attention_precision": "float32",  # kdcli (speed): amp = attention in the autocast dtype
        },
        "segmentation": {
            "taps": "seg_logits",  # "predicted segmentation maps" [S1] + MasKD seg [ANC]
            "num_masks": 19,  # one per class [S1]
            "c_q": 0,  # 0 = C // 2 = 9 for 19 classes [INF]
            "align": "auto",  # logits compared as they are, as MasKD's segmentation code [ANC]; A2
            "alpha": 1.0,
            "lambda_div": 1.0,
            "query_source": "teacher",
            "kv_input": "aligned",
            "mask_input": "fused",
            "mask_grad": "full",
            "mask_power": 2,
            "div_form": "pairwise",
            "div_on": "both",
            "channel_units": "scalar",
            "mask_init_std": 0.01,
            "mask_eps": 1e-6,
            "attention_precision": "float32",
        },
    }

    @dataclass
    class Config:
        """Options of ``acam`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('fpn', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        num_masks: int = opt(6, 'masks M per tap')
        c_q: int = opt(0, 'query/key channels (0: C/2)')
        align: str = opt('always', 'when the student→teacher align conv is applied')
        alpha: float = opt(1.0, 'weight α of the masked errors')
        lambda_div: float = opt(1.0, 'weight of the mask diversity term')
        query_source: str = opt('teacher', 'which map gives the attention queries')
        kv_input: str = opt('aligned', 'student input of keys/values: aligned or raw')
        mask_input: str = opt('fused', "masks from the fused map or the teacher's")
        mask_grad: str = opt('full', 'gradient through the masks: full, detach or detach_mass')
        mask_power: int = opt(2, 'exponent of the masks on the errors')
        div_form: str = opt('pairwise', 'form of the Dice diversity')
        div_on: str = opt('both', 'diversity on spatial, channel or both masks')
        channel_units: str = opt('scalar', 'channel mask units: scalar or vector')
        mask_init_std: float = opt(0.01, "std of the mask units' normal init")
        mask_eps: float = opt(1e-06, "ε of the masks' normaliser")
        attention_precision: str = opt('float32', 'dtype of the attention: float32 or amp')

    def __init__(
        self,
        student: dict[str, TapInfo],
        teacher: dict[str, TapInfo],
        task: str,
        **hp: Any,
    ) -> None:
        super().__init__(student, teacher, task, **hp)
        for key, choices in CHOICES.items():
            if hp[key] not in choices:
                raise ConfigError(
                    f"--set {key}={hp[key]}: method 'acam' expects one of {', '.join(map(str, choices))}"
                )
        self.num_masks = int(hp["num_masks"])
        if self.num_masks < 1:
            raise ConfigError(f"--set num_masks={self.num_masks}: method 'acam' needs at least one mask")
        self.alpha = float(hp["alpha"])
        self.lambda_div = float(hp["lambda_div"])
        self.query_source = str(hp["query_source"])
        self.kv_input = str(hp["kv_input"])
        self.mask_input = str(hp["mask_input"])
        self.mask_grad = str(hp["mask_grad"])
        self.mask_power = int(hp["mask_power"])
        self.div_form = str(hp["div_form"])
        self.div_on = str(hp["div_on"])
        self.mask_eps = float(hp["mask_eps"])
        self.attention_precision = str(hp["attention_precision"])
        self.blocks = nn.ModuleDict()
        for tap in self.taps:
            cs, ct = student[tap].channels, teacher[tap].channels
            if self.kv_input == "raw" and cs != ct:
                raise ConfigError(
                    f"--set kv_input=raw: tap '{tap}' has {cs} student and {ct} teacher channels; the raw "
                    "student can feed K/V only when they are equal (use kv_input=aligned)"
                )
            c_q = int(hp["c_q"]) or max(ct // 2, 1)
            self.blocks[tap] = ACAMBlock(
                cs, ct, c_q, self.num_masks, str(hp["channel_units"]), float(hp["mask_init_std"]), str(hp["align"])
            )
        self._stats: dict[str, Tensor] = {}

    def stat_warnings(self, columns: dict[str, float]) -> dict[str, str]:
        """The scale collapse (docs/methods/acam.md, Collapse monitor): a tap's spatial masks averaging under
        :data:`COLLAPSED` switch its masked terms off (Σ M²E / Σ M falls with the masks' scale)."""
        out = {}
        for key, value in columns.items():
            parts = key.split(".")
            if key.startswith(f"mask/{self.name}.") and key.endswith(".spatial_mask.mean") and value < COLLAPSED:
                tap = ".".join(parts[1:-2])
                out[f"{self.name}.{tap}.collapse"] = (
                    f"{self.name}: the spatial masks at {tap} have collapsed (mean {value:.4f}), so its masked loss "
                    "is near zero there (docs/methods/acam.md, Collapse monitor); --set mask_grad=detach keeps them "
                    "from shrinking")
        return out

    @property
    def last_stats(self) -> dict[str, float]:
        """Mask statistics of the last forward, per tap (``<tap>.spatial_mean`` …); one device sync."""
        if not self._stats:
            return {}
        values = torch.stack([v.float() for v in self._stats.values()]).tolist()
        return dict(zip(self._stats.keys(), values, strict=True))

    def forward(self, s: ModelOutput, t: ModelOutput, targets: Any = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        for tap in self.taps:
            fs, ft = s.taps[tap], t.taps[tap]
            check_pair(self.name, tap, fs, ft)
            block: ACAMBlock = self.blocks[tap]  # type: ignore[assignment]
            att = autocast_dtype(fs) if self.attention_precision == "amp" else None
            with float32_region(fs):
                fs, ft = upcast(fs), upcast(ft.detach())
                s_al = match_spatial(block.align(fs), ft)
                if self.mask_input == "teacher":
                    src = ft
                else:
                    s_in = s_al if self.kv_input == "aligned" else match_spatial(fs, ft)
                    src = block.fuse(ft, s_in, att) if self.query_source == "teacher" else block.fuse(s_in, ft, att)
                m_s, m_c = block.masks(src)
                c, p = ft.shape[1], ft.shape[2] * ft.shape[3]
                sq = (ft - s_al).flatten(2).pow(2)  # (N, C, P)
                e_c, e_s = sq.sum(2), sq.sum(1)
                ms_l, mc_l = (m_s.detach(), m_c.detach()) if self.mask_grad == "detach" else (m_s, m_c)
                detach_mass = self.mask_grad == "detach_mass"
                l_c = masked_error(mc_l, e_c, p, self.mask_power, self.mask_eps, detach_mass)
                l_s = masked_error(ms_l, e_s, c, self.mask_power, self.mask_eps, detach_mass)
                div = m_s.sum() * 0.0
                if self.div_on in ("both", "spatial"):
                    div = div + dice_diversity(m_s, self.div_form)
                if self.div_on in ("both", "channel"):
                    div = div + dice_diversity(m_c, self.div_form)
                out[f"{self.name}.{tap}"] = self.alpha * (l_c + l_s)
                out[f"{self.name}.{tap}.div"] = self.lambda_div * div
                with torch.no_grad():
                    mse = sq.mean()
                    stats.update({
                        f"{tap}.spatial_mean": m_s.mean(),
                        f"{tap}.channel_mean": m_c.mean(),
                        f"{tap}.spatial_entropy": mask_entropy(m_s),
                        f"{tap}.channel_entropy": mask_entropy(m_c),
                        f"{tap}.spatial_dice": dice_diversity(m_s),
                        f"{tap}.channel_dice": dice_diversity(m_c),
                        f"{tap}.loss_spatial": l_s.detach(),
                        f"{tap}.loss_channel": l_c.detach(),
                        f"{tap}.spatial_ratio": l_s.detach() / (mse + 1e-12),
                        f"{tap}.channel_ratio": l_c.detach() / (mse + 1e-12),
                    })
        self._stats = stats
        return out

    def internals(self, s: ModelOutput, t: ModelOutput, targets: Any = None,
                  query: tuple[float, float] = (0.5, 0.5)) -> dict[str, Tensor]:
        """Per tap (kdcli viz, mask statistics): the ASCM spatial masks M^s (N, M, H, W) and channel masks M^c
        (N, M, C), and the STCA-FF attention of the query position nearest ``query``: softmax_k(q_i·k_k / √C_q)
        over the key positions (``query_attention``, (N, H, W); absent with ``mask_input=teacher``)."""
        out: dict[str, Tensor] = {}
        for tap in self.taps:
            block: ACAMBlock = self.blocks[tap]  # type: ignore[assignment]
            with float32_region(s.taps[tap]):
                fs, ft = upcast(s.taps[tap].detach()), upcast(t.taps[tap].detach())
                n, _, h, w = ft.shape
                src = ft
                if self.mask_input != "teacher":
                    s_in = match_spatial(block.align(fs) if self.kv_input == "aligned" else fs, ft)
                    q_in, kv_in = (ft, s_in) if self.query_source == "teacher" else (s_in, ft)
                    src = block.fuse(q_in, kv_in)
                    q = block.q(q_in).flatten(2)[:, :, self.query_index(h, w, query)]  # (N, C_q)
                    logits = torch.einsum("nc,ncp->np", q, block.k(kv_in).flatten(2)) / math.sqrt(q.shape[1])
                    out[f"{tap}.query_attention"] = logits.softmax(-1).view(n, h, w)
                m_s, m_c = block.masks(src)
                out[f"{tap}.spatial_mask"] = m_s.view(n, -1, h, w)
                out[f"{tap}.channel_mask"] = m_c
        return out
