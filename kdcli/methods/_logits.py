r"""Pieces shared by the logit methods (``kd``, ``dkd``, ``nkd``, ``uskd``, ``bckd``).

Method pages: docs/methods/kd.md (reductions), docs/methods/dkd.md, nkd.md, uskd.md, bckd.md. Three jobs:

1. **Dense outputs → samples**. Every loss here works on ``(M, K)`` rows (one class
   distribution per row, classes last) plus a per-row weight:

   - segmentation (:func:`pixel_samples`): one row per pixel of the ``(N, K, h, w)`` logits. The two
     maps are brought to the larger size per dimension (bilinear, ``align_corners=False``) and the
     label map is resized to it with ``nearest`` (label values stay intact). A row's weight is 0 at
     ``ignore_index`` (255) pixels; the label stored there is replaced by 0 so gathers stay in range.
   - sigmoid detection heads (:func:`location_samples`): one row per anchor/location of the
     ``(N, L, C)`` ``cls_logits``. Positives, ignored and background locations come from the
     **student's** own assigner (``ModelOutput.extras["match"]``, see
     :func:`kdcli.models.detection.match_locations`): RetinaNet's IoU matcher (positive at IoU ≥ 0.5
     plus low-quality best matches, background < 0.4, ignored in between) and FCOS's centre-sampling
     and scale-range rule (no ignored locations). With ``positives=True`` only matched locations are
     kept (the only faithful way to run a softmax/target decomposition on a sigmoid head)
     and torchvision's background column 0 — never a target, no class of its own — is dropped, so the
     softmax runs over the C−1 real classes and a label ``y`` (1..C−1) becomes column ``y−1``.

2. **Target / non-target decomposition** (:func:`target_split`; NKD and DKD): for logits ``z``,
   label ``y`` and temperature τ, ``log p_y``, ``log(1 − p_y)`` and the non-target log-softmax
   ``log p̂_i = z_i/τ − logsumexp_{j≠y} z_j/τ``. ``1 − p_y`` is taken as
   ``exp(logsumexp_{j≠y} − logsumexp_all)`` (no cancellation when ``p_y → 1``); removing the target
   column equals DKD's "−1000 masking" and NKD's column removal.

3. **Reductions** (:func:`reduce_samples`): ``mean`` over the rows with weight 1 (mdistiller /
   cls_KD's "mean over the batch"; ÷ valid pixels; ÷ positives in positives mode), ``sum`` (mmrazor's DKD quirk),
   ``avg_factor`` (mmdet's count and division, as in BCKD (mmdet 2.28.2) and CrossKD (mmdet 3.0):
   the head counts ``Σ_images max(#positives of the image, 1)`` and ``weight_reduce_loss`` divides
   the sum by that ``+ finfo(float32).eps``; see :func:`avg_factor_divisor`) and ``level`` (LD: per
   FPN level ÷ that level's positives, summed over levels; a level without positives contributes 0).
   LD's code base (HikariTJU/LD, mmdet 2.10.0) divides by ``avg_factor`` itself, without ε, so
   ``level`` adds none.

Every function expects float32 (or float64) inputs; callers upcast and run inside
:func:`~kdcli.methods.common.float32_region`. In DDP runs ``avg_factor`` counts the local batch only
(the official code averages it over GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, MethodError
from ..models.taps import ModelOutput, TapInfo
from .base import Method
from .common import float32_region, resize_to, upcast

CLASS_REDUCTIONS = ("sum", "mean")
# mmdet's weight_reduce_loss (BCKD's 2.28.2, CrossKD's 3.0): loss.sum() / (avg_factor + eps), a guard against 0
AVG_FACTOR_EPS = torch.finfo(torch.float32).eps
SAMPLE_REDUCTIONS = ("mean", "sum", "avg_factor", "level")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"--set {key}: '{value}' is not one of {', '.join(choices)}")
    return value


@dataclass
class Samples:
    """Rows of class logits with their labels and weights (see the module docstring)."""

    s: Tensor  # (M, K) student logits
    t: Tensor | None  # (M, K) teacher logits, detached (None for self-distillation)
    labels: Tensor | None  # (M,) int64 in [0, K); arbitrary (0) where weight is 0
    weight: Tensor  # (M,) 1 for rows that count, 0 for dropped ones
    extra: Tensor | None = None  # (M, K') another map flattened the same way (USKD's weak logits)
    level: Tensor | None = None  # (M,) FPN level of each row (detection)
    pos_per_level: Tensor | None = None  # (levels,) positive locations per level in the batch
    avg_factor: Tensor | None = None  # scalar: Σ_images max(#positive locations, 1) (detection)


# ------------------------------------------------------------------------------------ segmentation
def label_map(targets: Any, size: tuple[int, int]) -> Tensor | None:
    """The ``(N, h, w)`` int64 label map at ``size`` (``nearest``), or None when there is none."""
    if not isinstance(targets, Tensor):
        return None
    labels = targets
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if tuple(labels.shape[-2:]) != tuple(size):
        # nearest keeps values intact (255 stays 255; no blending of class ids)
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
    return labels.long()


def pixel_samples(
    name: str,
    tap: str,
    zs: Tensor,
    zt: Tensor | None,
    targets: Any,
    ignore_index: int,
    *,
    need_labels: bool,
    mask_ignored: bool = True,
    extra: Tensor | None = None,
) -> Samples:
    """Segmentation logits ``(N, K, h, w)`` → one row per pixel (module docstring, item 1)."""
    zs = upcast(zs)
    zt = upcast(zt.detach()) if zt is not None else None
    if zs.dim() != 4 or (zt is not None and (zt.dim() != 4 or zt.shape[:2] != zs.shape[:2])):
        raise MethodError(
            f"method '{name}': tap '{tap}' needs (N, K, h, w) logits with the same batch and classes; got "
            f"student {tuple(zs.shape)}, teacher {None if zt is None else tuple(zt.shape)}"
        )
    size = (zs.shape[2], zs.shape[3])
    if zt is not None:
        size = (max(size[0], zt.shape[2]), max(size[1], zt.shape[3]))
        zt = resize_to(zt, size)
    zs = resize_to(zs, size)
    labels = label_map(targets, size) if (need_labels or mask_ignored) else None
    if need_labels and labels is None:
        raise MethodError(f"method '{name}' needs the label map (targets) to pick each pixel's class")
    k = zs.shape[1]

    def rows(x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    if labels is not None and mask_ignored:
        valid = labels.reshape(-1) != ignore_index
        weight = valid.to(zs.dtype)
    else:
        valid = None
        weight = zs.new_ones(zs.shape[0] * size[0] * size[1])
    flat_labels = None
    if need_labels and labels is not None:
        flat_labels = labels.reshape(-1)
        flat_labels = torch.where(valid, flat_labels, 0) if valid is not None else flat_labels
        flat_labels = flat_labels.clamp(0, k - 1)  # non-ignored labels ≥ K are a data error caught upstream
    ex = rows(upcast(resize_to(extra, size))) if extra is not None else None
    return Samples(rows(zs), rows(zt) if zt is not None else None, flat_labels, weight, ex)


# ------------------------------------------------------------------------------------ detection
def matched_locations(name: str, s: ModelOutput, targets: Any) -> Tensor:
    """``(N, L)`` student assignment (≥0 matched box, −1 background, −2 ignored)."""
    match = s.extras.get("match")
    if match is None or not isinstance(targets, list):
        raise MethodError(
            f"method '{name}' needs the student's matched locations: a one-stage detector (RetinaNet/FCOS) "
            "output with extras['match'] and the batch's box targets"
        )
    cached = s.extras.get("matched")
    if isinstance(cached, tuple) and cached[0] is targets:  # several methods on one output: match once
        return cached[1]
    matched = match(targets)
    s.extras["matched"] = (targets, matched)
    return matched


def level_index(s: ModelOutput, num_locations: int, device: torch.device) -> tuple[Tensor, int]:
    """``(L,)`` FPN level of each location and the number of levels (one level when unknown)."""
    per_level = s.extras.get("num_anchors_per_level")
    if not per_level or sum(per_level) != num_locations:
        return torch.zeros(num_locations, dtype=torch.int64, device=device), 1
    counts = torch.as_tensor(per_level, device=device)
    return torch.repeat_interleave(torch.arange(len(per_level), device=device), counts), len(per_level)


def box_labels(matched: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
    """``(N, L)`` ground-truth label of each location's matched box (0 where unmatched)."""
    counts = [len(t["labels"]) for t in targets]
    flat = torch.cat([t["labels"] for t in targets]).to(matched.device)
    if flat.numel() == 0:
        return torch.zeros_like(matched)
    offsets = torch.as_tensor([0, *counts[:-1]], device=matched.device).cumsum(0)[:, None]
    idx = (matched.clamp(min=0) + offsets).clamp(max=flat.numel() - 1)
    return torch.where(matched >= 0, flat[idx], 0)


def location_samples(
    name: str,
    tap: str,
    s: ModelOutput,
    zs: Tensor,
    zt: Tensor | None,
    targets: Any,
    *,
    positives: bool,
    drop_ignored: bool = True,
    extra: Tensor | None = None,
) -> Samples:
    """Dense-detection logits ``(N, L, C)`` → rows (module docstring, item 1)."""
    zs = upcast(zs)
    zt = upcast(zt.detach()) if zt is not None else None
    if zs.dim() != 3 or (zt is not None and zt.shape != zs.shape):
        raise MethodError(
            f"method '{name}': tap '{tap}' student logits {tuple(zs.shape)} and teacher logits "
            f"{None if zt is None else tuple(zt.shape)} differ; per-location KD needs the same anchors per "
            "location, FPN levels and classes (use a feature method instead)"
        )
    n, length, c = zs.shape
    matched = matched_locations(name, s, targets)
    if matched.shape != (n, length):
        raise MethodError(f"method '{name}': the student's assignment has shape {tuple(matched.shape)}, "
                          f"its '{tap}' has {n}×{length} locations")
    level, n_levels = level_index(s, length, zs.device)
    pos = matched >= 0
    pos_per_level = torch.zeros(n_levels, dtype=zs.dtype, device=zs.device)
    pos_per_level.index_add_(0, level, pos.to(zs.dtype).sum(0))
    avg_factor = pos.sum(1).clamp(min=1).sum().to(zs.dtype)
    level_rows = level.expand(n, length).reshape(-1)
    ex = upcast(extra).reshape(n * length, -1) if extra is not None else None
    if not positives:
        weight = (matched != -2) if drop_ignored else torch.ones_like(pos)
        return Samples(zs.reshape(-1, c), zt.reshape(-1, c) if zt is not None else None, None,
                       weight.reshape(-1).to(zs.dtype), ex, level_rows, pos_per_level, avg_factor)
    if c < 3:
        raise MethodError(f"method '{name}': tap '{tap}' has {c} outputs; a softmax over the classes at "
                          "positive locations needs at least 2 classes besides torchvision's background")
    # positives mode: keep the positive rows only (indexing, not masking: positives are ~0.1% of the locations)
    keep = pos.reshape(-1)
    labels = box_labels(matched, targets).reshape(-1)[keep] - 1  # torchvision class y → column y−1
    rows_s = zs.reshape(-1, c)[keep][:, 1:]
    rows_t = zt.reshape(-1, c)[keep][:, 1:] if zt is not None else None
    ex = ex[keep] if ex is not None else None
    return Samples(rows_s, rows_t, labels.clamp(0, c - 2), rows_s.new_ones(rows_s.shape[0]), ex,
                   level_rows[keep], pos_per_level, avg_factor)


# ------------------------------------------------------------------------------------ reductions
def avg_factor_divisor(pos: Tensor, dtype: torch.dtype) -> Tensor:
    """What BCKD's and CrossKD's heads divide a summed loss by, from the ``(N, L)`` positive mask:
    ``Σ_images max(#pos_i, 1) + finfo(float32).eps``. Two mmdet conventions, both kept: every image
    counts at least 1 positive (BCKD ``LDHead.get_targets``; mmdet 3 ``SamplingResult.num_pos``), so
    an image without positives still adds 1; and ``weight_reduce_loss`` adds ε to ``avg_factor``
    (≈ 1.2e-7 / count relative, although the count is ≥ 1)."""
    return pos.sum(1).clamp(min=1).sum().to(dtype) + AVG_FACTOR_EPS


def reduce_classes(per_class: Tensor, how: str) -> Tensor:
    return per_class.sum(-1) if how == "sum" else per_class.mean(-1)


def reduce_samples(per_row: Tensor, smp: Samples, how: str, name: str = "") -> Tensor:
    """Weighted reduction of a per-row loss (module docstring, item 3)."""
    total = (per_row * smp.weight).sum()  # multiply, not index: one graph, no sync
    if how == "sum":
        return total
    if how == "mean":
        return total / smp.weight.sum().clamp(min=1)
    if smp.avg_factor is None or smp.level is None or smp.pos_per_level is None:
        raise ConfigError(f"--set sample_reduction={how}: '{name}' only has it for detection heads")
    if how == "avg_factor":
        return total / (smp.avg_factor + AVG_FACTOR_EPS)
    # level: Σ_levels (Σ_{rows on level} ℓ) / max(#positives on level, 1)
    per_level = torch.zeros_like(smp.pos_per_level).index_add(0, smp.level, per_row * smp.weight)
    return (per_level / smp.pos_per_level.clamp(min=1)).sum()


# ------------------------------------------------------------------------------------ decomposition
@dataclass
class Split:
    """``log p_y``, ``log(1 − p_y)`` (both (M,)), the non-target log-softmax ``log p̂`` (M, K; its
    target column is finite but meaningless) and the non-target mask (M, K)."""

    log_py: Tensor
    log_rest: Tensor
    log_phat: Tensor
    nontarget: Tensor


def target_split(z: Tensor, labels: Tensor, tau: float) -> Split:
    """Target / non-target split of ``softmax(z/τ)`` (module docstring, item 2)."""
    z = z / tau
    onehot = F.one_hot(labels, z.shape[-1]).bool()
    lse = torch.logsumexp(z, -1)
    lse_nt = torch.logsumexp(z.masked_fill(onehot, float("-inf")), -1)
    z_y = z.gather(-1, labels[:, None])[:, 0]
    return Split(z_y - lse, lse_nt - lse, z - lse_nt[:, None], ~onehot)


def nontarget_probs(sp: Split) -> Tensor:
    """p̂ with exactly 0 in the target column (exp of −inf, never exp of a large number × 0)."""
    return sp.log_phat.masked_fill(~sp.nontarget, float("-inf")).exp()


def tckd(s: Split, t: Split) -> Tensor:
    """Per row KL([p_y, 1−p_y]_t ‖ [p_y, 1−p_y]_s) (DKD's TCKD without τ²)."""
    return t.log_py.exp() * (t.log_py - s.log_py) + t.log_rest.exp() * (t.log_rest - s.log_rest)


def nckd(s: Split, t: Split) -> Tensor:
    """Per row KL(p̂_t ‖ p̂_s) over the non-target classes (DKD's NCKD without τ²)."""
    return (nontarget_probs(t) * (t.log_phat - s.log_phat)).sum(-1)


def nontarget_ce(s: Split, t: Split) -> Tensor:
    """Per row −Σ_{i≠y} p̂_t,i log p̂_s,i (NKD's non-target term without γτ²) = NCKD + H(p̂_t)."""
    return -(nontarget_probs(t) * s.log_phat).sum(-1)


def softmax_kl(s: Tensor, t: Tensor, tau: float, dim: int = -1) -> Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) per class entry over ``dim`` (not yet reduced)."""
    log_p_t = F.log_softmax(t / tau, dim=dim)
    log_p_s = F.log_softmax(s / tau, dim=dim)
    # exp(log p) is exact where p underflows: those terms are 0 · finite = 0, never 0 · (−inf)
    return log_p_t.exp() * (log_p_t - log_p_s)


def bernoulli_kl(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """Element-wise KL(Bern(σ(t/τ)) ‖ Bern(σ(s/τ)))."""
    zs, zt = s / tau, t / tau
    log_p, log_1mp = F.logsigmoid(zt), F.logsigmoid(-zt)
    log_q, log_1mq = F.logsigmoid(zs), F.logsigmoid(-zs)
    # 1−p as exp(logσ(−z)), not 1 − σ(z): no cancellation for confident teachers
    return log_p.exp() * (log_p - log_q) + log_1mp.exp() * (log_1mp - log_1mq)


# rows of the flattened logits per chunk of :class:`_BernoulliKLTotal`: ~4 M elements (16 MB in float32) of
# transient memory per intermediate, whatever the number of anchors
CHUNK_ELEMENTS = 1 << 22


def row_chunks(shape: torch.Size) -> list[tuple[int, slice]]:
    """(sample, rows) index pairs covering ``(N, R, C)`` in chunks of about :data:`CHUNK_ELEMENTS`: each chunk is
    a view (no copy) even of a slice along R; a bounded number of chunks, not one per row."""
    rows = max(1, CHUNK_ELEMENTS // max(1, shape[-1]))
    return [(n, slice(i, i + rows)) for n in range(shape[0]) for i in range(0, shape[1], rows)]


class _BernoulliKLTotal(torch.autograd.Function):
    """Σ_{n,r} w_{n,r} · Σ_c KL(Bern(σ(t/τ)) ‖ Bern(σ(s/τ))) × ``scale`` over ``(N, R, C)`` logits, without keeping
    the element-wise graph: ∂/∂s = scale · w · (σ(s/τ) − σ(t/τ)) / τ is recomputed from ``s`` and ``t`` in the
    backward pass. Both passes run chunk by chunk in float32 (float64 inputs stay float64); ``w`` None is 1."""

    @staticmethod
    def forward(ctx: Any, s: Tensor, t: Tensor, w: Tensor | None, tau: float,  # type: ignore[override]
                scale: float) -> Tensor:
        ctx.save_for_backward(s, t, w)
        ctx.tau, ctx.scale = tau, scale
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc, device=s.device)
        for idx in row_chunks(s.shape):
            per_row = bernoulli_kl(upcast(s[idx]), upcast(t[idx]), tau).sum(-1)
            total += (per_row if w is None else per_row * w[idx]).sum(dtype=acc)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        s, t, w = ctx.saved_tensors
        out = torch.empty(s.shape, dtype=s.dtype, device=s.device)
        k = grad * (ctx.scale / ctx.tau)
        for idx in row_chunks(s.shape):
            g = (torch.sigmoid(upcast(s[idx]) / ctx.tau) - torch.sigmoid(upcast(t[idx]) / ctx.tau)) * k
            out[idx] = (g if w is None else g * w[idx][..., None]).to(out.dtype)
        return out, None, None, None, None


def bernoulli_kl_total(s: Tensor, t: Tensor, tau: float, class_reduction: str = "sum",
                       sample_reduction: str = "mean", weight: Tensor | None = None) -> Tensor:
    """``reduce_samples(reduce_classes(bernoulli_kl(s, t, τ)))`` over every row of ``(N, R, C)`` logits (each row
    weight 1, or ``weight`` (N, R) summed with ``sample_reduction=sum``; mean divides by N·R), computed without
    the element-wise graph: over ≈ 200 k anchors × 91 classes per 800×1333 image the plain expression
    would hold about a dozen float32 copies of the logits until the backward pass. Equal to it up to float
    rounding (tested, values and gradients); ``s`` and ``t`` may be bf16/fp16 (each chunk is upcast).
    ``t`` and ``weight`` get no gradient."""
    if s.dim() != 3:
        raise ValueError(f"bernoulli_kl_total: expected (N, R, C) logits, got {tuple(s.shape)}")
    c, rows = s.shape[-1], s.shape[0] * s.shape[1]
    scale = (1.0 / c if class_reduction == "mean" else 1.0) * (1.0 / max(1, rows) if sample_reduction == "mean"
                                                               else 1.0)
    w = None if weight is None else weight.detach()
    return _BernoulliKLTotal.apply(s, t.detach(), w, float(tau), scale)


# ------------------------------------------------------------------------------------ DKD / NKD
TARGET_TERMS = ("binary_kl", "weighted_ce")
NONTARGET_FORMS = ("kl", "ce")


class DecoupledKD(Method):
    r"""One implementation of the target / non-target decomposition, two target terms (DKD, NKD).

    Per sample (a valid pixel, or a positive location of a sigmoid head in positives mode)::

        L_i = w_tgt · T_i + w_nt · τ² · N_i
        T_i = τ² · KL([p_y, 1−p_y]_t ‖ [p_y, 1−p_y]_s)  at τ        target_term=binary_kl    (DKD TCKD)
            = − p_t,y · log p_s,y                      at τ = 1    target_term=weighted_ce  (NKD)
        N_i = KL(p̂_t ‖ p̂_s)                           at τ        nontarget_form=kl        (DKD NCKD)
            = − Σ_{i≠y} p̂_t,i log p̂_s,i               at τ        nontarget_form=ce        (NKD)

    then ``sample_reduction`` over the samples (``mean`` = the official ÷ batch size) and a schedule
    factor (DKD's warm-up). Subclasses set the class attributes and map their hyper-parameters
    (α, β / γ) in :meth:`coefficients`.
    """

    tasks = ("detection", "segmentation")
    needs_targets = True
    target_term: str = "binary_kl"  # one of TARGET_TERMS
    nontarget_form: str = "kl"  # one of NONTARGET_FORMS (NKD lets --set form choose)

    def __init__(self, student: dict[str, TapInfo], teacher: dict[str, TapInfo], task: str, **hp: Any) -> None:
        super().__init__(student, teacher, task, **hp)
        self.tau = float(hp["tau"])
        if self.tau <= 0:
            raise ConfigError(f"--set tau: the temperature must be > 0 (got {self.tau})")
        self.sample_reduction = check_choice("sample_reduction", str(hp.get("sample_reduction", "mean")),
                                             ("mean", "sum"))
        self.ignore_index = int(hp.get("ignore_index", 255))
        self.w_target, self.w_nontarget = self.coefficients(hp)
        for tap in self.taps:
            cs, ct = student[tap].channels, teacher[tap].channels
            if cs != ct:
                raise MethodError(f"method '{self.name}': tap '{tap}' has {cs} classes in the student but {ct} "
                                  "in the teacher; logit KD needs the same class list (use a feature method)")
            if cs < 3:
                raise MethodError(f"method '{self.name}': tap '{tap}' has {cs} classes; the non-target "
                                  "distribution needs at least 3")

    def coefficients(self, hp: dict[str, Any]) -> tuple[float, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def schedule(self) -> float:
        """Factor on the whole loss at the current step (DKD's warm-up; 1 otherwise)."""
        return 1.0

    def forward(self, s: ModelOutput, t: ModelOutput, targets: Any = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for tap in self.taps:
            zs, zt = s.taps[tap], t.taps[tap]
            with float32_region(zs):
                if zs.dim() == 4:
                    smp = pixel_samples(self.name, tap, zs, zt, targets, self.ignore_index, need_labels=True)
                else:
                    smp = location_samples(self.name, tap, s, zs, zt, targets, positives=True)
                assert smp.t is not None and smp.labels is not None
                per_row = self.per_sample(smp.s, smp.t, smp.labels)
                loss = reduce_samples(per_row, smp, self.sample_reduction, self.name)
                out[f"{self.name}.{tap}"] = self.weight * self.schedule() * loss
        return out

    def per_sample(self, zs: Tensor, zt: Tensor, labels: Tensor) -> Tensor:
        """``L_i`` of the class docstring for (M, K) rows with labels (M,)."""
        tau = self.tau
        ss, st = target_split(zs, labels, tau), target_split(zt, labels, tau)
        if self.target_term == "binary_kl":
            target = tau**2 * tckd(ss, st)
        else:  # NKD: no temperature on the target term
            s1, t1 = (ss, st) if tau == 1 else (target_split(zs, labels, 1.0), target_split(zt, labels, 1.0))
            target = -t1.log_py.exp() * s1.log_py
        nontarget = nckd(ss, st) if self.nontarget_form == "kl" else nontarget_ce(ss, st)
        return self.w_target * target + self.w_nontarget * tau**2 * nontarget


__all__ = [
    "AVG_FACTOR_EPS",
    "CLASS_REDUCTIONS",
    "DecoupledKD",
    "NONTARGET_FORMS",
    "TARGET_TERMS",
    "SAMPLE_REDUCTIONS",
    "Samples",
    "Split",
    "avg_factor_divisor",
    "bernoulli_kl",
    "bernoulli_kl_total",
    "box_labels",
    "check_choice",
    "label_map",
    "level_index",
    "location_samples",
    "matched_locations",
    "nckd",
    "nontarget_ce",
    "nontarget_probs",
    "pixel_samples",
    "reduce_classes",
    "reduce_samples",
    "row_chunks",
    "softmax_kl",
    "target_split",
    "tckd",
]
