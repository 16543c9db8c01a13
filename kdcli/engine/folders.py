"""The run folder: ``--out`` or a numbered default, whether a run already lives there, whether it can be
written, and which write errors mean the folder refuses bytes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError
from . import checkpoint as ckpt


def run_folder(cfg: RunConfig) -> Path:
    """The run folder: ``--out``, else the first free ``runs/<task>/<name>[-N]`` (:func:`default_run_folder`)."""
    if cfg.out:
        return Path(cfg.out)
    from ..zoo import resolve_ref

    return default_run_folder(cfg, resolve_ref(cfg.model).spec.task)


def existing_run(folder: Path) -> str | None:
    """What in ``folder`` shows that a run already lives there (None: free for a fresh start): its
    config.json, a checkpoint of any kind, or results.csv. A run that died before its first checkpoint
    still left config.json, and a fresh start over it would let ``--resume`` mix two runs."""
    marks = ["config.json", "results.csv", *(f"weights/{s}{x}" for s in (*ckpt.SLOTS, "best")
                                            for x in (".safetensors", "_state.pt"))]
    found = [m for m in marks if (folder / m).exists()]
    return ", ".join(found) if found else None


def check_writable(folder: Path) -> None:
    """``--out`` can be written (its nearest existing folder takes a new file), checked before the
    data and the models are loaded so that a read-only place fails in a second, not after the setup."""
    import tempfile

    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {folder}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".kdcli-probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"--out {folder}: cannot write in {probe} ({err.strerror or err})") from None


def _ref_name(ref: str) -> str:
    return ref.rstrip("/").replace(":", "/").split("/")[-1].split("@")[0]


def default_run_folder(cfg: RunConfig, task: str, root: Path = Path("runs")) -> Path:
    """``runs/<task>/<name>``, ``<name>-2``, ``<name>-3``, ... (the first not yet there, as Ultralytics
    numbers its runs): ``<name>`` is ``[<method>-]<model>[-from-<teacher>]``."""
    name = (f"{cfg.method.replace('+', '-')}-" if cfg.method else "") + _ref_name(cfg.model)
    if cfg.teacher:
        name += f"-from-{_ref_name(cfg.teacher)}"
    base = root / task / name
    folder, i = base, 1
    # taken: it holds a run, or anything but the lock file a failed start leaves behind (runlock.py)
    while folder.exists() and (existing_run(folder) or any(p.name != ".lock" for p in folder.iterdir())):
        i += 1
        folder = base.with_name(f"{name}-{i}")
    return folder


# errno values that mean the run folder cannot take more bytes, whatever file was being written
_NO_SPACE = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def write_failure(err: BaseException, folder: Path) -> str | None:
    """One line for an error that is the run folder refusing a write (full disk, read-only, quota,
    permissions), else None. ``torch.save`` reports a failed write as a RuntimeError of its zip writer."""
    if isinstance(err, OSError):
        where = str(getattr(err, "filename", "") or "")
        ours = where.startswith(str(folder)) or not where
        if err.errno in _NO_SPACE or (err.errno in (errno.EACCES, errno.EPERM) and ours):
            return f"{err.strerror or os.strerror(err.errno or 0)}" + (" - disk full?" if err.errno == errno.ENOSPC
                                                                      else "")
        return None
    text = str(err)
    if "PytorchStreamWriter" in text or "inline_container" in text or "file write failed" in text:
        return "the checkpoint writer failed (disk full or read-only?)"
    return None
