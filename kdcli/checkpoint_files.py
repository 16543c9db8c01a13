"""Reading and validating weight files: safetensors, or torch checkpoints opened with
``weights_only=True``, checked for damage before anything is unpickled; state dicts unwrapped from
their training wrappers and loaded strictly.

Every problem is a one-line :class:`~kdcli.errors.ZooError` naming the file. Where the files come
from (caches, downloads, Hugging Face pins) is :mod:`kdcli.weights`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ZooError

# torch's weights_only refusal names the global it would need: "Unsupported global: GLOBAL a.b.C was not ..."
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*) was not")


def _shorten(text: str, limit: int = 160) -> str:
    """``text`` cut at a word boundary (never mid-word) with an ellipsis when it is longer than ``limit``."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:.") + "…"


def torch_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a torch checkpoint, before unpickling anything (None: it may be one).

    ``torch.save`` writes a zip archive (checked member by member, CRCs included); the legacy format
    is a bare pickle (starts with the pickle protocol byte 0x80)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            return f"damaged zip archive: {_shorten(str(err), 80)}"
        return f"damaged zip archive: member {bad} fails its CRC check" if bad else None
    if head[:1] != b"\x80":
        return "neither safetensors nor a torch checkpoint (no zip archive, no pickle)"
    return None


# -- reading ----------------------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, Tensor]:
    """safetensors, or a torch pickle opened with ``weights_only=True`` (never a full unpickle)."""
    return unwrap_state_dict(read_checkpoint(path), path)


def read_checkpoint(path: Path) -> dict:
    """The top-level object of a weights file: safetensors, or a torch pickle restricted to tensors
    and plain containers (``weights_only=True``). A pickle that needs anything else is refused,
    with the reason; kdcli never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ZooError(f"{path}: cannot read safetensors ({err})") from None
    damage = torch_file_problem(path)
    if damage:
        raise ZooError(f"{path}: corrupt file ({damage}); not a readable weights file") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad file for the user
        text = str(err)
        needed = _UNSUPPORTED_GLOBAL.search(text)
        if needed:
            raise ZooError(f"{path}: refused by torch.load(weights_only=True): it holds the Python object "
                           f"{needed.group(1)}, not only tensors and plain containers; kdcli does not unpickle "
                           "arbitrary objects - re-save its state_dict on a trusted machine") from None
        if "weights_only" in text or "Unsupported global" in text:  # a name that is no Python name: damage
            raise ZooError(f"{path}: corrupt file (torch.load found garbage where a pickled name should be)") \
                from None
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise ZooError(f"{path}: cannot read weights ({type(err).__name__}: {_shorten(first)})") from None
    if not isinstance(obj, dict):
        raise ZooError(f"{path}: not a state dict")
    return obj


def unwrap_state_dict(obj: dict, path: Path | str) -> dict[str, Tensor]:
    """A top-level ``state_dict`` entry (mmdet/mmseg, Lightning) is unwrapped; the result must map
    names to tensors."""
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ZooError(f"{path}: not a state dict ({len(bad)} entries are not tensors, e.g. {bad[0]})")
    return obj


# BatchNorm bookkeeping that torchvision checkpoints (saved from FrozenBatchNorm2d) lack.
_OPTIONAL = ("num_batches_tracked",)


def load_strict(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load every key, strictly: missing or unexpected keys and shape mismatches are errors.

    Only BatchNorm's ``num_batches_tracked`` counters may be missing (checkpoints saved from
    frozen BatchNorm do not have them) or left over (a file from trainable BatchNorm loaded into
    frozen BatchNorm).
    """
    own = module.state_dict()
    # counters of trainable BatchNorm in the file, frozen BatchNorm in the model: nothing to load
    state = {k: v for k, v in state.items() if k in own or not k.endswith(_OPTIONAL)}
    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL)]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            got, want = tuple(state[k].shape), tuple(own[k].shape)
            parts.append(f"{len(bad_shape)} of other shape (e.g. {k}: {got} vs {want})")
        raise ZooError(f"{where}: weights do not fit the model: {'; '.join(parts)}")
    module.load_state_dict(state, strict=False)
