"""Distributed data parallel (torchrun), and data loading that resumes exactly.

Process model (one process per GPU, or per CPU worker with gloo)::

    torchrun --nproc_per_node N [--nnodes M --rdzv-endpoint host:port] -m kdcli distill ...
    kdcli distill --nproc N ...          # the same on one machine (re-launches via torch.distributed.run)
    kdcli distill --devices 0,1,2,3 ...  # CUDA_VISIBLE_DEVICES=0,1,2,3 and N = 4

What is wrapped: :class:`~kdcli.engine.step.DistillStep`, one small module holding the student and the method (its
adapters, generators, masks), goes into a single ``DistributedDataParallel``, so one reducer
averages the gradients of both. The teacher is built in every rank from its id, frozen, and never
wrapped. ``find_unused_parameters=True``: some methods leave parts without gradient on some steps
(a warm-up, a mask that selects nothing, a tap a loss skips); DDP then marks them ready instead of
waiting for them forever. The forward returns only the loss terms, so "used" means "reaches a loss".

Everything the methods see comes from the unwrapped student (``Run.student``, a ``TapModel``):
taps are produced by its forward, never looked up by module name, so DDP's ``module.`` prefix
cannot reach them; hooks (``on_epoch_end``) and checkpoints also get the unwrapped modules.

Data: :class:`EpochSampler` is a ``DistributedSampler`` (shuffle from ``seed + epoch``, one shard
per rank) that yields ``(epoch, index)`` pairs and can start part-way into an epoch;
:class:`SeededDataset` seeds every sample's augmentation from ``(seed, epoch, index)``. A sample is
therefore augmented the same way whatever the worker count, the rank that loads it, or a resume
that skipped the batches before it.
"""

from __future__ import annotations

import inspect
import itertools
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..errors import ConfigError
from ..runtime import pick_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank, backend and the device it uses."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""  # "" when not distributed
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return bool(self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def init(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), or use one already initialised.

    Backend: nccl for CUDA devices, gloo for CPU. A single process without torchrun gets
    ``DistInfo()`` with ``enabled == False`` (no DDP wrapping, no collectives).
    """
    global _OWNED
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not tdist.is_available() or (world <= 1 and not tdist.is_initialized()):
        return DistInfo(device=pick_device(device, 0))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and not tdist.is_nccl_available():
            backend = "gloo"
        tdist.init_process_group(backend=backend, device_id=dev if backend == "nccl" else None)
        _OWNED = True
    return DistInfo(tdist.get_rank(), tdist.get_world_size(), local_rank, str(tdist.get_backend()), dev)


_OWNED = False  # init() created the process group (a caller's own group is left to the caller)


def finish(info: DistInfo, ok: bool) -> None:
    """Leave the process group :func:`init` created: after a barrier when the run ended normally.

    A process that exits with its gloo group alive can abort in the group's destructor
    ("terminate called without an active exception") while a peer still talks to it; the barrier
    makes the ranks leave together. After an error no barrier: the peers may never reach it."""
    global _OWNED
    if not (_OWNED and tdist.is_available() and tdist.is_initialized()):
        return
    if ok:
        barrier(info)
    tdist.destroy_process_group()
    _OWNED = False


# -- collectives (no-ops when not distributed) ------------------------------------------------------
# Objects cross ranks as torch.save/torch.load(weights_only=True): plain values and tensors, no pickle.
# Older torch releases lack the argument (and unpickle); pass it wherever the installed torch has it.
_SAFE: dict[str, Any] = (
    {"weights_only": True}
    if tdist.is_available() and "weights_only" in inspect.signature(tdist.broadcast_object_list).parameters
    else {}
)
def _comm_device(info: DistInfo) -> torch.device:
    return info.device if info.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    if not info.enabled:
        return t
    x = t.to(_comm_device(info))
    tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x.to(t.device)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, **_SAFE)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    tdist.all_gather_object(out, obj, **_SAFE)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        tdist.barrier()


@torch.no_grad()
def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, as DDP does before each forward."""
    if not info.enabled:
        return
    dev = _comm_device(info)
    for b in module.buffers():
        x = b.to(dev)
        tdist.broadcast(x, src=0)
        b.copy_(x)


@torch.no_grad()
def average_bn_statistics(module: nn.Module, info: DistInfo) -> None:
    """Average BatchNorm running mean/var over ranks after :func:`~kdcli.engine.bn.recalibrate_bn`.

    Recalibration takes a plain average over n batches per rank; the mean of the ranks' averages is
    the plain average over all n × world batches.
    """
    if not info.enabled:
        return
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for b in (m.running_mean, m.running_var):
                if b is not None:
                    b.copy_(all_reduce_sum(b.float(), info).to(b.dtype) / info.world)


# -- the module DDP wraps -----------------------------------------------------------------------------
def wrap(step: nn.Module, info: DistInfo) -> nn.Module:
    """DDP over the student + method (see module docstring); the module itself when not distributed."""
    if not info.enabled:
        return step
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(step, device_ids=ids, find_unused_parameters=True)


def convert_sync_bn(student: nn.Module, info: DistInfo) -> nn.Module:
    """``--sync-bn``: BatchNorm statistics over the global batch (CUDA only, as in PyTorch)."""
    if info.device.type != "cuda":
        raise ConfigError("--sync-bn: PyTorch's SyncBatchNorm runs on CUDA only; drop --sync-bn on CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(student)


# -- data ---------------------------------------------------------------------------------------------
def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch/NumPy/Python RNGs for one sample, then put the caller's states back.

    With ``workers=0`` samples load in the training process: its RNG streams (dropout, method
    masks) must not depend on how many samples were loaded, or a resume that skips batches would
    see different streams.
    """
    t, p, n = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also reseed every CUDA generator
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(t)
        random.setstate(p)
        np.random.set_state(n)


class SeededDataset(Dataset):
    """``dataset[(epoch, i)]`` = ``base[i]`` with its random augmentation seeded from ``(seed, epoch, i)``."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with isolated_rng(_sample_seed(self.seed, epoch, index)):
            return self.base[index]

    def __getattr__(self, name: str) -> Any:
        # Forward ``classes``, ``ann_file``...; guard against recursion while unpickling in workers.
        if name in ("base", "seed") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(epoch, index)``; ``set_epoch(e, skip)`` starts after ``skip`` samples.

    Shuffling is a permutation drawn from ``seed + epoch`` (as ``DistributedSampler``); rank r takes
    positions r, r + world, ... of it. ``skip`` is counted in this rank's samples (batches consumed
    × batch size), so a resumed epoch continues with exactly the batches it had not seen.
    """

    def __init__(self, dataset: Dataset, world: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        for i in itertools.islice(super().__iter__(), self.skip, None):
            yield (epoch, int(i))

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class ShardSampler(Sampler[int]):
    """Evaluation shard of rank r: indices r, r + world, ... (no padding: no image is scored twice)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EvalShard:
    """How :func:`~kdcli.engine.evaluate_model.evaluate_model` merges a sharded evaluation.

    Detection: every rank's COCO results go to rank 0, ordered by the data set's image order (the
    order a single process would produce), and rank 0 scores them; segmentation: confusion matrices
    are summed over ranks. The metrics are then broadcast so every rank takes the same decisions.
    """

    def __init__(self, info: DistInfo, dataset: Any) -> None:
        self.info = info
        ids = getattr(dataset, "ids", None)
        self.position = {int(i): p for p, i in enumerate(ids)} if ids is not None else {}

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def gather_detections(self, results: list[dict], ids: list[int]) -> tuple[list[dict], list[int]]:
        """All ranks' results on rank 0 (empty lists elsewhere), in single-process order."""
        parts: list[Any] = [(results, ids)]
        if self.info.enabled:
            parts = [None] * self.info.world if self.info.is_main else []
            tdist.gather_object((results, ids), parts if self.info.is_main else None, dst=0, **_SAFE)
            if not self.info.is_main:
                return [], []
        all_ids = sorted({i for _, part in parts for i in part}, key=lambda i: self.position.get(i, i))
        pos = {i: p for p, i in enumerate(all_ids)}
        merged = sorted((r for part, _ in parts for r in part), key=lambda r: pos[int(r["image_id"])])
        return merged, all_ids

    def reduce_confusion(self, mat: Tensor) -> Tensor:
        return all_reduce_sum(mat, self.info)

    def share(self, metrics: dict[str, Any] | None) -> dict[str, Any]:
        return broadcast_object(metrics, self.info)


# -- launching ------------------------------------------------------------------------------------------
LAUNCH_FLAGS = ("--nproc", "--devices")


def strip_launch_flags(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--devices LIST`` (either spelling ``--x v`` or ``--x=v``)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in LAUNCH_FLAGS:
            skip = True
            continue
        if a.split("=", 1)[0] in LAUNCH_FLAGS and "=" in a:
            continue
        out.append(a)
    return out


def launch_plan(nproc: int | None, devices: str | None) -> tuple[int, dict[str, str]]:
    """Number of processes and extra environment for ``--nproc`` / ``--devices``."""
    env: dict[str, str] = {}
    n = nproc or 0
    if devices:
        ids = [d.strip() for d in devices.split(",") if d.strip()]
        if not ids or not all(d.isdigit() for d in ids):
            raise ConfigError(f"--devices {devices}: expected CUDA device numbers, e.g. 0,1,2,3")
        if not torch.cuda.is_available():
            raise ConfigError(f"--devices {devices}: CUDA is not available here; use --nproc N for CPU processes")
        if nproc and nproc != len(ids):
            raise ConfigError(f"--nproc {nproc} and --devices {devices} disagree; give one of them")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        n = len(ids)
    if n < 1:
        raise ConfigError(f"--nproc {nproc}: expected a number of processes >= 1")
    return n, env


def launch(nproc: int | None, devices: str | None, argv: list[str]) -> int:
    """Run ``python -m kdcli <argv>`` under ``torch.distributed.run`` on this machine; returns its exit code.

    ``--standalone`` picks a free local rendezvous port. SIGINT reaches the workers through the
    terminal's process group; a SIGTERM sent to this process is passed on to torchrun, which passes
    it to the workers: they save a checkpoint and stop (see :mod:`kdcli.engine.guards`). torchrun's
    stderr goes through :class:`LauncherStderr`, which replaces the launcher's own traceback for that
    signal by one line; everything else (the workers' output, real errors) passes unchanged.
    """
    import threading

    n, env = launch_plan(nproc, devices)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "kdcli", *strip_launch_flags(argv)]
    child = subprocess.Popen(cmd, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True, bufsize=1)
    filt = LauncherStderr(sys.stderr)
    pump = threading.Thread(target=lambda: [filt.feed(line) for line in child.stderr or ()], daemon=True)
    pump.start()

    def forward(signum: int, _frame: Any) -> None:
        child.send_signal(signum)

    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the workers get Ctrl-C themselves
    old_term = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
        pump.join(timeout=10)
        filt.close()
        return code
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


class LauncherStderr:
    """torchrun's stderr with its own traceback for a signal (``SignalException``: it was asked to stop,
    nothing failed) replaced by one line. A traceback block is held until its last line tells what it
    is; any other block, and every other line, is written as it came."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.block: list[str] = []

    def feed(self, line: str) -> None:
        if self.block:
            self.block.append(line)
            if line.startswith((" ", "\t")) or not line.strip():
                return  # frames and source lines of the traceback
            if "SignalException" in line:  # "...SignalException: Process 123 got signal: 15"
                sig = line.rsplit("signal:", 1)[-1].strip()
                self.out.write(f"launcher: stopped by signal {sig} (the ranks' own line above says what they kept)\n")
            elif line.startswith(("Traceback", "During handling")):
                return
            else:
                self.out.writelines(self.block)
            self.block = []
            self.out.flush()
            return
        if line.startswith("Traceback (most recent call last):"):
            self.block = [line]
            return
        self.out.write(line)
        self.out.flush()

    def close(self) -> None:
        if self.block:
            self.out.writelines(self.block)
            self.block = []
        self.out.flush()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or _env_int("WORLD_SIZE", 1) > 1
