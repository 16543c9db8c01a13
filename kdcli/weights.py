"""Weight sources → local files (reading those files: :mod:`kdcli.checkpoint_files`).

Sources: ``torchvision:<Enum>.<MEMBER>`` (the torch hub cache, as torchvision stores it),
``hf-hub:org/repo[@revision]`` (the Hugging Face cache), ``url:https://...#sha256=...``
(``$KDCLI_HOME/weights``), or a local ``.safetensors``/``.pth`` path.

Revisions: an ``hf-hub:`` source is fetched and read at its ``@revision`` (``main`` without one).
The zoo's sources pin a commit (40 hex digits). A zoo source without one is refused, by fetch and
cache reads alike, until the user names a commit with ``kdcli zoo fetch hf-hub:org/repo@<commit>``;
that commit is recorded in ``$KDCLI_HOME/hf-revisions.json`` and used for the zoo's source from
then on. A pushed kdcli model (``config.json`` with a model spec + ``model.safetensors``) is fetched
by :func:`kdcli.hub.fetch`, the code of ``kdcli pull``.

Only :func:`fetch` (``kdcli zoo fetch``) downloads. Everything else reads the caches, and a miss is
a one-line error naming the missing file and the fetch command. Offline mode (``--offline``,
``KDCLI_OFFLINE=1``) refuses every download; ``HF_HUB_OFFLINE=1`` refuses Hub downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import ZooError

_TRUE = ("1", "true", "yes", "on")
# torchvision's file names carry the first hex digits of the file's sha256 (torch.hub.HASH_REGEX)
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # tried in this order
_COMMIT = re.compile(r"[0-9a-f]{40}")
PINS_FILE = "hf-revisions.json"  # in $KDCLI_HOME: the commits users named for unpinned zoo sources


class UnpinnedRevision(ZooError):
    """A zoo ``hf-hub:`` source without a pinned commit, and none named by the user."""


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
    size = source_size(source)
    return f"`kdcli zoo fetch {model_name or source}`" + (f" (download {size})" if size else "")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def source_size(source: str) -> str:
    """The download size of a weight source when known without a request (torchvision records its
    files' sizes in MB in the enum's meta), else ""."""
    if not source.startswith("torchvision:"):
        return ""
    try:
        from torchvision.models import get_weight

        mb = get_weight(source.partition(":")[2]).meta.get("_file_size")
    except (ValueError, KeyError, AttributeError, ImportError):
        return ""
    return human_size(float(mb) * 2**20) if isinstance(mb, (int, float)) else ""  # torchvision counts MiB


# -- OpenMMLab releases, converted at fetch time (kdcli/convert/fetch.py) ----------------------------------
# mmdet/mmseg release names end in the first 8 hex digits of the file's sha256
_OPENMMLAB_HASH = re.compile(r"-([0-9a-f]{8})\.pth$")
SHA_FILE = "sha256.json"  # in $KDCLI_HOME/zoo: file name → the full sha256 recorded at its first fetch


def zoo_dir() -> Path:
    return kdcli_home() / "zoo"


def converted_folder(name: str) -> Path:
    return zoo_dir() / name


def release_url(spec) -> str:  # noqa: ANN001 - a ModelSpec (zoo imports this module lazily)
    if not spec.weights.startswith("url:"):
        raise ZooError(f"zoo [{spec.name}]: convert = \"{spec.convert}\" needs weights = \"url:https://...\"")
    return spec.weights[len("url:"):].partition("#")[0]


def release_prefix(url: str) -> str | None:
    m = _OPENMMLAB_HASH.search(Path(urlparse(url).path).name)
    return m.group(1) if m else None


def entry_size(spec) -> str:  # noqa: ANN001
    """The download size of a zoo entry's full weights, as text ("" when unknown)."""
    if spec.size:
        return human_size(spec.size)
    if spec.size_estimate:
        return "about " + human_size(spec.size_estimate)
    return source_size(spec.weights)


def recorded_sha256() -> dict[str, str]:

    path = zoo_dir() / SHA_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ZooError(f"{path}: cannot read the recorded hashes ({err}); fix or delete it") from None
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def record_sha256(fname: str, digest: str) -> None:

    found = recorded_sha256()
    if found.get(fname) != digest:
        found[fname] = digest
        _atomic_write(zoo_dir() / SHA_FILE, json.dumps(dict(sorted(found.items())), indent=2).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


MIRROR_ENV = "KDCLI_MIRROR"


def mirrored(url: str, base: str | None) -> str:
    """``--mirror BASE`` / ``KDCLI_MIRROR``: BASE (scheme, host and an optional path prefix) replaces
    the scheme and host of ``url``; the path is kept."""
    base = base if base is not None else os.environ.get(MIRROR_ENV, "")
    if not base:
        return url
    b = urlparse(base)
    if b.scheme not in ("http", "https") or not b.netloc:
        raise ZooError(f"--mirror {base}: expected http(s)://host[/prefix]")
    u = urlparse(url)
    return base.rstrip("/") + u.path + (f"?{u.query}" if u.query else "")


class Progress:
    """Bytes received, speed and ETA on stderr: one line redrawn in place on a terminal, plain lines
    (every 10% or 10 s) otherwise, so logs of batch jobs stay readable."""

    def __init__(self, label: str, total: int | None, stream=None) -> None:  # noqa: ANN001
        import time

        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = self.last = time.monotonic()
        self.next_pct = 10

    def _line(self, now: float) -> str:
        speed = self.done / max(now - self.t0, 1e-6)
        if self.total:
            eta = (self.total - self.done) / speed if speed > 0 else 0
            return (f"{self.label}: {human_size(self.done)} / {human_size(self.total)} "
                    f"({100 * self.done / self.total:.0f}%), {human_size(speed)}/s, "
                    f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        return f"{self.label}: {human_size(self.done)}, {human_size(speed)}/s"

    def update(self, n: int) -> None:
        import time

        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self.last >= 0.2:
                self.stream.write("\r" + self._line(now) + "\033[K")
                self.stream.flush()
                self.last = now
            return
        pct = 100 * self.done / self.total if self.total else 0
        if (self.total and pct >= self.next_pct) or now - self.last >= 10:
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()
            self.last = now
            while self.total and self.next_pct <= pct:
                self.next_pct += 10

    def close(self) -> None:
        import time

        if self.tty:
            self.stream.write("\r" + self._line(time.monotonic()) + "\033[K\n")
            self.stream.flush()


def download_hashed(url: str, dest: Path, progress: Progress | None = None, label: str = "") -> tuple[str, int]:
    """Stream ``url`` into ``dest`` (the caller's temporary file) and return (sha256, bytes). A body
    shorter than its Content-Length (the connection closed mid-way) is an error; the caller removes
    ``dest`` on any error, so nothing partial stays in a cache."""
    from http.client import HTTPException
    from urllib.error import HTTPError, URLError
    from urllib.request import Request, urlopen

    h = hashlib.sha256()
    n = 0
    try:
        with urlopen(Request(url, headers={"User-Agent": "kdcli"}), timeout=60) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = progress or Progress(label or Path(urlparse(url).path).name, total)
            bar.total = bar.total or total
            with open(dest, "wb") as f:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
            bar.close()
    except HTTPError as err:
        raise ZooError(f"{url}: download failed (HTTP {err.code} {err.reason})") from None
    except (URLError, OSError, HTTPException) as err:
        raise ZooError(f"{url}: download interrupted after {human_size(n)} ({getattr(err, 'reason', err)}); "
                       "nothing was kept, run the fetch again") from None
    if total is not None and n != total:
        raise ZooError(f"{url}: download interrupted after {n} of {total} bytes; nothing was kept, run the fetch again")
    return h.hexdigest(), n


def expected_sha256(spec) -> str:  # noqa: ANN001
    """The full sha256 a release must have: the manifest's, else the one recorded at its first fetch."""
    return spec.sha256 or recorded_sha256().get(Path(urlparse(release_url(spec)).path).name, "")


def converted_model(spec, flag: str) -> Path:  # noqa: ANN001
    """The cached converted folder of a ``convert`` entry, or a one-line error naming the fetch
    command and the download size. A folder converted from a file whose sha256 is not the expected
    one is refused."""

    folder = converted_folder(spec.name)
    cfg = folder / "config.json"
    if not (cfg.is_file() and (folder / "model.safetensors").is_file()):
        size = entry_size(spec)
        raise ZooError(f"{flag} {spec.name}: its weights are not fetched; run `kdcli zoo fetch {spec.name}`"
                       + (f" (download {size})" if size else ""))
    try:
        got = json.loads(cfg.read_text()).get("source", {}).get("sha256", "")
    except (OSError, ValueError, AttributeError):
        got = ""
    want = expected_sha256(spec)
    if want and got != want:
        raise ZooError(f"{folder}: converted from a file of sha256 {got[:12] or '?'}…, not the zoo's {want[:12]}…; "
                       f"delete the folder and run `kdcli zoo fetch {spec.name}`")
    return folder


# -- hf-hub revisions ---------------------------------------------------------------------------------
def is_commit(rev: str | None) -> bool:
    """A full commit sha (40 hex digits): the only revision that cannot move."""
    return bool(rev) and _COMMIT.fullmatch(rev or "") is not None


def zoo_unpinned(source: str) -> list[str]:
    """The zoo entries whose ``weights`` or ``backbone_weights`` are ``source``, when that is an
    ``hf-hub:`` source without a pinned commit; empty otherwise."""
    if not source.startswith("hf-hub:") or is_commit(parse_hf(source[len("hf-hub:"):])[1]):
        return []
    from .zoo import weight_sources

    return weight_sources().get(source, [])


def pins_path() -> Path:
    return kdcli_home() / PINS_FILE


def user_pins() -> dict[str, str]:
    """``org/repo`` → the commit the user named for the zoo's unpinned source of that repo."""
    path = pins_path()
    if not path.is_file():
        return {}

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ZooError(f"{path}: cannot read the recorded Hub revisions ({err}); fix or delete it") from None
    if not isinstance(data, dict):
        raise ZooError(f"{path}: expected a JSON object of org/repo → commit; fix or delete it")
    return {k: v for k, v in data.items() if isinstance(v, str) and is_commit(v)}


def hf_revision(source: str) -> tuple[str, str | None]:
    """(repo, revision) at which an ``hf-hub:`` source is fetched and read: its own ``@revision``,
    or, for a zoo source without a pinned commit, the commit the user named (refused if none)."""
    repo, rev = parse_hf(source.partition(":")[2])
    entries = zoo_unpinned(source)
    if not entries:
        return repo, rev
    pin = user_pins().get(repo)
    if pin is None:
        raise UnpinnedRevision(
            f"weights {source} ({', '.join(entries)}): the zoo pins no commit of {repo}; pick one on the Hub and "
            f"run `kdcli zoo fetch hf-hub:{repo}@<commit>` (40 hex digits), which records it for these entries")
    return repo, pin


def _record_pin(repo: str, rev: str | None, log: Callable[[str], None]) -> None:
    """``kdcli zoo fetch hf-hub:repo@<commit>`` names the commit for the zoo's unpinned sources of ``repo``."""
    if not is_commit(rev):
        return
    from .zoo import weight_sources

    entries = sorted({name for src, names in weight_sources().items() if src.startswith("hf-hub:")
                      and parse_hf(src[len("hf-hub:"):])[0] == repo and zoo_unpinned(src) for name in names})
    if not entries:
        return

    pins = user_pins()
    if pins.get(repo) == rev:
        return
    old = pins.get(repo)
    pins[repo] = str(rev)
    path = pins_path()
    from .io import save_json  # the project's atomic writer (fsync, then rename)

    save_json(path, dict(sorted(pins.items())))
    was = f" (was {old})" if old else ""
    log(f"hf-hub:{repo}: commit {rev} recorded in {path} for {', '.join(entries)}{was}")


def cached_file(source: str, model_name: str = "") -> Path:
    """Local path of a weight source, or a one-line error naming the missing file and the fetch
    command. Never downloads."""
    hint = fetch_hint(source, model_name)
    kind, _, rest = source.partition(":")
    if kind == "torchvision":
        path = torchvision_path(_torchvision_url(rest))
    elif kind == "hf-hub":
        repo, rev = hf_revision(source)
        found = _hf_cached(repo, rev)
        if found is None:
            shown = f"{source} (your commit {rev})" if zoo_unpinned(source) else source
            raise ZooError(f"weights {shown}: {'/'.join(HF_FILES)} not in the Hugging Face cache; run {hint}")
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


def _hf_fetched(repo: str, rev: str | None) -> Path | None:
    """The cached weights of ``repo@rev`` when nothing is left to fetch: the weight file is cached
    and so is ``config.json`` (or its absence), which says whether it is a kdcli model (that needs
    both files). Offline, the weight file alone answers."""
    from huggingface_hub import try_to_load_from_cache

    from .io import is_kdcli_config

    weights_path = _hf_cached(repo, rev)
    if weights_path is None:
        return None
    config = try_to_load_from_cache(repo, "config.json", revision=rev)
    if isinstance(config, str):
        kdcli_model = is_kdcli_config(Path(config))
        return weights_path if not kdcli_model or weights_path.name == "model.safetensors" else None
    if config is None and not hub_offline():
        return None  # not known whether it is a kdcli model: ask the Hub
    return weights_path


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
    if kind == "hf-hub":
        repo, rev = hf_revision(source)  # a zoo source without a pinned commit stops here, before any request
        path = _hf_fetched(repo, rev)
        if path is not None:
            log(f"{source}: already cached at {path}")
        else:
            path = _fetch_hf(source, repo, rev, log=log)
        _record_pin(repo, parse_hf(rest)[1], log)
        return path
    try:
        path = cached_file(source)
        log(f"{source}: already cached at {path}")
        return path
    except ZooError:
        pass
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
    """``hf_hub_download`` at ``rev``: a kdcli model (``config.json`` with a model spec) through
    :func:`kdcli.hub.fetch`, exactly as ``kdcli pull`` fetches it; otherwise ``model.safetensors``,
    else ``pytorch_model.bin``."""
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

    from .io import _scrub, is_kdcli_config
    from .zoo import scheme_fetch

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: the process may have changed it
    for fname in ("config.json", *HF_FILES):
        try:
            path = Path(hf_hub_download(repo, fname, revision=rev, endpoint=endpoint))
        except EntryNotFoundError:
            continue
        except RevisionNotFoundError:
            raise ZooError(f"{source}: the Hub has no revision '{rev}' of {repo}") from None
        except RepositoryNotFoundError:
            raise ZooError(f"{source}: no such repository on the Hub (or it is private)") from None
        except (HfHubHTTPError, OSError) as err:
            from huggingface_hub import get_token  # the implicit token must never reach a message

            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise ZooError(f"{source}: download failed ({_scrub(first, get_token())})") from None
        commit = path.parent.name  # snapshots/<commit>/<file>
        if fname == "config.json":
            if is_kdcli_config(path):  # a pushed kdcli model: one code path with `kdcli pull`
                ref = f"hf-hub:{repo}" + (f"@{rev}" if rev else "")
                folder = scheme_fetch("hf-hub:")(ref, command="kdcli zoo fetch")
                log(f"{source}: kdcli model (config.json, model.safetensors) at commit {folder.name} in {folder}; "
                    f"name it as {ref}")
                return folder / "model.safetensors"
            continue
        log(f"{source}: {fname} at commit {commit} in {path.parent}")
        return path
    raise ZooError(f"{source}: the repository has neither {' nor '.join(HF_FILES)}")
