"""Mask statistics logged during training: the ``mask/...`` columns of ``results.csv``.

Every :data:`EVERY`-th training micro-step :class:`MaskMonitor` (a run callback) takes the step's student
and teacher outputs and calls the method's :meth:`~kdcli.methods.base.Method.internals` under
``torch.no_grad()``, with every random stream forked (the global CPU and CUDA
generators and the method's own ``torch.Generator`` attributes): training draws the same random numbers
with or without the statistics, so results and resumes are unchanged by them. For every internal map whose
name ends in ``mask`` (shape (N, L...) or (N, K, L...)) it records

- ``mean``: the mean value of the mask;
- ``entropy``: the Shannon entropy of each mask seen as a distribution over its positions (or channels),
  divided by log(positions): 1 for a flat mask, 0 for a mask on a single position; mean over images and masks;
- ``dice``: for K ≥ 2 masks per image (ACAM's M masks, MasKD's tokens, SAMKD's grids), the mean over ordered
  pairs i ≠ j of 2⟨m_i, m_j⟩ / (‖m_i‖² + ‖m_j‖²), as MasKD's diversity term: 1 for identical masks, so a
  collapse of every mask onto the same region shows as a dice near 1.

:meth:`MaskMonitor.epoch_columns` returns the averages over the epoch's samples as ``mask/<method>.<tap>.<map>.<stat>``
and starts a new epoch. The statistics are a side record: they are never returned as loss terms (the
engine sums every term a method returns into the loss).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..methods import MethodSet
from .callbacks import Callback

if TYPE_CHECKING:
    from .build import Run

EVERY = 20  # micro-steps between two samples (the first step of every epoch's run is sampled)


def mask_statistics(name: str, mask: Tensor) -> dict[str, Tensor]:
    """``{name.mean, name.entropy[, name.dice]}`` of a mask (N, L...) or (N, K, L...) (0-d tensors).

    A 2-d mask (N, L) (a channel mask) or 3-d (N, H, W) is one mask per image; 4-d (N, K, H, W) and the
    (N, K, C) channel masks named ``channel_mask`` hold K masks per image."""
    m = mask.detach().float().clamp_min(0)
    n = m.shape[0]
    multi = m.dim() == 4 or (m.dim() == 3 and name.endswith("channel_mask"))
    x = m.reshape(n, m.shape[1], -1) if multi else m.reshape(n, 1, -1)  # (N, K, L)
    out = {f"{name}.mean": m.mean()}
    length = x.shape[-1]
    if length > 1:
        p = x / x.sum(-1, keepdim=True).clamp_min(1e-12)
        out[f"{name}.entropy"] = (-torch.special.xlogy(p, p).sum(-1) / math.log(length)).mean()
    k = x.shape[1]
    if k > 1:
        gram = x @ x.transpose(1, 2)  # (N, K, K)
        sq = gram.diagonal(dim1=1, dim2=2)
        dice = 2 * gram / (sq.unsqueeze(2) + sq.unsqueeze(1)).clamp_min(1e-12)
        off = ~torch.eye(k, dtype=torch.bool, device=x.device)
        out[f"{name}.dice"] = dice[:, off].mean()
    return out


@contextmanager
def forked_random_streams(module: Any, device: torch.device | None = None):
    """Run a block without moving any random stream: global CPU/CUDA and the module's own generators."""
    from .checkpoint import module_generators

    gens = module_generators(module)
    saved = {k: g.get_state() for k, g in gens.items()}
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for k, g in gens.items():
                g.set_state(saved[k])


class MaskStats:
    """Running sums of one run's mask statistics; disables itself for a method without mask internals."""

    def __init__(self, method: Any, device: torch.device | None = None, every: int = EVERY) -> None:
        self.method, self.device, self.every = method, device, max(1, every)
        self.calls = 0
        self.enabled = method is not None
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def sample(self, s_out: Any, t_out: Any, targets: Any) -> dict[str, float]:
        """The statistics of one step's outputs (forked random streams, no gradient).

        The method's mode is left alone (a method set can hold the student, e.g. PS-KD's snapshot or HARD's
        augmentor); :meth:`~kdcli.methods.base.Method.internals` must not update any state itself."""
        with forked_random_streams(self.method, self.device), torch.no_grad():
            maps = self.method.internals(s_out, t_out, targets)
        stats: dict[str, Tensor] = {}
        for name, value in maps.items():
            if name.endswith("mask") and isinstance(value, Tensor) and value.dim() >= 2:
                stats.update(mask_statistics(name, value))
        if not stats:
            return {}
        values = torch.stack([v.float().reshape(()) for v in stats.values()]).tolist()  # one device sync
        return dict(zip(stats.keys(), values, strict=True))

    def observe(self, s_out: Any, t_out: Any, targets: Any) -> None:
        if not self.enabled or t_out is None or s_out is None:
            return
        self.calls += 1
        if (self.calls - 1) % self.every:
            return
        values = self.sample(s_out, t_out, targets)
        if not values and not self.sums:
            self.enabled = False  # no mask among the method's internals: never look again
            return
        for k, v in values.items():
            if math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "enabled": self.enabled, "sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls, self.enabled = int(state["calls"]), bool(state["enabled"])
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])

    def pop(self) -> dict[str, float]:
        out = {f"mask/{k}": round(v / self.counts[k], 6) for k, v in self.sums.items() if self.counts.get(k)}
        self.sums, self.counts = {}, {}
        return out


class MaskMonitor(Callback):
    """The ``mask/...`` columns as a run callback: samples every :data:`EVERY` micro-steps, keeps its
    sampling position and the epoch's running sums in the checkpoint (``mask_stats``), so that a resumed
    run samples the same steps and writes the same columns as an uninterrupted one."""

    state_key = "mask_stats"

    def __init__(self) -> None:
        self.stats: MaskStats | None = None
        self.warned: set[str] = set()

    def _stats(self, run: Run) -> MaskStats:
        if self.stats is None:
            self.stats = MaskStats(run.method, run.device)
        return self.stats

    def on_step(self, run: Run, s_out: Any, t_out: Any, targets: Any) -> None:
        self._stats(run).observe(s_out, t_out, targets)

    def epoch_columns(self, run: Run) -> dict[str, Any]:
        """The epoch's ``mask/...`` averages; empty when nothing was sampled."""
        return self.stats.pop() if self.stats is not None else {}

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        """The method's own reading of its statistics (e.g. ACAM's collapsed masks), each warning once."""
        if not isinstance(run.method, MethodSet):
            return
        columns = {k: float(v) for k, v in row.items() if k.startswith("mask/")}
        for key, message in run.method.stat_warnings(columns).items():
            if key not in self.warned:
                self.warned.add(key)
                run.log(f"warning: {message}")

    def state_dict(self, run: Run) -> dict[str, Any]:
        return self._stats(run).state_dict()

    def load_state_dict(self, run: Run, state: dict[str, Any] | None) -> None:
        if state:  # checkpoints written before mask statistics were saved have none
            self._stats(run).load_state_dict(state)
