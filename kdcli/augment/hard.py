r"""HARD — hard augmentations for robust distillation (``--augment hard``; wraps any teacher method).

Paper: A. Nix, M. Burg, F. Sinz, *HARD: Hard Augmentations for Robust Distillation*, arXiv 2305.14890.
Only the abstract could be read and **no official code was found**: everything below is kdcli's own
design (HARD-Affine only, tagged [adaptation]); method page: docs/methods/hard.md.

What the paper states [abstract]: an augmentation model generates inputs on which teacher and student
*disagree*; distilling on them transfers invariances that plain KD misses; augmentors range from
spatial transformations to VAE-latent edits. kdcli implements the spatial + colour variant.

Augmentor (:mod:`kdcli.augment.ops`): a distribution over bounded affine + colour parameters,
``u = μ + exp(log σ) ⊙ ε``, ``ε ~ N(0, I)``, ``value = bound ⊙ tanh(u)`` (8 numbers per image). The
learnable state is ``μ, log σ ∈ R⁸`` (shared by all images; the noise makes each image's transform
different). It is applied consistently to images, boxes (corners → hull → clip), label maps and
instance masks (nearest).

Objective of the augmentor, every ``every`` training steps, on the current (clean) batch ``x``::

    max_{μ, log σ}  D(x̃) − λ · S(x̃),        x̃ = g(x; u)
    D(x̃) = Σ losses of the wrapped method(s) on (student(x̃), teacher(x̃))     ← teacher–student disagreement
    S(x̃) = segmentation: mean over valid pixels of KL( warp(softmax t(x)) ‖ softmax t(x̃) )  (seg_logits)
           detection:    Σ_FPN levels ‖t(x̃) − warp(t(x))‖² / ‖warp(t(x))‖²  over valid positions, ÷ levels

``S`` keeps the teacher's prediction stable: its output on the augmented image must match its output on the
clean image moved by the same affine (dense outputs are equivariant targets), so the augmentor cannot win by
destroying the image (without that constraint the augmentor wins trivially). ``D`` is the wrapped method's own
loss (CWD, KD, FGD...): the augmentor looks for exactly what the student is being taught to match — this is
what makes ``--augment hard`` wrap *any* method. (A fixed task discrepancy — binary KD + box KD / pixel KL —
would also do; using the method's loss is our choice.)

Student training: in every step a ``fraction`` of the batch's images (chosen at random, exactly
``round(fraction · N)``) is replaced by augmented samples drawn from the current distribution (no
gradient to the augmentor); the others stay bit for bit. Ground-truth task losses and the method's losses
are then computed on the mixed batch as usual.

Optimiser (the choice the engine needed): the augmentor's ``μ, log σ`` are **buffers, not
``nn.Parameter``\ s**, so the student's optimiser (which collects parameters) can never see them. They are
updated by the augmentor's own Adam (β = 0.9, 0.999; moments and step count are buffers too) doing
*ascent* on the objective above via ``torch.autograd.grad`` with respect to them alone (no gradient is
accumulated in the student's, the teacher's or the method's parameters). Everything is attached to the
run's method set as the submodule ``augment``, so it is saved in ``last.safetensors`` (``method.augment.*``)
and resumes with the run. ``μ`` is clamped to [−3, 3] (tanh is saturated beyond) and ``log σ`` to
[log 0.05, log 2].

In DDP each rank runs the ascent on its own batch and the 16 gradient numbers are averaged over ranks,
so the augmentor's state stays identical everywhere.

Cost per ascent step: one no-grad teacher forward on x, one teacher and one student forward + backward to
the input on x̃. During the ascent the student runs in train mode with its BatchNorm running statistics
frozen (momentum 0, counters restored), so the extra forward does not change the model.

Assumptions / limits: hyper-parameters are untuned defaults (no numbers to reproduce); keypoint targets are
refused; methods whose forward updates internal state (none of kdcli's teacher methods) would see one extra
call per ascent step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..methods.base import coerce
from ..runtime import autocast_ctx
from .ops import PARAMS, Bounds, apply, mix, squash, warp

if TYPE_CHECKING:
    from ..models.base import Batch

HARD_DEFAULTS: dict[str, Any] = {
    "fraction": 0.5,  # share of each batch replaced by augmented samples
    "every": 4,  # augmentor ascent step every k training steps (a useful range: k ≈ 4-10)
    "lr": 0.05,  # the augmentor's Adam step size
    "stability": 1.0,  # λ: weight of the teacher-stability penalty
    "sigma": 0.5,  # initial noise scale in raw (pre-tanh) space
    "min_visible": 0.3,  # a box is kept when at least this share of its transformed hull stays in the image
    "rotate": 15.0,
    "scale": 0.2,
    "shift": 0.1,
    "shear": 0.1,
    "brightness": 0.2,
    "contrast": 0.2,
    "saturation": 0.2,
}
_BETAS = (0.9, 0.999)
_MU_MAX = 3.0
_LOG_SIGMA = (math.log(0.05), math.log(2.0))


def resolve_options(overrides: dict[str, Any]) -> dict[str, Any]:
    """HARD_DEFAULTS updated with ``--set hard.key=value`` (keys given without the ``hard.`` prefix)."""
    opts = dict(HARD_DEFAULTS)
    for key, value in overrides.items():
        if key not in opts:
            raise ConfigError(f"--set hard.{key}: --augment hard has no such option "
                              f"(valid: {', '.join(sorted(opts))})")
        opts[key] = coerce(value, opts[key], f"--set hard.{key}")
    if not 0.0 <= float(opts["fraction"]) <= 1.0:
        raise ConfigError(f"--set hard.fraction: expected a share in [0, 1] (got {opts['fraction']})")
    if int(opts["every"]) < 1:
        raise ConfigError(f"--set hard.every: expected >= 1 (got {opts['every']})")
    for key in ("lr", "stability", "sigma", "min_visible"):
        if not float(opts[key]) >= 0:
            raise ConfigError(f"--set hard.{key}: expected a number >= 0 (got {opts[key]})")
    return opts


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode forward without touching BatchNorm running statistics (momentum 0, counters restored)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, count) in zip(bns, saved, strict=True):
            m.momentum = mom
            if count is not None and m.num_batches_tracked is not None:  # saved only where it exists
                m.num_batches_tracked.copy_(count)


def _valid(region: Tensor, theta: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, 1, h, w) positions inside the image that sample from inside the image, at a map's size."""
    r = F.interpolate(region, size=size, mode="bilinear", align_corners=False)
    return ((warp(r, theta) > 0.5) & (r > 0.5)).to(region.dtype)


def stability(task: str, t_aug: dict[str, Tensor], t_clean: dict[str, Tensor], theta: Tensor,
              region: Tensor) -> Tensor:
    """``S`` of the module docstring: how far the teacher's output on x̃ is from its moved clean output."""
    with torch.autocast(device_type=theta.device.type, enabled=False):  # a loss: float32 (see module doc)
        return _stability(task, t_aug, t_clean, theta.float(), region.float())


def _stability(task: str, t_aug: dict[str, Tensor], t_clean: dict[str, Tensor], theta: Tensor,
               region: Tensor) -> Tensor:
    if task == "segmentation":
        za, zc = t_aug["seg_logits"].float(), t_clean["seg_logits"].float()
        valid = _valid(region, theta, (za.shape[-2], za.shape[-1]))
        ref = warp(F.softmax(zc, 1), theta).clamp_min(1e-12)
        ref = ref / ref.sum(1, keepdim=True)
        kl = (ref * (ref.log() - F.log_softmax(za, 1))).sum(1, keepdim=True)
        return (kl * valid).sum() / valid.sum().clamp(min=1)
    levels = [k for k, v in t_aug.items() if k[:1] == "p" and k[1:2].isdigit() and v.dim() == 4]
    if not levels:
        raise ConfigError("--augment hard: the teacher exposes no FPN level for the stability term")
    total = theta.new_zeros(())
    for k in levels:
        fa, fc = t_aug[k].float(), t_clean[k].float()
        valid = _valid(region, theta, (fa.shape[-2], fa.shape[-1]))
        ref = warp(fc, theta)
        total = total + ((fa - ref) ** 2 * valid).sum() / ((ref**2) * valid).sum().clamp(min=1e-12)
    return total / len(levels)


def stability_taps(task: str, teacher_taps: dict[str, Any]) -> set[str]:
    if task == "segmentation":
        return {"seg_logits"}
    return {k for k, i in teacher_taps.items() if k[:1] == "p" and k[1:2].isdigit() and getattr(i, "stride", None)}


class HardAugment(nn.Module):
    """The augmentor's state and its ascent step (module docstring). Not a loss: returns batches."""

    # buffers (saved with the run), registered in __init__
    mu: Tensor
    log_sigma: Tensor
    adam_m: Tensor
    adam_v: Tensor
    adam_t: Tensor
    steps: Tensor
    last_gap: Tensor
    last_stability: Tensor

    def __init__(self, task: str, overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.task = task
        self.opts = resolve_options(dict(overrides or {}))
        o = self.opts
        self.bounds = Bounds(rotate=float(o["rotate"]), scale=float(o["scale"]), shift=float(o["shift"]),
                             shear=float(o["shear"]), brightness=float(o["brightness"]),
                             contrast=float(o["contrast"]), saturation=float(o["saturation"]))
        self.bounds.check()
        k = len(PARAMS)
        self.register_buffer("mu", torch.zeros(k))
        sigma = min(max(float(o["sigma"]), math.exp(_LOG_SIGMA[0])), math.exp(_LOG_SIGMA[1]))
        self.register_buffer("log_sigma", torch.full((k,), math.log(sigma)))
        self.register_buffer("adam_m", torch.zeros(2, k))
        self.register_buffer("adam_v", torch.zeros(2, k))
        self.register_buffer("adam_t", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_gap", torch.zeros(()))
        self.register_buffer("last_stability", torch.zeros(()))
        self._models: tuple[Any, Any, Any] | None = None  # not submodules: never saved or optimised here
        self.amp = "none"

    def bind(self, student: nn.Module, teacher: nn.Module, method: Any, amp: str = "none") -> None:
        """The models and the wrapped method set (kept as plain references, not submodules)."""
        self.__dict__["_models"] = (student, teacher, method)
        self.amp = amp

    @property
    def models(self) -> tuple[Any, Any, Any]:
        if self._models is None:
            raise ConfigError("--augment hard: the augmentor was not bound to the student and teacher")
        return self._models

    # -- sampling -------------------------------------------------------------------------------
    def values(self, n: int, mu: Tensor | None = None, log_sigma: Tensor | None = None,
               noise: Tensor | None = None) -> Tensor:
        """``(n, 8)`` bounded transform values drawn from the current distribution."""
        mu = self.mu if mu is None else mu
        log_sigma = self.log_sigma if log_sigma is None else log_sigma
        eps = torch.randn(n, mu.numel(), device=mu.device) if noise is None else noise
        return squash(mu + log_sigma.exp() * eps, self.bounds)

    def step(self, batch: Batch) -> Batch:
        """One training step's batch: ascent every ``every`` steps, then mix in augmented samples."""
        if self.training and int(self.steps) % int(self.opts["every"]) == 0 and float(self.opts["lr"]) > 0:
            self.ascent(batch)
        if self.training:
            self.steps += 1
        n = batch.images.shape[0]
        k = int(round(float(self.opts["fraction"]) * n))
        if k == 0:
            return batch
        with torch.no_grad():
            vals = self.values(n)
            chosen = torch.zeros(n, dtype=torch.bool, device=batch.images.device)
            chosen[torch.randperm(n, device=batch.images.device)[:k]] = True
            aug = apply(batch, vals, float(self.opts["min_visible"]))
            return mix(batch, aug, chosen)

    # -- the augmentor's objective ---------------------------------------------------------------
    def objective(self, batch: Batch, values: Tensor) -> tuple[Tensor, Tensor]:
        """``(D, S)`` on the batch augmented with ``values`` (gradients flow to ``values``)."""
        student, teacher, method = self.models
        aug = apply(batch, values, float(self.opts["min_visible"]))
        aug_batch = replace(batch, images=aug.images, targets=aug.targets)
        stab = stability_taps(self.task, getattr(teacher, "tap_info", {}))
        need = set(getattr(method, "needs", ())) | stab
        with torch.no_grad():
            t_clean = teacher(batch, need=need, losses=False)
        t_aug = teacher(aug_batch, need=need, losses=False)
        with frozen_bn_stats(student):
            # "head": the student's own assignment and box decoding (extras), which logit methods read
            needs = set(getattr(method, "needs", ()))
            s_aug = student(aug_batch, need=needs | {"head"} if needs else None, losses=False)
        losses = method(s_aug, t_aug, aug.targets)
        gap = sum((v.float() for v in losses.values()), values.new_zeros(()))
        stab_value = stability(self.task, t_aug.taps, t_clean.taps, aug.theta, aug.region)
        return gap, stab_value

    def ascent(self, batch: Batch) -> None:
        """One Adam *ascent* step on ``D − λ·S`` with respect to ``μ`` and ``log σ`` only."""
        mu = self.mu.detach().clone().requires_grad_(True)
        log_sigma = self.log_sigma.detach().clone().requires_grad_(True)
        n = batch.images.shape[0]
        with torch.enable_grad(), autocast_ctx(batch.images.device, self.amp):
            vals = self.values(n, mu, log_sigma)
            gap, stab = self.objective(batch, vals)
            obj = gap.float() - float(self.opts["stability"]) * stab.float()
            grads = torch.autograd.grad(obj, [mu, log_sigma], allow_unused=True)
        g = torch.stack([gr if gr is not None else torch.zeros_like(mu) for gr in grads]).detach()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # one shared augmentor: average the 16 gradient numbers so every rank takes the same step
            torch.distributed.all_reduce(g)
            g = g / torch.distributed.get_world_size()
        with torch.no_grad():
            if not torch.isfinite(g).all():
                return  # a degenerate batch (e.g. no valid pixel) must not poison the state
            self.adam_t += 1
            t = int(self.adam_t)
            b1, b2 = _BETAS
            self.adam_m.mul_(b1).add_(g, alpha=1 - b1)
            self.adam_v.mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = self.adam_m / (1 - b1**t)
            v_hat = self.adam_v / (1 - b2**t)
            upd = float(self.opts["lr"]) * m_hat / (v_hat.sqrt() + 1e-8)
            self.mu.add_(upd[0]).clamp_(-_MU_MAX, _MU_MAX)  # ascent: + gradient direction
            self.log_sigma.add_(upd[1]).clamp_(*_LOG_SIGMA)
            self.last_gap.fill_(float(gap))
            self.last_stability.fill_(float(stab))


__all__ = ["HARD_DEFAULTS", "HardAugment", "frozen_bn_stats", "resolve_options", "stability", "stability_taps"]
