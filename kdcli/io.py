"""Files: atomic writes, and reading a kdcli export's ``config.json``.

Atomic files: written to a temporary sibling, fsynced, renamed over the target, the folder fsynced.

A reader never sees a half-written file, whatever kills the writer and when. Tensors are safetensors
with their metadata keys sorted (byte-deterministic: equal weights give equal files), JSON is indented
text. The lowest layer of the package (no torch at import): every other layer writes its files through here.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ZooError

if TYPE_CHECKING:
    from torch import Tensor


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_tmp(path: Path, write: Callable[[str], Any]) -> str:
    """Write a temporary sibling of ``path`` with ``write(tmp_name)``, fsync it; returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are meant to be shared
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _atomic(path: Path, write: Callable[[str], Any]) -> None:
    tmp = _write_tmp(path, write)
    try:
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _flat(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses shared or non-contiguous storage: give it plain copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = canonical_safetensors(save(_flat(tensors), metadata=metadata))
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its metadata keys sorted: the library writes them in hash-map
    order, which changes from one process to the next, so equal weights would give different bytes.
    Tensor entries and data are left as written (their order is already deterministic)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes with trailing spaces
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


# -- kdcli export folders (config.json with the model spec) and messages that must not carry a token --
def is_kdcli_config(path: Path, where: str = "") -> bool:
    """Whether a ``config.json`` is a kdcli export's (it holds the model spec under ``model``). An
    unreadable file is an error when ``where`` names it, else simply not a kdcli config."""
    try:
        config = _read_config(path, where or str(path))
    except ZooError:
        if where:
            raise
        return False
    return isinstance(config.get("model"), dict)


def _read_config(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ZooError(f"{where}: cannot read config.json ({err})") from None
    return data if isinstance(data, dict) else {}


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


__all__ = ["canonical_safetensors", "is_kdcli_config", "load_tensors", "save_json", "save_tensors"]
