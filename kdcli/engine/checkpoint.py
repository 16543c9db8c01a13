"""Atomic checkpoint writes and a resumable training state that survives a kill at any moment.

Weights are safetensors. The optimizer/scheduler/RNG state is our own file, written by this
process and read back with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

A resumable checkpoint is a pair of files in ``<run>/weights/``::

    last.safetensors  last_state.pt     the newest
    prev.safetensors  prev_state.pt     the one before (kept: the fallback)

The state records the size and sha256 of the tensor file it belongs to. :func:`save_checkpoint`
writes both new files to temporary names, then renames ``last → prev`` and ``tmp → last``; a kill
between any two of those steps leaves at least one state whose tensor file matches, and
:func:`load_checkpoint` takes the newest state with a matching, intact tensor file. A truncated
or corrupted file (bad safetensors header, wrong size, wrong checksum, unreadable state) is named
in the log and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from ..errors import TrainingError
from ..io import _atomic, _flat, _fsync_dir, _write_tmp

FORMAT = 2  # 1: epoch-end checkpoints without checksums (kdcli before resumable mid-epoch state); still readable
SLOTS = ("last", "prev")


def save_state(path: Path, state: dict[str, Any]) -> None:
    _atomic(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file must be named, not traced
        raise TrainingError(f"{path}: cannot read the training state ({type(err).__name__}); "
                            "the run cannot be resumed from it") from None


# -- safetensors integrity --------------------------------------------------------------------------
def safetensors_problem(data: bytes) -> str | None:
    """Why ``data`` is not a complete safetensors file (None if its header and size agree).

    Layout: 8-byte little-endian header length N, N bytes of JSON header whose ``data_offsets``
    give each tensor's byte range; the file ends exactly where the last tensor ends.
    """
    if len(data) < 8:
        return f"truncated ({len(data)} bytes, no header)"
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return f"truncated ({len(data)} bytes, header alone claims {n + 8})"
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "corrupt header"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    want = 8 + n + max(ends, default=0)
    if len(data) != want:
        return f"truncated ({len(data)} bytes, header says {want})" if len(data) < want else \
            f"{len(data) - want} trailing bytes after the last tensor"
    return None


@dataclass
class Loaded:
    """A checkpoint read back: its tensors, its state, and which slot it came from."""

    tensors: dict[str, Tensor]
    state: dict[str, Any]
    slot: str
    skipped: list[str]  # one line per damaged or mismatched file passed over


def save_checkpoint(weights_dir: Path, tensors: dict[str, Tensor], state: dict[str, Any], rotate: bool = True) -> None:
    """Write ``tensors`` + ``state`` as the newest checkpoint, keeping the previous one (see module doc).

    ``rotate=False``: the current ``last`` pair is known to be damaged (the run resumed from ``prev``);
    it is overwritten instead of becoming ``prev``, so the intact ``prev`` stays the fallback and the
    folder again holds two intact checkpoints."""
    for stale in weights_dir.glob(".last*"):  # temporaries of a write that was killed (one writer: rank 0)
        stale.unlink(missing_ok=True)
    data = save(_flat(tensors), metadata={"format": "pt"})
    state = {**state, "format": FORMAT, "tensors_sha256": hashlib.sha256(data).hexdigest(),
             "tensors_size": len(data)}
    t_tmp = _write_tmp(weights_dir / "last.safetensors", lambda tmp: Path(tmp).write_bytes(data))
    try:
        s_tmp = _write_tmp(weights_dir / "last_state.pt", lambda tmp: torch.save(state, tmp))
    except BaseException:
        os.unlink(t_tmp)
        raise
    # order matters: at every point at least one state has its matching tensor file
    for name in ("_state.pt", ".safetensors"):
        last = weights_dir / f"last{name}"
        if rotate and last.exists():
            os.replace(last, weights_dir / f"prev{name}")
    os.replace(t_tmp, weights_dir / "last.safetensors")
    os.replace(s_tmp, weights_dir / "last_state.pt")
    _fsync_dir(weights_dir)


def load_checkpoint(weights_dir: Path, tensors: bool = True) -> Loaded:
    """The newest intact checkpoint in ``weights_dir``; damaged files are skipped and reported.

    ``tensors=False`` makes the same choice (checksums included) but leaves ``Loaded.tensors`` empty:
    what a status query needs (how far a run went), without deserialising the weights."""
    skipped: list[str] = []
    states: list[tuple[str, dict[str, Any]]] = []
    for slot in SLOTS:
        p = weights_dir / f"{slot}_state.pt"
        if not p.exists():
            continue
        try:
            states.append((slot, torch.load(p, map_location="cpu", weights_only=True)))
        except Exception as err:  # noqa: BLE001 - a truncated zip, a flipped byte...
            skipped.append(f"{p.name}: unreadable ({type(err).__name__})")
    blobs: dict[str, bytes] = {}
    for slot in SLOTS:
        p = weights_dir / f"{slot}.safetensors"
        if p.exists():
            blobs[slot] = p.read_bytes()
            problem = safetensors_problem(blobs[slot])
            if problem:
                skipped.append(f"{p.name}: {problem}")
    # newest first: by optimizer step, then by epoch (format-1 states have no step)
    states.sort(key=lambda s: (int(s[1].get("step", -1)), int(s[1].get("epoch", 0))), reverse=True)
    for slot, state in states:
        want = state.get("tensors_sha256")
        if want is None:  # format 1: the pair written side by side, no checksum to match
            if slot in blobs and safetensors_problem(blobs[slot]) is None:
                return Loaded(load(blobs[slot]) if tensors else {}, state, slot, skipped)
            skipped.append(f"{slot}_state.pt: its tensor file is missing or damaged")
            continue
        for data in blobs.values():
            if len(data) == state.get("tensors_size") and hashlib.sha256(data).hexdigest() == want:
                return Loaded(load(data) if tensors else {}, state, slot, skipped)
        skipped.append(f"{slot}_state.pt: no intact tensor file matches its checksum (step {state.get('step')})")
    if not states and not blobs:
        raise TrainingError(f"--resume: no checkpoint in {weights_dir} to resume from")
    raise TrainingError(f"--resume: no intact checkpoint in {weights_dir} ({'; '.join(skipped)})")


# -- random number generators -----------------------------------------------------------------------
def module_generators(module: nn.Module | None) -> dict[str, torch.Generator]:
    """``torch.Generator`` attributes of a module tree (e.g. a method's mask generator), by path."""
    out: dict[str, torch.Generator] = {}
    if module is None:
        return out
    for prefix, m in module.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, torch.Generator):
                out[f"{prefix}.{k}" if prefix else k] = v
    return out


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA, when initialised) RNG states, plus named generators."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for k, g in (generators or {}).items():
        if k in saved:
            g.set_state(saved[k])
