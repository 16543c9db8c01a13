"""Hub push/pull with the real huggingface_hub client against a local server (tests/hubserver.py)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hubserver import HubServer  # tests/ is on sys.path (pytest prepends it)
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import load, load_file

from kdcli import api, hub
from kdcli.config import RunConfig
from kdcli.errors import KdcliError, ZooError
from kdcli.io import save_json, save_tensors
from kdcli.models import build_model
from kdcli.zoo import get_spec, resolve_ref

TOKEN = "hf_kdcliTestToken0123456789abcdef"
STUDENT = "shapes-mbv3-lraspp"


def write_run(folder: Path, teacher: Path | None, miou: float, seed: int = 0) -> Path:
    """A finished run folder in the documented layout (docs/run-folder.md), without training."""
    spec = get_spec(STUDENT)
    torch.manual_seed(seed)
    model = build_model(spec)
    cfg = RunConfig(model=STUDENT, teacher=str(teacher) if teacher else None, method="mgd" if teacher else None,
                    data="shapes", epochs=6, batch_size=4, lr=1e-3, optimizer="adamw", schedule="poly",
                    amp="bf16", inherit=False, out=str(folder))
    record = {"config": cfg.to_dict(), "task": "segmentation",
              "student": {"id": STUDENT, "spec": STUDENT, "init_hash": "0" * 64}, "effective_batch": 4}
    if teacher:
        record["teacher"] = {"id": str(teacher), "spec": "shapes-r18-deeplabv3", "hash": "1" * 64}
        record["method"] = {"mgd": {"hparams": {"alpha": 2e-5, "lambda_mgd": 0.65}, "needs": ["c5"]}}
    save_json(folder / "config.json", record)
    save_json(folder / "model.json", {"model": spec.to_dict()})
    save_json(folder / "metrics.json", {"epoch": 6, "mIoU": miou, "pixel_acc": 0.9, "per_class_iou": [0.9, 0.5]})
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "loss/ce", "val/mIoU"])
        w.writerow([6, 1e-5, 0.3, miou])
    Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / "results.png")
    save_tensors(folder / "weights" / "best.safetensors", model.net.state_dict())
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hubruns")
    teacher = root / "teacher"
    save_json(teacher / "metrics.json", {"epoch": 8, "mIoU": 0.7123})
    return {"kd": write_run(root / "kd", teacher, 0.6543), "base": write_run(root / "base", None, 0.6012, seed=1)}


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    # huggingface_hub reads these at import time; the conftest sets HF_HUB_OFFLINE=1 for every test
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("KDCLI_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubServer({TOKEN}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        yield srv


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def all_sent_bytes(srv: HubServer) -> list[bytes]:
    return [r.body for r in srv.state.requests]


def test_push_uploads_the_student_card_and_results_without_the_token(server: HubServer, runs: dict[str, Path]):
    url = hub.push(runs["kd"], "kd-org/lraspp-mgd", baseline=runs["base"])
    repo = server.state.repos["kd-org/lraspp-mgd"]
    assert url.startswith(f"{server.url}/kd-org/lraspp-mgd/commit/") and not repo.private
    files = repo.branches["main"]
    assert set(files) == {".gitattributes", "README.md", "config.json", "model.safetensors", "results.csv",
                          "results.png", "run_config.json"}
    # the weights arrive intact and hold the student alone
    sent = load(files["model.safetensors"])
    best = load_file(str(runs["kd"] / "weights" / "best.safetensors"))
    assert set(sent) == set(best) and all(torch.equal(sent[k], best[k]) for k in best)
    assert files["results.csv"] == (runs["kd"] / "results.csv").read_bytes()
    assert files["results.png"] == (runs["kd"] / "results.png").read_bytes()
    assert json.loads(files["run_config.json"])["config"]["method"] == "mgd"
    assert json.loads(files["config.json"])["model"]["architecture"] == "lraspp"
    # the card: YAML metadata and body
    card = files["README.md"].decode()
    assert server.state.validated == [card]  # the client checked the metadata with the Hub before uploading
    meta = front_matter(card)
    assert meta["library_name"] == "kdcli" and meta["license"] == "bsd-3-clause"
    assert {"knowledge-distillation", "image-segmentation", "mgd", "lraspp"} <= set(meta["tags"])
    assert meta["datasets"] == ["shapes"] and meta["base_model"] == STUDENT
    results = meta["model-index"][0]["results"][0]
    assert results["task"]["type"] == "image-segmentation" and results["dataset"]["type"] == "shapes"
    got = {m["name"]: m["value"] for m in results["metrics"]}
    assert got == {"mIoU": 0.6543, "pixel_acc": 0.9}
    body = card.split("---\n", 2)[2]
    for needle in ("teacher", "mIoU 0.7123", "`mgd`", '"lambda_mgd": 0.65', "6 epochs", "adamw lr 0.001",
                   "poly schedule", "bf16", "| effective batch | 4 |", "| inherit (neck/head from teacher) | no |",
                   "| student baseline (no distillation) | 0.6012 |", "| this model | 0.6543 |",
                   "kdcli pull hf-hub:kd-org/lraspp-mgd", 'resolve_ref("hf-hub:kd-org/lraspp-mgd")'):
        assert needle in body, needle
    # the token went in the Authorization header and nowhere else
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.state.requests)
    assert not any(TOKEN.encode() in b for b in all_sent_bytes(server))
    assert not any(TOKEN.encode() in v for v in files.values())
    assert not any(TOKEN.encode() in p.read_bytes() for p in runs["kd"].rglob("*") if p.is_file())


def test_private_revision_and_pull_request_reach_the_server(server: HubServer, runs: dict[str, Path]):
    hub.push(runs["kd"], "kd-org/private", private=True, revision="dev")
    repo = server.state.repos["kd-org/private"]
    assert repo.private and "model.safetensors" in repo.branches["dev"]
    assert "model.safetensors" not in repo.branches["main"]  # committed to the branch only
    url = hub.push(runs["base"], "kd-org/private", create_pr=True)
    assert url == f"{server.url}/kd-org/private/discussions/1"
    pr = repo.branches["refs/pr/1"]
    assert front_matter(pr["README.md"].decode())["tags"][:2] == ["kdcli", "knowledge-distillation"]
    commits = [r for r in server.state.requests if "/commit/" in r.path]
    assert commits[-1].query.get("create_pr") == ["1"] and commits[0].path.endswith("/commit/dev")
    create = [json.loads(r.body) for r in server.state.requests if r.path == "/api/repos/create"]
    assert create[0]["visibility"] == "private"


def test_the_login_cache_token_is_used(server: HubServer, runs: dict[str, Path], monkeypatch, tmp_path: Path):
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "no-token").write_text(TOKEN)  # where `hf auth login` stores it (HF_TOKEN_PATH)
    hub.push(runs["base"], "kd-org/from-login")
    assert "README.md" in server.state.repos["kd-org/from-login"].branches["main"]


def test_pull_then_load_through_the_cache(server: HubServer, runs: dict[str, Path], tiny_shapes: Path,
                                          tmp_path: Path):
    hub.push(runs["kd"], "kd-org/pulled")
    hub.push(runs["base"], "kd-org/pulled", revision="base")
    ref = "hf-hub:kd-org/pulled"
    with pytest.raises(ZooError, match=r"not in the Hugging Face cache; download it with `kdcli pull hf-hub:kd-org"):
        api.evaluate(ref, device="cpu")  # what `kdcli eval hf-hub:...` calls
    assert not [r for r in server.state.requests if "/resolve/" in r.path]  # the miss asked nothing
    folder = api.pull(ref)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    heads = [r for r in server.state.requests if r.method == "HEAD"]
    assert {Path(r.path).name for r in heads} == {"config.json", "model.safetensors"}
    # the cache alone serves from now on: the server could be gone
    n = len(server.state.requests)
    r = resolve_ref(ref)
    assert len(server.state.requests) == n
    assert r.spec.name == STUDENT and r.spec.architecture == "lraspp"
    # a pushed model used as a teacher: a later card reads its metric from the cached config.json
    assert hub._teacher_metric({"teacher": {"id": ref}}, "segmentation") == "mIoU 0.6543"
    best = load_file(str(runs["kd"] / "weights" / "best.safetensors"))
    loaded = build_model(r.spec, r.weights).net.state_dict()
    assert all(torch.equal(loaded[k], best[k]) for k in best)
    # a revision is its own cache entry
    with pytest.raises(ZooError, match="kdcli pull hf-hub:kd-org/pulled@base"):
        resolve_ref(f"{ref}@base")
    api.pull(f"{ref}@base")
    base = resolve_ref(f"{ref}@base")
    base_best = load_file(str(runs["base"] / "weights" / "best.safetensors"))
    base_got = load_file(str(base.weights))
    assert all(torch.equal(base_got[k], base_best[k]) for k in base_best)
    assert not all(torch.equal(base_got[k], best[k]) for k in best)  # not the main branch's weights
    # evaluation through the cache equals evaluating the run folder
    data = tmp_path / "cityscapes"
    shutil.copytree(tiny_shapes / "cityscapes", data)
    (data / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
    got = api.evaluate(ref, data=f"semantic:{data}", device="cpu", workers=0, max_images=2)
    want = api.evaluate(str(runs["kd"]), data=f"semantic:{data}", device="cpu", workers=0, max_images=2)
    assert got["mIoU"] == pytest.approx(want["mIoU"], abs=1e-12)


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and TOKEN not in text
    return text


def test_hub_errors_are_one_line(server: HubServer, runs: dict[str, Path], monkeypatch):
    with pytest.raises(KdcliError) as e:
        hub.push(runs["kd"], "not a repo")
    assert "--repo not a repo: expected org/name" in _one_line(e.value)
    server.state.force.append(("POST", "/api/repos/create", 403))
    server.state.force.append(("GET", "/api/models/", 403))
    with pytest.raises(KdcliError) as e:
        hub.push(runs["kd"], "other-org/x")
    assert "forbidden (403)" in _one_line(e.value) and "other-org/x" in str(e.value)
    server.state.force.clear()
    server.state.force.append(("POST", "/commit/", 403))
    with pytest.raises(KdcliError) as e:
        hub.push(runs["kd"], "kd-org/x")
    assert "forbidden (403)" in _one_line(e.value)
    server.state.force.clear()
    with pytest.raises(KdcliError) as e:
        hub.fetch("hf-hub:kd-org/missing")
    assert "repository kd-org/missing not found" in _one_line(e.value) and "(404)" in str(e.value)
    hub.push(runs["kd"], "kd-org/x")
    with pytest.raises(KdcliError) as e:
        hub.fetch("hf-hub:kd-org/x@nope")
    assert "no such revision (404)" in _one_line(e.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(KdcliError) as e:
        hub.push(runs["kd"], "kd-org/y")
    assert "rejected the token (401)" in _one_line(e.value)
    assert not any(b"hf_wrong" in b for b in all_sent_bytes(server))
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(KdcliError) as e:
        hub.push(runs["kd"], "kd-org/y")
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in _one_line(e.value)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(KdcliError) as e:  # (a pull would too, after ~30 s of the client's own retries)
        hub.push(runs["kd"], "kd-org/z")
    assert f"cannot reach {closed}" in _one_line(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KdcliError) as e:
        hub.fetch("hf-hub:kd-org/x")
    assert "offline mode (KDCLI_OFFLINE / HF_HUB_OFFLINE) is set" in _one_line(e.value)
    with pytest.raises(ZooError, match="expected hf-hub:org/name"):
        resolve_ref("hf-hub:no-slash")


def test_cli_push_and_pull(server: HubServer, runs: dict[str, Path], tmp_path: Path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cli"),
           "HF_TOKEN": TOKEN, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf-home")}

    def kdcli(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kdcli", *args], capture_output=True, text=True,
                              env={**env, **extra}, timeout=300)

    res = kdcli("push", str(runs["kd"]), "--repo", "kd-org/cli", "--private", "--revision", "dev",
                "--dataset", "my-shapes", "--license", "mit")
    assert res.returncode == 0, res.stderr
    assert TOKEN not in res.stdout + res.stderr and "pushed to" in res.stdout
    repo = server.state.repos["kd-org/cli"]
    meta = front_matter(repo.branches["dev"]["README.md"].decode())
    assert repo.private and meta["datasets"] == ["my-shapes"] and meta["license"] == "mit"
    pulled = kdcli("pull", "hf-hub:kd-org/cli@dev")
    assert pulled.returncode == 0 and "cached in" in pulled.stdout, pulled.stderr
    denied = kdcli("push", str(runs["kd"]), "--repo", "kd-org/cli", HF_TOKEN="")
    lines = [ln for ln in denied.stderr.splitlines() if ln.strip()]
    assert denied.returncode != 0 and lines == [
        "error: no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)"]


def test_zoo_fetch_of_a_pushed_model_is_a_pull(server: HubServer, runs: dict[str, Path], monkeypatch):
    """`kdcli zoo fetch hf-hub:org/name[@rev]` of a kdcli model runs `kdcli pull`'s code; `--student
    hf-hub:org/name` then loads from the cache."""
    hub.push(runs["kd"], "kd-org/zoo-fetched")
    hub.push(runs["base"], "kd-org/zoo-fetched", revision="base")
    ref = "hf-hub:kd-org/zoo-fetched"
    pulls: list[tuple[str, str]] = []
    real = hub.fetch
    monkeypatch.setattr(hub, "fetch", lambda r, command="kdcli pull": pulls.append((r, command)) or real(r, command))
    msgs: list[str] = []
    start = len(server.state.requests)
    [(name, path)] = api.fetch_weights([ref], log=msgs.append)  # what `kdcli zoo fetch hf-hub:...` calls
    assert name == ref and pulls == [(ref, "kdcli zoo fetch")]
    assert path.name == "model.safetensors" and sorted(p.name for p in path.parent.iterdir()) == list(hub.MODEL_FILES)
    assert f"name it as {ref}" in msgs[-1]
    asked = server.state.resolved()
    assert {f for _r, _rev, f in server.state.resolved("GET")} == set(hub.MODEL_FILES)
    assert {rev for _r, rev, _f in asked} == {"main"}
    # as after `kdcli pull`: resolution reads the cache alone, and the weights are the run's
    n = len(server.state.requests)
    r = resolve_ref(ref)  # what --student/--teacher hf-hub:... and `kdcli eval hf-hub:...` call
    assert len(server.state.requests) == n and r.weights == path and r.spec.name == STUDENT
    best = load_file(str(runs["kd"] / "weights" / "best.safetensors"))
    loaded = build_model(r.spec, r.weights).net.state_dict()
    assert all(torch.equal(loaded[k], best[k]) for k in best)
    assert api.fetch_weights([ref], log=msgs.append) == [(ref, path)] and len(server.state.requests) == n  # cached
    assert "already cached" in msgs[-1]
    # a revision is requested as such and read back at that revision
    base_ref = f"{ref}@base"
    [(_n, base_path)] = api.fetch_weights([base_ref], log=msgs.append)
    assert pulls[-1] == (base_ref, "kdcli zoo fetch")
    new = server.state.requests[n:]
    assert new and all("/resolve/base/" in q.path for q in new if "/resolve/" in q.path)
    base_commit = server.state.repos["kd-org/zoo-fetched"].heads["base"]
    assert resolve_ref(base_ref).weights == base_path and base_path.parent.name == base_commit
    base_best = load_file(str(runs["base"] / "weights" / "best.safetensors"))
    assert all(torch.equal(load_file(str(base_path))[k], base_best[k]) for k in base_best)
    # the same command's errors, one line
    with pytest.raises(KdcliError) as e:
        api.fetch_weights(["hf-hub:kd-org/zoo-fetched@nope"])
    assert "no revision 'nope'" in _one_line(e.value)
    assert start < len(server.state.requests)
    # a model pushed by kdcli at a commit: `zoo fetch ...@<commit>` reads exactly that commit back
    main_commit = server.state.repos["kd-org/zoo-fetched"].heads["main"]
    [(_n, pinned)] = api.fetch_weights([f"{ref}@{main_commit}"], log=msgs.append)
    assert pinned.parent.name == main_commit and resolve_ref(f"{ref}@{main_commit}").weights == pinned


def test_a_cache_miss_of_a_named_hub_model_is_one_line(server: HubServer, runs: dict[str, Path], tmp_path: Path,
                                                       monkeypatch):
    """`kdcli eval hf-hub:org/name` before any download: one line naming the repo and the command; after
    `kdcli zoo fetch hf-hub:org/name` the model resolves from the cache."""
    hub.push(runs["kd"], "kd-org/missed")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cli"),
           "HF_TOKEN": TOKEN, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf-home")}

    def kdcli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kdcli", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    n = len(server.state.requests)
    missed = kdcli("eval", "hf-hub:kd-org/missed", "--data", "shapes", "--device", "cpu")
    lines = [ln for ln in missed.stderr.splitlines() if ln.strip()]
    assert missed.returncode != 0 and lines == [
        "error: hf-hub:kd-org/missed: not in the Hugging Face cache; download it with "
        "`kdcli pull hf-hub:kd-org/missed` (or `kdcli zoo fetch hf-hub:kd-org/missed`)"], missed.stderr
    assert len(server.state.requests) == n  # the miss asked the Hub nothing
    with pytest.raises(ZooError) as e:  # a revision is named as typed
        resolve_ref("hf-hub:kd-org/missed@dev")
    assert "`kdcli pull hf-hub:kd-org/missed@dev`" in _one_line(e.value)
    fetched = kdcli("zoo", "fetch", "hf-hub:kd-org/missed")
    assert fetched.returncode == 0 and "model.safetensors" in fetched.stdout, fetched.stderr
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cli"))  # the cache the command filled
    n = len(server.state.requests)
    r = resolve_ref("hf-hub:kd-org/missed")
    assert len(server.state.requests) == n and r.spec.name == STUDENT
    assert sorted(p.name for p in r.weights.parent.iterdir()) == list(hub.MODEL_FILES)
