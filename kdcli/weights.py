"""Weight sources → local files → state dicts. Reads caches only; never downloads.

Sources: ``torchvision:<Enum>.<MEMBER>`` (the torch hub cache, as torchvision stores it),
``hf-hub:org/repo[@revision]`` (the Hugging Face cache), ``url:https://...#sha256=...``
(``$KDCLI_HOME/weights``), or a local ``.safetensors``/``.pth`` path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from .errors import ZooError


def kdcli_home() -> Path:
    return Path(os.environ.get("KDCLI_HOME", Path.home() / ".cache" / "kdcli"))


def _torchvision_url(source: str) -> str:
    from torchvision.models import get_weight

    try:
        return get_weight(source).url
    except (ValueError, KeyError, AttributeError):
        raise ZooError(f"weights '{source}': not a torchvision weights enum member") from None


def cached_file(source: str, model_name: str = "") -> Path:
    """Local path of a weight source, or a one-line error naming the missing file."""
    # kdcli never downloads here; `kdcli zoo fetch` is planned (see the issue on real weights)
    fetch = f" (place the file there for '{model_name}'; kdcli does not download)" if model_name else ""
    kind, _, rest = source.partition(":")
    if kind == "torchvision":
        url = _torchvision_url(rest)
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    elif kind == "hf-hub":
        from huggingface_hub import try_to_load_from_cache

        repo, _, rev = rest.partition("@")
        found = None
        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, fname, revision=rev or None)
            if isinstance(hit, str):
                found = Path(hit)
                break
        if found is None:
            raise ZooError(f"weights {source}: not in the Hugging Face cache{fetch}")
        path = found
    elif kind == "url":
        url, _, _ = rest.partition("#")
        path = kdcli_home() / "weights" / Path(urlparse(url).path).name
    else:
        path = Path(source)
    if not path.is_file():
        raise ZooError(f"weights {source}: missing file {path}{fetch}")
    if kind == "url" and "#sha256=" in rest:
        want = rest.split("#sha256=", 1)[1]
        if sha256(path) != want:
            raise ZooError(f"weights {path}: sha256 differs from the zoo's {want[:12]}…; delete and re-fetch")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """safetensors, or a torch pickle opened with ``weights_only=True`` (never a full unpickle)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad file for the user
        raise ZooError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ZooError(f"{path}: not a state dict")
    return obj


# BatchNorm bookkeeping that torchvision checkpoints (saved from FrozenBatchNorm2d) lack.
_OPTIONAL = ("num_batches_tracked",)


def load_strict(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load every key, strictly: missing or unexpected keys and shape mismatches are errors.

    Only BatchNorm's ``num_batches_tracked`` counters may be missing (checkpoints saved from
    frozen BatchNorm do not have them).
    """
    own = module.state_dict()
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
