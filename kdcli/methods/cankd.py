r"""CanKD — Cross-Attention-based Non-local Knowledge Distillation (Sun & Ohyama, arXiv 2511.21503,
WACV 2026; official code tori-hotaru/CanKD, ``mmrazor/models/losses/nlkd_IN_loss.py``,
``NLKD_IN_Loss``), followed exactly. Method page: docs/methods/cankd.md.

Modules per tap (C = teacher channels, C_i = max(⌊C/2⌋, 1); all convs 1×1 with bias, PyTorch
default init):

    θ: conv C→C_i on the student          φ: conv C→C_i, then MaxPool 2×2 stride 2, on the teacher
    g: conv C→C_i, then MaxPool 2×2 s2 on the teacher
    W: conv C_i→C then BatchNorm2d(C) with γ = β = 0 at init

Equations (numbered as computation steps, not as in the paper; dot-product non-local
cross-attention)::

    f   = θ(F_S)ᵀ φ(F_T) / N_k             (HW × N_k, N_k = ⌊H/2⌋·⌊W/2⌋, no softmax)    (1)
    Y   = f · g(F_T)ᵀ                       (HW × C_i, reshaped to C_i × H × W)             (2)
    Z_S = BN(W(Y)) + F_S,   Z_T = F_T                                                       (3)
    L   = w · ½ · mean_{n,c,h,w} ( IN(Z_S) − IN(Z_T) )²                                     (4)

IN is InstanceNorm2d(affine=False, eps=1e-5, no running statistics): each (sample, channel) is
normalised over H×W with the biased variance. The ½ is built in: the official ``loss_weight = 10``
is an effective weight of 5. BN uses batch statistics in train mode and its running statistics in
eval mode, as in the official module.

Implementation notes (mathematically identical to the official code):

- (1)–(2) are evaluated reassociated, Y = θᵀ (φ gᵀ) / N_k, i.e. in channel-first layout
  Yᵀ = (g φᵀ / N_k) θ (a C_i × C_i product per sample, then C_i × HW), by associativity of the
  matrix product. The HW × N_k matrix f is never formed (at P3 of an 800×1333 image it would
  hold 16.7k × 4.2k entries per sample). Equality with the direct form is checked in float64 by
  the tests (:func:`nonlocal_aggregate` keeps both).
- IN is written out (:func:`~kdcli.methods.common.instance_norm`) instead of calling
  ``nn.InstanceNorm2d``; same formula.
- Everything runs in float32 with autocast disabled.
- Parameter layout follows the official module so weights can be copied for parity: per tap,
  ``blocks[tap].theta`` ↔ ``non_local_att.att.theta``, ``blocks[tap].phi.0`` ↔
  ``non_local_att.att.phi.0``, ``blocks[tap].g.0`` ↔ ``non_local_att.g.0``, ``blocks[tap].W.0/1``
  ↔ ``non_local_att.W.0/1``; :meth:`CanKD.load_official` does the renaming.

Deviations:

- A map with H < 2 or W < 2 (e.g. P6 of a tiny input) has N_k = 0: the official MaxPool raises.
  Here the attention branch is skipped for that tap (Z_S = F_S, i.e. the loss of γ = 0), and a
  1×1 map normalises to 0 under IN instead of raising.

Presets (official configs): detection — neck outputs 0..3 (``taps="fpn:4"``: P3–P6 for
RetinaNet/FCOS, P2–P5 for Faster R-CNN), w = 10 per level; segmentation — ``backbone.layer4``
(``taps="c5"``), w = 10 (the PSPNet-R101 → DeepLabV3-R18 config uses 20).

Heterogeneous pairs: when student and teacher channels differ at a tap (R18's 512 vs R101's 2048
at ``c5``), a connector — mmrazor ``ConvModuleConnector``: 1×1 conv student→teacher channels with
bias, no norm, no activation, Kaiming-normal (fan_out, ReLU gain) weights, zero bias — maps the
student first; when they are equal there is no connector (the official R101 teacher/R50 student
setups have none). A student map of a different H×W is then resized to the teacher's (bilinear,
``align_corners=False``), since the official code asserts equal shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..hparams import opt
from ..models.taps import ModelOutput, TapInfo
from . import register
from .base import Method
from .common import build_adapter, float32_region, instance_norm, match_spatial, upcast


def nonlocal_aggregate(theta: Tensor, phi: Tensor, g: Tensor, direct: bool = False) -> Tensor:
    """Y of Eqs. (1)–(2) in channel-first layout.

    ``theta`` (N, C_i, HW), ``phi`` and ``g`` (N, C_i, N_k) → (N, C_i, HW). ``direct=True`` forms
    the HW × N_k matrix f as the official code does (kept for the equality test); the default
    reassociates to Yᵀ = (g φᵀ / N_k) θ, whose largest intermediate is C_i × C_i.
    """
    nk = phi.shape[-1]
    if direct:
        f = theta.transpose(1, 2) @ phi / nk  # (N, HW, N_k)
        return (f @ g.transpose(1, 2)).transpose(1, 2)  # (N, HW, C_i) → (N, C_i, HW)
    return (g @ phi.transpose(1, 2) / nk) @ theta


class NonLocalBlock(nn.Module):
    """θ, φ, g, W of one tap; :meth:`forward` returns Z_S of Eq. (3)."""

    def __init__(self, channels: int, inter_channels: int) -> None:
        super().__init__()
        self.inter_channels = inter_channels
        self.theta = nn.Conv2d(channels, inter_channels, kernel_size=1)
        # kernel 2, stride 2 (stride defaults to the kernel), floor mode: N_k = ⌊H/2⌋·⌊W/2⌋
        self.phi = nn.Sequential(nn.Conv2d(channels, inter_channels, kernel_size=1), nn.MaxPool2d(2))
        self.g = nn.Sequential(nn.Conv2d(channels, inter_channels, kernel_size=1), nn.MaxPool2d(2))
        self.W = nn.Sequential(nn.Conv2d(inter_channels, channels, kernel_size=1), nn.BatchNorm2d(channels))
        # γ = β = 0: the block starts as the identity (Z_S = F_S), as in the non-local paper
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, fs: Tensor, ft: Tensor) -> Tensor:
        n, _, h, w = fs.shape
        if h < 2 or w < 2:
            return fs  # N_k = 0: no pooled teacher positions to attend to (documented deviation)
        theta = self.theta(fs).flatten(2)  # (N, C_i, HW)
        phi = self.phi(ft).flatten(2)  # (N, C_i, N_k)
        g = self.g(ft).flatten(2)  # (N, C_i, N_k)
        y = nonlocal_aggregate(theta, phi, g).view(n, self.inter_channels, h, w)
        return self.W(y) + fs


@register
class CanKD(Method):
    """Non-local cross-attention + instance-normalised MSE (module docstring: equations, deviations)."""

    name = "cankd"
    paper = "Sun & Ohyama, CanKD: Cross-Attention-based Non-local KD (WACV 2026, arXiv 2511.21503)"
    evidence = "parity-tested"
    tasks = ("detection", "segmentation")
    needs_targets = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # configs/distill/mmdet/nlkd/nlkdIN_*: neck outputs 0..3, loss_weight 10 per level
        "detection": {"taps": "fpn:4", "weight": 10.0, "inter_channels": 0},
        # configs/distill/mmseg/nlkd/*: backbone.layer4, loss_weight 10
        "segmentation": {"taps": "c5", "weight": 10.0, "inter_channels": 0},
    }

    @dataclass
    class Config:
        """Options of ``cankd`` (``--set key=value``); the presets above set them per task."""

        taps: str | tuple[str, ...] = opt('fpn:4', "tap names, 'fpn' (all FPN levels) or 'fpn:K' (the K finest)")
        weight: float = opt(10.0, 'loss weight per tap')
        inter_channels: int = opt(0, "channels of the non-local block's embeddings (0: C/2)")

    def __init__(
        self,
        student: dict[str, TapInfo],
        teacher: dict[str, TapInfo],
        task: str,
        **hp: Any,
    ) -> None:
        super().__init__(student, teacher, task, **hp)
        self.eps = 1e-5
        self.blocks = nn.ModuleDict()
        self.connectors = nn.ModuleDict()
        for tap in self.taps:
            cs, ct = student[tap].channels, teacher[tap].channels
            # inter_channels = 0 means the official default C // 2 (at least 1)
            ci = int(hp["inter_channels"]) or max(ct // 2, 1)
            self.blocks[tap] = NonLocalBlock(ct, ci)
            if cs != ct:
                self.connectors[tap] = build_adapter(cs, ct, bias=True, init="kaiming")

    def degenerate(self, tap: str, hw: tuple[int, int]) -> str | None:
        if hw[0] * hw[1] == 1:  # the student map is resized to the teacher's H×W before the norm
            return "instance normalisation over one position gives 0 on both sides, for any input"
        return None

    def tap_loss(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        """The weighted loss of one tap: connector, resize, non-local block, instance norm, ½·MSE × w."""
        if tap in self.connectors:
            fs = self.connectors[tap](fs)
        fs = match_spatial(fs, ft)
        zs = self.blocks[tap](fs, ft)
        diff = instance_norm(zs, self.eps) - instance_norm(ft, self.eps)
        return self.weight * 0.5 * diff.pow(2).mean()

    def load_official(self, tap: str, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load one official ``NLKD_IN_Loss`` state dict into the block of ``tap`` (parity tests).

        Keys may carry any prefix before ``non_local_att.`` (e.g. a whole mmrazor checkpoint's
        ``distiller.distill_losses.loss_nlkd.``); BN running statistics are copied too."""
        renames = (
            ("non_local_att.att.theta.", "theta."),
            ("non_local_att.att.phi.", "phi."),
            ("non_local_att.g.", "g."),
            ("non_local_att.W.", "W."),
        )
        mapped: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            for old, new in renames:
                if old in key:
                    mapped[new + key[key.find(old) + len(old):]] = value
                    break
        self.blocks[tap].load_state_dict(mapped, strict=strict)

    def internals(self, s: ModelOutput, t: ModelOutput, targets: Any = None,
                  query: tuple[float, float] = (0.5, 0.5)) -> dict[str, Tensor]:
        """Per tap (kdcli viz): the row of the non-local cross-attention f of Eq. (1) for the student position
        nearest ``query``, θ(F_S)_iᵀ φ(F_T) / N_k over the pooled teacher positions (``query_attention``,
        (N, ⌊H/2⌋, ⌊W/2⌋); dot-product attention, no softmax, so it is signed). Taps under 2×2 have none."""
        out: dict[str, Tensor] = {}
        for tap in self.taps:
            block: NonLocalBlock = self.blocks[tap]  # type: ignore[assignment]
            with float32_region(s.taps[tap]):
                fs, ft = upcast(s.taps[tap].detach()), upcast(t.taps[tap].detach())
                fs = match_spatial(self.connectors[tap](fs) if tap in self.connectors else fs, ft)
                n, _, h, w = fs.shape
                if h < 2 or w < 2:
                    continue
                theta = block.theta(fs).flatten(2)[:, :, self.query_index(h, w, query)]  # (N, C_i)
                phi = block.phi(ft)  # (N, C_i, ⌊H/2⌋, ⌊W/2⌋)
                nk = phi.shape[-2] * phi.shape[-1]
                out[f"{tap}.query_attention"] = (theta[:, :, None, None] * phi).sum(1) / nk
        return out
