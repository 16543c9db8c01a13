"""``--keep best|last|all``: what a finished run folder keeps of its weights.

- ``all``: everything (the newest and the fallback resumable checkpoint, best weights);
- ``last``: the newest resumable checkpoint and the best weights (the fallback is for a kill
  during a write, which a finished run no longer risks);
- ``best``: ``weights/best.safetensors`` and the records only; the run can no longer be resumed or
  extended. Without a best file (no evaluation scored) nothing is removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import ConfigError

KEEP = ("best", "last", "all")


def check_keep(keep: str) -> None:
    if keep not in KEEP:
        raise ConfigError(f"--keep {keep}: expected one of {', '.join(KEEP)}")


def prune(folder: Path, keep: str) -> list[Path]:
    """Remove what ``keep`` does not keep from a finished run; returns the removed paths."""
    check_keep(keep)
    weights = folder / "weights"
    doomed: list[Path] = []
    if keep in ("last", "best"):
        doomed += [weights / "prev.safetensors", weights / "prev_state.pt"]
    if keep == "best":
        if not (weights / "best.safetensors").is_file():
            return []
        doomed += [weights / "last.safetensors", weights / "last_state.pt", folder / "last"]
    removed = []
    for p in doomed:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(p)
    return removed
