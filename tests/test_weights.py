"""Weight sources, the caches and `kdcli zoo fetch` against a local HTTP server on 127.0.0.1.

The server plays both parts: a plain file host (torchvision-style URLs whose names carry a sha256
prefix, and ``url:`` sources) and the few Hugging Face Hub endpoints ``hf_hub_download`` uses
(``HEAD|GET /{repo}/resolve/{revision}/{file}`` with ``X-Repo-Commit``, ``ETag``, ``Content-Length``;
404 with ``X-Error-Code``). The real torch.hub downloader and the real huggingface_hub client run
against it, with a temporary torch hub dir and a temporary HF cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from hubserver import Background, HubServer  # tests/ is on sys.path (pytest prepends it)
from safetensors.torch import save as st_save

from kdcli import checkpoint_files, weights
from kdcli.errors import KdcliError, ZooError
from kdcli.models import build_model
from kdcli.zoo import get_spec

# The commit of timm/resnet18.a1_in1k that the zoo pins (r18-deeplabv3).
R18_A1_COMMIT = "491b427b45c94c7fb0e78b5474cc919aff584bbf"
# hf-hub sources the shipped manifests leave without a commit (not knowable where the manifest was
# written): refused until the user names one. Adding to this set is a decision, not a fix.
UNPINNED = {"hf-hub:timm/resnet18d.ra2_in1k"}


class FileServer(Background):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}  # "/path" → bytes
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo → commit → files
        self.refs: dict[str, dict[str, str]] = {}  # repo → branch → commit
        self.requests: list[tuple[str, str]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def add_repo(self, repo: str, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        self.repos.setdefault(repo, {})[sha] = files
        self.refs.setdefault(repo, {})["main"] = sha
        return sha


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve()

    def do_GET(self) -> None:  # noqa: N802
        self._serve()

    def _serve(self) -> None:
        srv, path = self.server, self.path.split("?")[0]
        srv.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if repo not in srv.repos:
                return self._reply(404, b"", {"X-Error-Code": "RepoNotFound"})
            sha = srv.refs[repo].get(rev, rev if rev in srv.repos[repo] else None)
            if sha is None:
                return self._reply(404, b"", {"X-Error-Code": "RevisionNotFound"})
            files = srv.repos[repo][sha]
            if name not in files:
                return self._reply(404, b"", {"X-Error-Code": "EntryNotFound"})
            data = files[name]
            return self._reply(200, data, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                           "Content-Type": "application/octet-stream"})
        if path in srv.files:
            return self._reply(200, srv.files[path], {"Content-Type": "application/octet-stream"})
        return self._reply(404)


def pth_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    monkeypatch.setenv("KDCLI_HOME", str(tmp_path / "kdcli-home"))
    monkeypatch.delenv("KDCLI_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with FileServer() as srv:
        yield srv


@pytest.fixture
def hf_online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: FileServer) -> FileServer:
    """huggingface_hub pointed at the local server with an empty cache (the conftest sets HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    return server


def tv_enum(monkeypatch: pytest.MonkeyPatch, members: dict[str, str]) -> str:
    """A torchvision weights enum (registered where ``torchvision.models.get_weight`` looks)."""
    import torchvision.models as tvm
    from torchvision.models._api import Weights, WeightsEnum

    enum = WeightsEnum("KdcliTest_Weights", [(k, Weights(url=u, transforms=None, meta={})) for k, u in members.items()])
    monkeypatch.setattr(tvm, "KdcliTest_Weights", enum, raising=False)
    return "KdcliTest_Weights"


def test_torchvision_source_is_fetched_with_its_hash_prefix(server: FileServer, monkeypatch: pytest.MonkeyPatch):
    state = {"w": torch.arange(6.0).view(2, 3)}
    data = pth_bytes(state)
    good = hashlib.sha256(data).hexdigest()[:8]
    server.files[f"/models/tiny-{good}.pth"] = data
    server.files["/models/tiny-deadbeef.pth"] = data  # a name whose hash prefix the content does not have
    name = tv_enum(monkeypatch, {"V1": f"{server.url}/models/tiny-{good}.pth",
                                 "BAD": f"{server.url}/models/tiny-deadbeef.pth"})
    source = f"torchvision:{name}.V1"
    with pytest.raises(ZooError, match=rf"tiny-{good}\.pth; run `kdcli zoo fetch {source}`"):
        weights.cached_file(source)  # nothing downloads before `zoo fetch`
    assert server.requests == []
    path = weights.fetch(source, log=lambda _m: None, progress=False)
    assert path == Path(torch.hub.get_dir()) / "checkpoints" / f"tiny-{good}.pth"  # where torchvision keeps it
    assert weights.cached_file(source) == path
    torch.testing.assert_close(checkpoint_files.read_state_dict(path)["w"], state["w"])
    n = len(server.requests)
    assert weights.fetch(source, log=lambda _m: None) == path and len(server.requests) == n  # cached: no request
    with pytest.raises(ZooError, match="does not start with deadbeef; nothing was written"):
        weights.fetch(f"torchvision:{name}.BAD", log=lambda _m: None, progress=False)
    leftovers = sorted(p.name for p in path.parent.iterdir())
    assert leftovers == [path.name]  # no partial or mismatching file left in the cache


def test_url_source_needs_and_checks_sha256(server: FileServer):
    data = st_save({"w": torch.ones(3)})
    sha = hashlib.sha256(data).hexdigest()
    server.files["/w/teacher.safetensors"] = data
    url = f"{server.url}/w/teacher.safetensors"
    with pytest.raises(ZooError, match="needs #sha256"):
        weights.fetch(f"url:{url}", log=lambda _m: None)
    wrong = "0" * 64
    with pytest.raises(ZooError, match="sha256 does not start with 0000000000"):
        weights.fetch(f"url:{url}#sha256={wrong}", log=lambda _m: None, progress=False)
    dest = weights.kdcli_home() / "weights" / "teacher.safetensors"
    assert not dest.exists()
    assert weights.fetch(f"url:{url}#sha256={sha}", log=lambda _m: None, progress=False) == dest
    assert checkpoint_files.read_state_dict(dest)["w"].sum() == 3
    dest.write_bytes(data[:-1] + b"x")  # a damaged cached file is named, with the fetch command
    with pytest.raises(ZooError, match="sha256 differs from the zoo's.*kdcli zoo fetch"):
        weights.cached_file(f"url:{url}#sha256={sha}")
    with pytest.raises(ZooError, match="expected #sha256=<64 hex digits>"):
        weights.cached_file(f"url:{url}#md5=abc")


def test_offline_mode_refuses_downloads_but_reads_the_cache(server: FileServer, monkeypatch: pytest.MonkeyPatch):
    data = pth_bytes({"w": torch.zeros(1)})
    prefix = hashlib.sha256(data).hexdigest()[:8]
    server.files[f"/m/x-{prefix}.pth"] = data
    name = tv_enum(monkeypatch, {"V1": f"{server.url}/m/x-{prefix}.pth"})
    monkeypatch.setenv("KDCLI_OFFLINE", "1")
    with pytest.raises(ZooError, match=r"offline mode \(--offline / KDCLI_OFFLINE\) forbids downloads"):
        weights.fetch(f"torchvision:{name}.V1", log=lambda _m: None)
    with pytest.raises(ZooError, match="offline mode"):
        weights.fetch("hf-hub:timm/anything", log=lambda _m: None)
    assert server.requests == []
    monkeypatch.delenv("KDCLI_OFFLINE")
    path = weights.fetch(f"torchvision:{name}.V1", log=lambda _m: None, progress=False)
    monkeypatch.setenv("KDCLI_OFFLINE", "1")
    assert weights.fetch(f"torchvision:{name}.V1", log=lambda _m: None) == path  # cached: fine offline


def test_hf_hub_source_fetch_pins_revisions(hf_online: FileServer, monkeypatch: pytest.MonkeyPatch):
    data = st_save({"conv1.weight": torch.full((2, 3, 1, 1), 0.5)})
    sha = hf_online.add_repo("timm/tiny.in1k", {"model.safetensors": data, "config.json": b"{}"})
    with pytest.raises(ZooError, match=r"not in the Hugging Face cache; run `kdcli zoo fetch hf-hub:timm/tiny.in1k`"):
        weights.cached_file("hf-hub:timm/tiny.in1k")
    msgs: list[str] = []
    path = weights.fetch(f"hf-hub:timm/tiny.in1k@{sha}", log=msgs.append)
    assert path.name == "model.safetensors" and path.parent.name == sha  # snapshots/<commit>/ in the HF cache
    assert sha in msgs[-1]
    assert weights.cached_file(f"hf-hub:timm/tiny.in1k@{sha}") == path
    assert checkpoint_files.read_state_dict(path)["conv1.weight"].sum() == 3
    # a repo holding only pytorch_model.bin (older timm uploads)
    bin_sha = hf_online.add_repo("org/old", {"pytorch_model.bin": pth_bytes({"a": torch.ones(2)})})
    p2 = weights.fetch("hf-hub:org/old", log=lambda _m: None)
    assert p2.name == "pytorch_model.bin" and p2.parent.name == bin_sha
    assert weights.cached_file("hf-hub:org/old") == p2
    with pytest.raises(ZooError, match="no revision 'v9'"):
        weights.fetch("hf-hub:org/old@v9", log=lambda _m: None)
    with pytest.raises(ZooError, match="no such repository"):
        weights.fetch("hf-hub:org/missing", log=lambda _m: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub's own switch refuses Hub downloads
    n = len(hf_online.requests)
    with pytest.raises(ZooError, match="HF_HUB_OFFLINE"):
        weights.fetch("hf-hub:timm/other", log=lambda _m: None)
    assert len(hf_online.requests) == n


def test_zoo_fetch_command_resolves_names(server: FileServer, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from kdcli import api
    from kdcli.cli import app

    with pytest.raises(KdcliError, match="no weights for it; train it"):
        api.fetch_weights(["shapes-r18-fcos"])
    with pytest.raises(KdcliError, match="no backbone_weights"):
        api.fetch_weights(["r18-retina"], backbone=True)
    data = pth_bytes({"w": torch.zeros(1)})
    prefix = hashlib.sha256(data).hexdigest()[:8]
    server.files[f"/m/y-{prefix}.pth"] = data
    name = tv_enum(monkeypatch, {"V1": f"{server.url}/m/y-{prefix}.pth"})
    res = CliRunner().invoke(app, ["zoo", "fetch", f"torchvision:{name}.V1"])
    assert res.exit_code == 0, res.output
    assert f"y-{prefix}.pth" in res.stdout
    res = CliRunner().invoke(app, ["zoo", "fetch"])
    assert res.exit_code != 0 and "--all" in str(res.exception)


def test_zoo_cache_miss_names_file_and_fetch_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty-hub"))
    spec = get_spec("r18-retina")
    with pytest.raises(ZooError) as err:
        build_model(spec, "zoo")
    msg = str(err.value)
    assert "\n" not in msg and "resnet18-f37072fd.pth" in msg and "`kdcli zoo fetch r18-retina`" in msg
    with pytest.raises(ZooError, match=r"`kdcli zoo fetch r50-retina --backbone`"):
        build_model(get_spec("r50-retina"), "backbone")


def test_backbone_weights_load_into_the_body_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`student_weights = "backbone"`: ImageNet weights (classifier dropped) into the body, heads untouched."""
    import torchvision

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    spec = get_spec("r18-retina")
    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()  # has fc.* and num_batches_tracked
    path = weights.torchvision_path(weights._torchvision_url(spec.weights.split(":", 1)[1]))
    path.parent.mkdir(parents=True)
    torch.save(imagenet, path)
    torch.manual_seed(0)
    fresh = build_model(spec)
    torch.manual_seed(0)
    model = build_model(spec, "backbone")
    body = model.net.backbone.body.state_dict()
    assert all(torch.equal(body[k], imagenet[k]) for k in body if not k.endswith("num_batches_tracked"))
    head, head0 = model.net.head.state_dict(), fresh.net.head.state_dict()
    assert all(torch.equal(head[k], head0[k]) for k in head)
    with pytest.raises(ZooError, match="names no ImageNet backbone weights"):
        build_model(get_spec("shapes-r18-fcos"), "backbone")


def test_safe_loading_refuses_pickled_objects(tmp_path: Path):
    path = tmp_path / "obj.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": {"hook": threading.Lock}}, path)
    with pytest.raises(ZooError, match=r"refused by torch.load\(weights_only=True\)"):
        checkpoint_files.read_state_dict(path)
    ok = tmp_path / "ok.pth"
    torch.save({"meta": {"CLASSES": ("a", "b"), "config": "x = 1"}, "state_dict": {"w": torch.ones(1)}}, ok)
    assert list(checkpoint_files.read_state_dict(ok)) == ["w"]  # mmdet-style wrapper, plain containers: fine
    with pytest.raises(ZooError, match="no such file"):
        checkpoint_files.read_state_dict(tmp_path / "missing.pth")


def test_cli_offline_sets_hf_hub_offline_before_huggingface_hub_loads(tmp_path: Path):
    code = (
        "import sys\n"
        "import kdcli.cli\n"
        "assert 'huggingface_hub' not in sys.modules and 'torch' not in sys.modules\n"
        "sys.argv = ['kdcli', '--offline', 'zoo', 'fetch', 'hf-hub:timm/resnet18.a1_in1k']\n"
        "try:\n"
        "    kdcli.cli.main()\n"
        "except SystemExit as e:\n"
        "    from huggingface_hub import constants\n"
        "    print('HF_HUB_OFFLINE', constants.HF_HUB_OFFLINE, e.code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "KDCLI_OFFLINE")}
    env["HF_HUB_CACHE"] = str(tmp_path / "hf")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "HF_HUB_OFFLINE True 2" in res.stdout, res.stdout + res.stderr
    assert "offline mode" in res.stderr and res.stderr.count("\n") == 1


def test_zoo_list_and_show_say_the_weights_kind():
    from typer.testing import CliRunner

    from kdcli.cli import app

    res = CliRunner().invoke(app, ["zoo", "list"], env={"COLUMNS": "80"})
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    # 80 columns, nothing cut short (no ellipsis), one line per entry
    assert max(len(ln.rstrip()) for ln in lines) <= 80 and "…" not in res.stdout
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.strip() and not ln.strip().startswith(("name", "─"))}
    assert rows["r18-retina"][3] == "backbone" and rows["r50-retina"][3] == "full"
    assert rows["shapes-r18-fcos"][2:4] == ["scratch", "none"] and rows["r50-retina"][4:6] == ["mAP", "36.4"]
    shown = json.loads(CliRunner().invoke(app, ["zoo", "show", "r50-retina"]).stdout)
    assert shown["weights_kind"] == "full" and shown["backbone_weights"].startswith("torchvision:ResNet50")


# -- hf-hub revisions, against tests/hubserver.py ------------------------------------------------------
@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """tests/hubserver.py as the Hub, an empty HF cache, a private KDCLI_HOME, no token."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("KDCLI_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("KDCLI_HOME", str(tmp_path / "kdcli-home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with HubServer(set()) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        yield srv


def cache_lookups(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str | None]]:
    """Record every (repo, file, revision) kdcli asks the Hugging Face cache for."""
    import huggingface_hub

    seen: list[tuple[str, str, str | None]] = []
    real = huggingface_hub.try_to_load_from_cache

    def spy(repo_id, filename, *args, revision=None, **kwargs):
        seen.append((repo_id, filename, revision))
        return real(repo_id, filename, *args, revision=revision, **kwargs)

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", spy)
    return seen


def _hf_strings(obj: object) -> list[str]:
    if isinstance(obj, str):
        return [obj] if obj.startswith("hf-hub:") else []
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _hf_strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _hf_strings(v)]
    return []


def test_every_hf_hub_source_in_the_shipped_manifests_is_pinned():
    from kdcli.zoo import _manifest_files, tomllib, weight_sources  # the manifest's own files and TOML reader

    found: set[str] = set()
    for res in _manifest_files():
        if res.name.endswith(".toml"):
            found |= set(_hf_strings(tomllib.loads(res.read_text())))
    assert found, "the manifests name no hf-hub source: this test checks nothing"
    assert found == {s for s in weight_sources() if s.startswith("hf-hub:")}  # all of them are weight sources
    for source in sorted(found - UNPINNED):
        repo, rev = weights.parse_hf(source[len("hf-hub:"):])
        assert rev is not None and re.fullmatch(r"[0-9a-f]{40}", rev), f"{source}: pin a 40-hex commit"
        assert weights.zoo_unpinned(source) == []
    assert get_spec("r18-deeplabv3").weights == f"hf-hub:timm/resnet18.a1_in1k@{R18_A1_COMMIT}"
    for source in UNPINNED:  # left unpinned on purpose: refused until the user names a commit
        assert source in found and "@" not in source
        assert weights.zoo_unpinned(source)
        with pytest.raises(weights.UnpinnedRevision):
            weights.hf_revision(source)


def test_a_pinned_zoo_revision_is_what_zoo_fetch_requests_and_what_the_cache_serves(
        hub: HubServer, monkeypatch: pytest.MonkeyPatch):
    from kdcli import api
    from kdcli.models.build import backbone_body

    spec = get_spec("r18-deeplabv3")
    repo = "timm/resnet18.a1_in1k"
    torch.manual_seed(0)
    body = backbone_body(build_model(spec).net).state_dict()
    pinned = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in body.items()}
    pinned |= {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}  # an ImageNet classifier
    moved = {k: v + 1 if v.is_floating_point() else v for k, v in pinned.items()}
    # the pinned commit, then a newer commit on main with other weights
    hub.state.add_repo(repo, {"model.safetensors": st_save(pinned), "config.json": b'{"architecture": "resnet18"}'},
                       sha=R18_A1_COMMIT)
    head = hub.state.add_repo(repo, {"model.safetensors": st_save(moved), "config.json": b"{}"})
    assert head != R18_A1_COMMIT
    lookups = cache_lookups(monkeypatch)
    with pytest.raises(ZooError, match=r"not in the Hugging Face cache; run `kdcli zoo fetch r18-deeplabv3`"):
        build_model(spec, "zoo")  # nothing downloads before `zoo fetch`
    assert hub.state.requests == []
    assert lookups and {rev for _r, _f, rev in lookups} == {R18_A1_COMMIT}

    msgs: list[str] = []
    [(name, path)] = api.fetch_weights(["r18-deeplabv3"], log=msgs.append)
    assert name == "r18-deeplabv3" and path.name == "model.safetensors" and path.parent.name == R18_A1_COMMIT
    asked = hub.state.resolved()
    assert asked and {rev for _r, rev, _f in asked} == {R18_A1_COMMIT}  # the client asked for the pinned commit
    assert (repo, R18_A1_COMMIT, "model.safetensors") in asked
    assert R18_A1_COMMIT in msgs[-1]
    # main is another cache entry; the zoo entry keeps reading its commit
    main_path = weights.fetch(f"hf-hub:{repo}", log=lambda _m: None)
    assert main_path.parent.name == head
    lookups.clear()
    n = len(hub.state.requests)
    torch.manual_seed(1)
    model = build_model(spec, "zoo")
    assert len(hub.state.requests) == n  # read from the cache alone
    assert {(r, rev) for r, _f, rev in lookups} == {(repo, R18_A1_COMMIT)}
    loaded = backbone_body(model.net).state_dict()
    assert all(torch.equal(loaded[k], pinned[k]) for k in loaded if not k.endswith("num_batches_tracked"))
    # fetching again: cached, no request
    assert weights.fetch(spec.weights, log=lambda _m: None) == path and len(hub.state.requests) == n


def test_an_unpinned_zoo_source_is_refused_until_the_user_names_a_commit(hub: HubServer):
    from kdcli import api

    source = get_spec("timm-r18d-retina").weights
    assert source in UNPINNED
    repo = "timm/resnet18d.ra2_in1k"
    for call in (lambda: weights.cached_file(source, "timm-r18d-retina"),
                 lambda: api.fetch_weights(["timm-r18d-retina"], log=lambda _m: None),
                 lambda: weights.fetch(source, log=lambda _m: None)):
        with pytest.raises(weights.UnpinnedRevision) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and f"the zoo pins no commit of {repo}" in msg
        assert f"`kdcli zoo fetch hf-hub:{repo}@<commit>`" in msg and "timm-r18d-fcos" in msg
    assert hub.state.requests == []  # refused before asking the Hub
    old = hub.state.add_repo(repo, {"model.safetensors": st_save({"w": torch.zeros(2)}), "config.json": b"{}"})
    new = hub.state.add_repo(repo, {"model.safetensors": st_save({"w": torch.ones(2)}), "config.json": b"{}"})
    msgs: list[str] = []
    path = weights.fetch(f"hf-hub:{repo}@{old}", log=msgs.append)  # the user names a commit
    assert path.parent.name == old and {rev for _r, rev, _f in hub.state.resolved()} == {old}
    assert json.loads(weights.pins_path().read_text()) == {repo: old}
    assert f"commit {old} recorded" in msgs[-1] and "timm-r18d-retina" in msgs[-1]
    # every zoo entry of that repo now reads (and fetches) exactly that commit, from the cache
    n = len(hub.state.requests)
    assert weights.cached_file(source, "timm-r18d-fcos") == path
    assert [p for _n, p in api.fetch_weights(["timm-r18d-deeplabv3"], log=lambda _m: None)] == [path]
    assert len(hub.state.requests) == n
    assert checkpoint_files.read_state_dict(weights.cached_file(source))["w"].sum() == 0
    # naming another commit replaces it; a branch or tag names none
    weights.fetch(f"hf-hub:{repo}@main", log=msgs.append)
    assert json.loads(weights.pins_path().read_text()) == {repo: old}
    weights.fetch(f"hf-hub:{repo}@{new}", log=msgs.append)
    assert f"(was {old})" in msgs[-1] and json.loads(weights.pins_path().read_text()) == {repo: new}
    assert checkpoint_files.read_state_dict(weights.cached_file(source))["w"].sum() == 2
    # a named commit that is not cached: the miss names the commit and the fetch command
    weights.pins_path().write_text(json.dumps({repo: "f" * 40}))
    with pytest.raises(ZooError, match=r"\(your commit f{40}\): .* not in the Hugging Face cache; "
                                       r"run `kdcli zoo fetch timm-r18d-retina`"):
        weights.cached_file(source, "timm-r18d-retina")


def test_fetch_all_skips_an_unpinned_source_and_fetches_the_rest(monkeypatch):
    from kdcli import api

    asked: list[str] = []

    def fake_fetch(source: str, log=print) -> Path:
        asked.append(source)
        if source in UNPINNED:
            raise weights.UnpinnedRevision(f"{source}: the zoo pins no commit")
        return Path("/cache") / source.replace(":", "_")

    from kdcli.convert import fetch as releases

    converted: list[str] = []  # OpenMMLab releases, fetched and converted by their own code path
    monkeypatch.setattr(weights, "fetch", fake_fetch)
    monkeypatch.setattr(releases, "fetch_converted", lambda spec, **kw: converted.append(spec.name) or Path("/c"))
    msgs: list[str] = []
    done = api.fetch_weights([], all_=True, log=msgs.append)
    assert "r101-retina" in converted and not any(s.startswith("url:") for s in asked)
    assert set(UNPINNED) <= set(asked)
    assert len(done) == len(asked) - len(set(UNPINNED) & set(asked)) + len(converted) > len(converted)
    assert [m for m in msgs if m.startswith("skipped: ")] == [f"skipped: {s}: the zoo pins no commit"
                                                              for s in asked if s in UNPINNED]
    with pytest.raises(weights.UnpinnedRevision):  # naming the entry itself still stops with the message
        api.fetch_weights(["timm-r18d-retina"], log=msgs.append)
