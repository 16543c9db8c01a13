"""``kdcli zoo fetch NAME`` for entries whose weights are an OpenMMLab release (``convert`` in the
manifest): download (or ``--file``), verify, convert with :func:`kdcli.convert.import_checkpoint`,
cache the converted folder in ``$KDCLI_HOME/zoo/<name>``.

Verification: the 8 hex digits at the end of the release's file name must start its sha256; the
full sha256 must equal the manifest's (when published) or, else, the one recorded at the entry's
first fetch (``$KDCLI_HOME/zoo/sha256.json``); a published size must match. The download goes to a
temporary file next to the cache and the conversion to a temporary folder, renamed into place only
when both succeeded: an interrupted or refused fetch leaves nothing in the cache. The checkpoint
itself is not kept (the converted ``model.safetensors`` is what every command reads).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ZooError
from ..zoo import ModelSpec


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def fetch_converted(spec: ModelSpec, file: str | Path | None = None, mirror: str | None = None,
                    log: Callable[[str], None] = print) -> Path:
    """The converted folder of ``spec`` (fetched now unless cached); see the module docstring."""
    from ..weights import (
        converted_folder,
        converted_model,
        download_hashed,
        expected_sha256,
        kdcli_offline,
        mirrored,
        record_sha256,
        release_prefix,
        release_url,
        zoo_dir,
    )
    from . import import_checkpoint

    url = release_url(spec)
    fname = Path(urlparse(url).path).name
    folder = converted_folder(spec.name)
    if (folder / "config.json").is_file() and file is None:
        converted_model(spec, "kdcli zoo fetch")  # refuses a folder converted from another file
        log(f"{spec.name}: already cached at {folder}")
        return folder
    prefix = release_prefix(url)
    if not prefix and not expected_sha256(spec):
        raise ZooError(f"zoo [{spec.name}]: {fname} carries no sha256 prefix (-<8 hex>.pth) and the entry gives no "
                       "sha256 = \"<64 hex>\"; kdcli fetches only what it can verify")
    tmp_root = zoo_dir()
    tmp_root.mkdir(parents=True, exist_ok=True)
    tag = f".{spec.name}.{os.getpid()}"
    tmp_file = tmp_root / f"{tag}.pth.part"
    tmp_dir = tmp_root / f"{tag}.converting"
    try:
        if file is not None:
            src = Path(file).expanduser()
            if not src.is_file():
                raise ZooError(f"--file {src}: no such file")
            digest, n = _sha256(src)
            what = f"--file {src}"
        else:
            if kdcli_offline():
                raise ZooError(f"kdcli zoo fetch {spec.name}: offline mode (--offline / KDCLI_OFFLINE) "
                               "forbids downloads")
            where = mirrored(url, mirror)
            log(f"{spec.name}: downloading {where}")
            digest, n = download_hashed(where, tmp_file, label=fname)
            src, what = tmp_file, where
        if prefix and not digest.startswith(prefix):
            raise ZooError(f"{what}: sha256 {digest[:12]}… does not start with {prefix} (the hash in the release name "
                           f"{fname}); not {spec.name}'s checkpoint, nothing was kept")
        want = expected_sha256(spec)
        if want and digest != want:
            origin = "the zoo's" if spec.sha256 else "the one recorded at its first fetch"
            raise ZooError(f"{what}: sha256 {digest[:16]}… differs from {origin} ({want[:16]}…); nothing was kept")
        if spec.size and n != spec.size:
            raise ZooError(f"{what}: {n} bytes, the release has {spec.size}; nothing was kept")
        classes = "coco" if spec.task == "detection" else "cityscapes"
        import_checkpoint(src, spec.convert, tmp_dir, classes=classes, metric=dict(spec.metric),
                          options={"name": spec.name}, log=log)
        record_sha256(fname, digest)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp_dir, folder)
    finally:
        tmp_file.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log(f"{spec.name}: verified (sha256 {digest}) and converted into {folder}")
    return folder
