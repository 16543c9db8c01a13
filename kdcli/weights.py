"""Weight sources → local files → state dicts.

Sources: ``torchvision:<Enum>.<MEMBER>`` (the torch hub cache, as torchvision stores it),
``hf-hub:org/repo[@revision]`` (the Hugging Face cache), ``url:https://...#sha256=...``
(``$KDCLI_HOME/weights``), or a local ``.safetensors``/``.pth`` path.

Only :func:`fetch` (``kdcli zoo fetch``) downloads. Everything else reads the caches, and a miss is
a one-line error naming the missing file and the fetch command. Offline mode (``--offline``,
``KDCLI_OFFLINE=1``) refuses every download; ``HF_HUB_OFFLINE=1`` refuses Hub downloads.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from .errors import ZooError

_TRUE = ("1", "true", "yes", "on")
# torchvision's file names carry the first hex digits of the file's sha256 (torch.hub.HASH_REGEX)
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # tried in this order


def kdcli_home() -> Path:
    return Path(os.environ.get("KDCLI_HOME", Path.home() / ".cache" / "kdcli"))


# -- offline mode -----------------------------------------------------------------------------------
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def set_offline() -> None:
    """``--offline``: no download at all. Sets ``HF_HUB_OFFLINE`` too, so huggingface_hub (read by
    timm as well) refuses network access; it reads the variable when first imported, which kdcli
    delays until a command needs it (the constant is also patched if it was imported already)."""
    os.environ["KDCLI_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]


def kdcli_offline() -> bool:
    return _env_true("KDCLI_OFFLINE")


def hub_offline() -> bool:
    """Hub downloads refused: kdcli offline, ``HF_HUB_OFFLINE`` in the environment now, or
    huggingface_hub's own constant (set from the environment when it was imported)."""
    if kdcli_offline() or _env_true("HF_HUB_OFFLINE"):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) if constants is not None else False


# -- sources ----------------------------------------------------------------------------------------
def _torchvision_url(source: str) -> str:
    from torchvision.models import get_weight

    try:
        return get_weight(source).url
    except (ValueError, KeyError, AttributeError):
        raise ZooError(f"weights '{source}': not a torchvision weights enum member") from None


def torchvision_path(url: str) -> Path:
    """Where torchvision's ``load_state_dict_from_url`` keeps the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def parse_hf(rest: str) -> tuple[str, str | None]:
    repo, _, rev = rest.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ZooError(f"weights 'hf-hub:{rest}': expected hf-hub:org/repo[@revision]")
    return repo, rev or None


def parse_url(rest: str) -> tuple[str, str | None]:
    """``https://host/file#sha256=<hex>`` → (url, sha256 or None)."""
    url, _, frag = rest.partition("#")
    sha = None
    if frag:
        key, _, value = frag.partition("=")
        if key != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ZooError(f"weights 'url:{rest}': expected #sha256=<64 hex digits> after the URL")
        sha = value
    if urlparse(url).scheme not in ("http", "https"):
        raise ZooError(f"weights 'url:{rest}': expected an http(s) URL")
    return url, sha


def fetch_hint(source: str, model_name: str = "") -> str:
    return f"`kdcli zoo fetch {model_name or source}`"


def cached_file(source: str, model_name: str = "") -> Path:
    """Local path of a weight source, or a one-line error naming the missing file and the fetch
    command. Never downloads."""
    hint = fetch_hint(source, model_name)
    kind, _, rest = source.partition(":")
    if kind == "torchvision":
        path = torchvision_path(_torchvision_url(rest))
    elif kind == "hf-hub":
        found = _hf_cached(*parse_hf(rest))
        if found is None:
            raise ZooError(f"weights {source}: {'/'.join(HF_FILES)} not in the Hugging Face cache; run {hint}")
        path = found
    elif kind == "url":
        url, want = parse_url(rest)
        path = kdcli_home() / "weights" / Path(urlparse(url).path).name
        if path.is_file() and want is not None and sha256(path) != want:
            raise ZooError(f"weights {path}: sha256 differs from the zoo's {want[:12]}…; delete it and run {hint}")
    else:
        path = Path(source)
        if not path.is_file():
            raise ZooError(f"weights {source}: no such file")
        return path
    if not path.is_file():
        raise ZooError(f"weights {source}: missing file {path}; run {hint}")
    return path


def _hf_cached(repo: str, rev: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for fname in HF_FILES:
        hit = try_to_load_from_cache(repo, fname, revision=rev)
        if isinstance(hit, str):
            return Path(hit)
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- downloads (kdcli zoo fetch only) ---------------------------------------------------------------
def fetch(source: str, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Download ``source`` into its standard cache (a file already there is kept) and return the
    local path. torchvision files are checked against the hash prefix in their name, ``url:``
    files against their full sha256; the Hugging Face client checks its own downloads."""
    kind, _, rest = source.partition(":")
    if kind not in ("torchvision", "hf-hub", "url"):
        raise ZooError(f"weights '{source}': only torchvision:, hf-hub: and url: sources can be fetched")
    try:
        path = cached_file(source)
        log(f"{source}: already cached at {path}")
        return path
    except ZooError:
        pass
    if kind == "hf-hub":
        return _fetch_hf(source, *parse_hf(rest), log=log)
    if kdcli_offline():
        raise ZooError(f"kdcli zoo fetch {source}: offline mode (--offline / KDCLI_OFFLINE) forbids downloads")
    if kind == "torchvision":
        url = _torchvision_url(rest)
        dest = torchvision_path(url)
        m = _HASH_IN_NAME.search(dest.name)
        want = m.group(1) if m else None
    else:
        url, want = parse_url(rest)
        if want is None:
            raise ZooError(f"weights '{source}': a url: source needs #sha256=<hex> so the download can be checked")
        dest = kdcli_home() / "weights" / Path(urlparse(url).path).name
    download(url, dest, want, progress=progress)
    log(f"{source}: downloaded to {dest}")
    return dest


def download(url: str, dest: Path, sha_prefix: str | None, progress: bool = True) -> None:
    """``url`` → ``dest`` through torch.hub's downloader (a temporary file, moved into place only
    once complete and, with ``sha_prefix``, only if the sha256 starts with it)."""
    from urllib.error import URLError

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha_prefix, progress=progress)
    except RuntimeError as err:
        if "invalid hash value" in str(err):
            raise ZooError(f"{url}: the downloaded file's sha256 does not start with {sha_prefix}; "
                           "nothing was written") from None
        raise
    except (URLError, OSError) as err:
        raise ZooError(f"{url}: download failed ({getattr(err, 'reason', err)})") from None


def _fetch_hf(source: str, repo: str, rev: str | None, log: Callable[[str], None]) -> Path:
    if hub_offline():
        raise ZooError(f"kdcli zoo fetch {source}: offline mode (--offline / KDCLI_OFFLINE / HF_HUB_OFFLINE) "
                       "forbids downloads")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: the process may have changed it
    for fname in HF_FILES:
        try:
            path = Path(hf_hub_download(repo, fname, revision=rev, endpoint=endpoint))
        except EntryNotFoundError:
            continue
        except RevisionNotFoundError:
            raise ZooError(f"{source}: the Hub has no revision '{rev}' of {repo}") from None
        except RepositoryNotFoundError:
            raise ZooError(f"{source}: no such repository on the Hub (or it is private)") from None
        except (HfHubHTTPError, OSError) as err:
            raise ZooError(f"{source}: download failed ({str(err).splitlines()[0]})") from None
        commit = path.parent.name  # snapshots/<commit>/<file>
        log(f"{source}: {fname} at commit {commit} in {path.parent}")
        return path
    raise ZooError(f"{source}: the repository has neither {' nor '.join(HF_FILES)}")


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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad file for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise ZooError(f"{path}: refused by torch.load(weights_only=True): it holds Python objects other than "
                           f"tensors and plain containers ({first[:160]}); kdcli does not unpickle arbitrary objects "
                           "- re-save its state_dict on a trusted machine") from None
        raise ZooError(f"{path}: cannot read weights ({type(err).__name__}: {first[:160]})") from None
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
