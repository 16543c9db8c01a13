"""OpenMMLab teachers as zoo names: `kdcli zoo fetch NAME` downloads (or takes `--file`), verifies,
converts with the importer and caches, against a local HTTP server on 127.0.0.1.

The checkpoints are written by the tests in mmdet's exact key layout (tests/test_convert.py's
writers, random values). Entries pointing at them come from a user zoo file (`KDCLI_ZOO`) whose
URLs carry the checkpoint's real sha256 prefix; their host is unreachable, so every download goes
through `--mirror`. The last test is the headline pair end to end (full-size R101 and R50).
"""

from __future__ import annotations

import hashlib
import io
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from hubserver import Background  # tests/ is on sys.path (pytest prepends it)
from PIL import Image
from safetensors.torch import load_file
from test_convert import mm_fpn, mm_resnet, mm_retina_head  # tests/ is on sys.path (pytest prepends it)
from typer.testing import CliRunner

from kdcli import api
from kdcli.cli import app
from kdcli.config import RunConfig
from kdcli.convert import coco80, import_checkpoint
from kdcli.errors import ZooError
from kdcli.zoo import get_spec, resolve_ref

RETINA_CFG = ("model = dict(type='RetinaNet', neck=dict(type='FPN', add_extra_convs='on_input'))\n"
              "img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)\n")
RELEASE_DIR = "/mmdetection/v2.0/retinanet/retinanet_test"


class Releases(Background):
    """Files by path; ``cut[path] = n``: announce the full Content-Length, send n bytes, close."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Releases

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        n = self.server.cut.get(self.path, len(body))
        self.wfile.write(body[:n])
        self.wfile.flush()
        if n < len(body):
            self.close_connection = True


def ckpt_bytes(state: dict[str, torch.Tensor], config: str = RETINA_CFG) -> bytes:
    """mmdet 2.x release layout: {'meta': {versions, config text, CLASSES}, 'state_dict': ...}."""
    buf = io.BytesIO()
    torch.save({"meta": {"mmdet_version": "2.0.0", "config": config, "CLASSES": tuple(coco80())},
                "state_dict": state}, buf)
    return buf.getvalue()


def retina_state(depth: int, width: int) -> dict[str, torch.Tensor]:
    c = [64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048]
    return {**mm_resnet(depth), **mm_fpn(c, width, 1, "on_input"), **mm_retina_head(80, width)}


def publish(srv: Releases, name: str, data: bytes) -> tuple[str, str]:
    """Serve ``data`` under an OpenMMLab-style name ending in its sha256's first 8 hex digits;
    returns (path, full sha256)."""
    sha = hashlib.sha256(data).hexdigest()
    path = f"{RELEASE_DIR}/{name}_20200131-{sha[:8]}.pth"
    srv.files[path] = data
    return path, sha


def user_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: dict[str, dict[str, str]]) -> Path:
    """A user zoo file (the manifest's form) with the given entries, enabled through KDCLI_ZOO."""
    lines = []
    for name, fields in entries.items():
        lines.append(f"[{name}]")
        lines += [f'{k} = {v}' for k, v in fields.items()]
    path = tmp_path / "my-zoo.toml"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("KDCLI_ZOO", str(path))
    return path


def retina_entry(path: str, backbone: str = "torchvision:resnet18", **extra: str) -> dict[str, str]:
    return {"architecture": '"retinanet"', "backbone": f'"{backbone}"', "classes": '"coco"',
            "preprocess": "{ min_size = 800, max_size = 1333, mean = [0.485, 0.456, 0.406], "
                          "std = [0.229, 0.224, 0.225] }",
            "weights": f'"url:https://download.openmmlab.invalid{path}"', "weights_kind": '"full"',
            "convert": '"retinanet"', "metric": "{ box_map = 38.9 }", **extra}


@pytest.fixture
def releases(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("KDCLI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KDCLI_OFFLINE", raising=False)
    monkeypatch.delenv("KDCLI_MIRROR", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with Releases() as srv:
        yield srv


@pytest.fixture(scope="module")
def r18_ckpt() -> bytes:
    torch.manual_seed(0)
    return ckpt_bytes(retina_state(18, 32))


def leftovers(home: Path) -> list[str]:
    zoo = home / "zoo"
    return sorted(p.name for p in zoo.iterdir()) if zoo.is_dir() else []


def test_fetch_through_a_mirror_verifies_converts_and_caches(releases: Releases, r18_ckpt: bytes, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path, sha = publish(releases, "retinanet_r18_fpn", r18_ckpt)
    user_zoo(tmp_path, monkeypatch, {"t-retina": retina_entry(path)})
    res = CliRunner().invoke(app, ["zoo", "fetch", "t-retina", "--mirror", releases.url + "/"])
    assert res.exit_code == 0, res.output
    assert releases.requests == [path]  # BASE replaced scheme and host, the path was kept
    folder = tmp_path / "home" / "zoo" / "t-retina"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "home" / "zoo" / "sha256.json").read_text()) == {Path(path).name: sha}
    # progress on a non-TTY: plain lines with size, speed and ETA
    assert any("100%" in line and "/s" in line and "ETA" in line for line in res.stderr.splitlines()), res.stderr
    # the cached model is the importer's conversion of exactly that file
    (tmp_path / "direct.pth").write_bytes(r18_ckpt)
    ref_dir = import_checkpoint(tmp_path / "direct.pth", "retinanet", tmp_path / "direct", classes="coco").folder
    want, got = load_file(ref_dir / "model.safetensors"), load_file(folder / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # as a teacher: the converted spec (mmdet layout, the entry's metric), the cached file
    ref = resolve_ref("t-retina", role="teacher")
    assert ref.weights == folder / "model.safetensors" and ref.spec.style == "mmdet"
    assert ref.spec.name == "t-retina" and ref.spec.metric == {"box_map": 38.9}
    assert ref.spec.classes == get_spec("r50-retina").classes  # pairs with the torchvision COCO students
    # a second fetch is a no-op: no request
    res = CliRunner().invoke(app, ["zoo", "fetch", "t-retina", "--mirror", releases.url])
    assert res.exit_code == 0 and releases.requests == [path] and "already cached" in res.stderr
    assert leftovers(tmp_path / "home") == ["sha256.json", "t-retina"]
    shown = json.loads(CliRunner().invoke(app, ["zoo", "show", "t-retina"]).stdout)
    assert shown["sha256_recorded"] == sha and shown["sha256_in_name"] == sha[:8]
    assert shown["source_url"] == "https://download.openmmlab.invalid" + path and shown["cached"].startswith("yes")


def test_mirror_from_the_environment(releases: Releases, r18_ckpt: bytes, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = publish(releases, "retinanet_r18_fpn", r18_ckpt)
    user_zoo(tmp_path, monkeypatch, {"t-retina": retina_entry(path)})
    releases.files["/prefix" + path] = releases.files.pop(path)
    monkeypatch.setenv("KDCLI_MIRROR", releases.url + "/prefix")
    res = CliRunner().invoke(app, ["zoo", "fetch", "t-retina"])
    assert res.exit_code == 0, res.output
    assert releases.requests == ["/prefix" + path]


def test_file_is_verified_like_a_download(releases: Releases, r18_ckpt: bytes, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path, sha = publish(releases, "retinanet_r18_fpn", r18_ckpt)
    torch.manual_seed(1)
    other = ckpt_bytes(retina_state(18, 32))
    user_zoo(tmp_path, monkeypatch, {"t-retina": retina_entry(path)})
    (tmp_path / "other.pth").write_bytes(other)
    res = CliRunner().invoke(app, ["zoo", "fetch", "t-retina", "--file", str(tmp_path / "other.pth")])
    assert res.exit_code != 0 and f"does not start with {sha[:8]}" in str(res.exception)
    assert leftovers(tmp_path / "home") == []
    (tmp_path / "hand.pth").write_bytes(r18_ckpt)
    res = CliRunner().invoke(app, ["zoo", "fetch", "t-retina", "--file", str(tmp_path / "hand.pth")])
    assert res.exit_code == 0, res.output
    assert releases.requests == [] and (tmp_path / "home" / "zoo" / "t-retina" / "model.safetensors").is_file()


def test_a_later_sha256_mismatch_is_refused(releases: Releases, r18_ckpt: bytes, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path, sha = publish(releases, "retinanet_r18_fpn", r18_ckpt)
    home = tmp_path / "home"
    # a published full sha256 that the file does not have (same 8-digit prefix): refused, nothing kept
    user_zoo(tmp_path, monkeypatch, {"t-retina": retina_entry(path, sha256=f'"{sha[:8]}{"0" * 56}"')})
    with pytest.raises(ZooError, match="differs from the zoo's"):
        api.fetch_weights(["t-retina"], mirror=releases.url, log=lambda _m: None)
    assert leftovers(home) == []
    # the hash recorded at the first fetch is the reference from then on
    user_zoo(tmp_path, monkeypatch, {"t-retina": retina_entry(path)})
    api.fetch_weights(["t-retina"], mirror=releases.url, log=lambda _m: None)
    record = home / "zoo" / "sha256.json"
    record.write_text(json.dumps({Path(path).name: sha[:8] + "f" * 56}))
    with pytest.raises(ZooError, match=r"converted from a file of sha256 .*not the zoo's"):
        resolve_ref("t-retina", role="teacher")  # the cached folder no longer matches the record
    import shutil

    shutil.rmtree(home / "zoo" / "t-retina")
    with pytest.raises(ZooError, match="differs from the one recorded at its first fetch"):
        api.fetch_weights(["t-retina"], mirror=releases.url, log=lambda _m: None)
    assert leftovers(home) == ["sha256.json"]
    # a custom entry whose file name carries no hash needs a full sha256 before anything is downloaded
    releases.files["/plain.pth"] = r18_ckpt
    user_zoo(tmp_path, monkeypatch, {"t-plain": retina_entry("/plain.pth")})
    with pytest.raises(ZooError, match=r"plain\.pth carries no sha256 prefix .* gives no sha256"):
        api.fetch_weights(["t-plain"], mirror=releases.url, log=lambda _m: None)
    assert "/plain.pth" not in releases.requests
    user_zoo(tmp_path, monkeypatch, {"t-plain": retina_entry("/plain.pth", sha256=f'"{sha}"')})
    api.fetch_weights(["t-plain"], mirror=releases.url, log=lambda _m: None)
    assert (home / "zoo" / "t-plain" / "model.safetensors").is_file()


def test_an_interrupted_download_leaves_nothing_in_the_cache(releases: Releases, r18_ckpt: bytes, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = publish(releases, "retinanet_r18_fpn", r18_ckpt)
    releases.cut[path] = len(r18_ckpt) // 2
    user_zoo(tmp_path, monkeypatch, {"t-retina": retina_entry(path)})
    res = CliRunner().invoke(app, ["zoo", "fetch", "t-retina", "--mirror", releases.url])
    assert res.exit_code != 0 and "interrupted" in str(res.exception) and "nothing was kept" in str(res.exception)
    assert leftovers(tmp_path / "home") == []
    with pytest.raises(ZooError, match="run `kdcli zoo fetch t-retina`"):
        resolve_ref("t-retina", role="teacher")


def test_missing_weights_stop_before_any_data_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdcli.engine.build import build_run

    monkeypatch.setenv("KDCLI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    cfg = RunConfig(model="r50-retina", teacher="r101-retina", method="acam", data=f"coco:{tmp_path / 'nowhere'}",
                    out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(ZooError) as err:  # not the DataError of the missing folder: weights are checked first
        build_run(cfg, log=lambda _m: None)
    msg = str(err.value)
    assert "\n" not in msg and "`kdcli zoo fetch r101-retina`" in msg and "about 228.3 MB" in msg
    teacher_ok = RunConfig(model="r50-retina", teacher=str(_fake_teacher(tmp_path)), method="acam",
                           data=f"coco:{tmp_path / 'nowhere'}", out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(ZooError, match=r"resnet50-0676ba61\.pth; run `kdcli zoo fetch r50-retina --backbone` "
                                       r"\(download 102\.\d MB\)"):
        build_run(teacher_ok, log=lambda _m: None)  # the student's default start: its ImageNet backbone
    with pytest.raises(ZooError, match="kdcli eval r18-retina: the zoo has only ImageNet backbone weights"):
        api.evaluate("r18-retina", data=f"coco:{tmp_path / 'nowhere'}")
    with pytest.raises(ZooError, match="kdcli eval r101-pspnet: its weights are not fetched; run "
                                       r"`kdcli zoo fetch r101-pspnet` \(download about 272\.3 MB\)"):
        api.evaluate("r101-pspnet", data=f"cityscapes:{tmp_path / 'nowhere'}")


def _fake_teacher(tmp_path: Path) -> Path:
    """An exported-model folder: resolve_ref accepts it without touching any weights cache."""
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": get_spec("shapes-r18-retina").to_dict()}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_student_role_starts_from_the_imagenet_backbone() -> None:
    from kdcli.engine.build import student_start

    assert student_start(RunConfig(model="r50-retina"))[1] == "backbone"  # full COCO weights, but a student
    assert student_start(RunConfig(model="r101-retina"))[0].style == "torchvision"  # not the converted teacher
    assert student_start(RunConfig(model="mbv2-deeplabv3"))[1] == "backbone"
    assert student_start(RunConfig(model="r50-retina", student_weights="none"))[1] is None
    assert student_start(RunConfig(model="shapes-r18-fcos"))[1] is None  # no ImageNet source: scratch
    with pytest.raises(ZooError, match=r"--student-weights zoo: --student r101-retina: its weights are not fetched"):
        student_start(RunConfig(model="r101-retina", student_weights="zoo"))  # the converted release


def test_coco_subset_takes_the_teachers_category_slots(tmp_path: Path) -> None:
    from kdcli.data.coco import CocoDetection

    coco = get_spec("r50-retina").classes  # torchvision's 91-slot layout without background

    def data(cats: list[tuple[int, str]]) -> CocoDetection:
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        (root / "annotations").mkdir(parents=True)
        (root / "val2017").mkdir()
        images = [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}]  # an empty list is refused
        doc = {"images": images, "annotations": [], "categories": [{"id": i, "name": n} for i, n in cats]}
        (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
        return CocoDetection(root, "val", label_hint=coco, hint_subsets=fixed)

    fixed = True  # a teacher (or evaluated weights): its head cannot change
    sub = data([(1, "person"), (3, "car"), (18, "dog")])
    assert sub.label_space == "category-id" and sub.classes == coco and sub.cat_id_to_label == {1: 1, 3: 3, 18: 18}
    wrong = data([(1, "person"), (3, "truck")])  # id 3 is "car" in COCO: not a subset
    assert wrong.label_space == "contiguous" and wrong.classes == ["person", "truck"]
    fixed = False  # a student alone from an ImageNet backbone takes the data's own classes, as before
    own = data([(1, "person"), (3, "car")])
    assert own.label_space == "contiguous" and own.classes == ["person", "car"]


def tiny_coco(root: Path, n: int = 2, size: int = 64) -> Path:
    """COCO instances layout with two COCO categories (a subset), ``n`` images per split."""
    g = torch.Generator().manual_seed(0)
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"{split}2017" / f"{i}.jpg")
            images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": size, "height": size})
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + 2 * (i % 2), "bbox": [8, 10, 30, 28],
                         "area": 840, "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


@pytest.mark.e2e
@pytest.mark.slow
def test_headline_pair_fetch_then_distil(releases: Releases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kdcli zoo fetch r101-retina` (a full-size R101 RetinaNet in mmdet's layout) then
    `kdcli distill --method acam --teacher r101-retina --student r50-retina`, 2 steps at 64 px."""
    import torchvision

    from kdcli.weights import _torchvision_url, torchvision_path

    torch.manual_seed(0)
    path, sha = publish(releases, "retinanet_r101_fpn_2x_coco", ckpt_bytes(retina_state(101, 256)))
    user_zoo(tmp_path, monkeypatch, {"r101-retina": retina_entry(
        path, "torchvision:resnet101", backbone_weights='"torchvision:ResNet101_Weights.IMAGENET1K_V1"',
        extra_levels='"p6p7-from-p5"')})
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    runner = CliRunner()
    res = runner.invoke(app, ["zoo", "fetch", "r101-retina", "--mirror", releases.url])
    assert res.exit_code == 0, res.output
    # the student's default start: torchvision's ImageNet ResNet-50, here a random stand-in in its cache file
    r50 = torchvision_path(_torchvision_url("ResNet50_Weights.IMAGENET1K_V1"))
    r50.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), r50)
    data = tiny_coco(tmp_path / "coco")
    res = runner.invoke(app, ["distill", "--method", "acam", "--teacher", "r101-retina", "--student", "r50-retina",
                              "--data", f"coco:{data}", "--image-size", "64", "--epochs", "1", "--batch-size", "1",
                              "--max-train-images", "2", "--max-val-images", "1", "--device", "cpu", "--workers", "0",
                              "--skip-teacher-check", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["teacher"] == "r101-retina" and record["config"]["model"] == "r50-retina"
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "results.csv").open()))
    assert len(rows) == 1
    acam = [k for k in rows[0] if "acam" in k and rows[0][k] not in ("", None)]
    assert acam and all(float(rows[0][k]) == float(rows[0][k]) for k in acam), rows[0]  # logged and not NaN
    assert (tmp_path / "run" / "weights" / "best.safetensors").is_file()


def test_mobilenet_v2_dilation_is_the_atrous_form_of_the_strided_network() -> None:
    """Output stride 8 by dilation (mbv2-deeplabv3's backbone) computes exactly the stride-32
    network's features on a 4x finer grid: sampling it every 4 pixels gives the original map."""
    import torchvision

    from kdcli.models.segmentation import _dilate_mobilenet_v2

    torch.manual_seed(0)
    strided = torchvision.models.mobilenet_v2().features.eval()
    for m in strided.modules():  # BN statistics that keep activations near unit scale, not 1e-9
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
            m.weight.data.uniform_(0.5, 1.5).mul_(0.02 ** 0.5 * 5)
            m.bias.data.normal_(0, 0.1)
    dilated = torchvision.models.mobilenet_v2().features.eval()
    dilated.load_state_dict(strided.state_dict())
    _dilate_mobilenet_v2(dilated, 8)
    strided, dilated = strided.double(), dilated.double()  # exact up to float64 rounding
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        want, got = strided(x), dilated(x)
    assert want.shape[-1] == 3 and got.shape[-1] == 12
    scale = want.abs().max()
    assert scale > 0.1, scale
    torch.testing.assert_close(got[..., ::4, ::4], want, rtol=0, atol=1e-9 * float(scale))
    # (dilating the formerly strided conv itself, as torchvision's MobileNetV3 does, fails this by 2e-4)
    net = build_model_of("mbv2-deeplabv3")
    assert net.tap_info["c5"].stride == 8 and net.tap_info["c5"].channels == 1280


def build_model_of(name: str):
    from kdcli.models import build_model

    return build_model(get_spec(name))


def test_user_zoo_file_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDCLI_ZOO", "")  # `--zoo` writes the variable: setenv records it for the teardown
    mine = tmp_path / "mine.toml"
    mine.write_text('[my-r18-retina]\narchitecture = "retinanet"\nbackbone = "torchvision:resnet18"\n'
                    'classes = ["cat", "dog"]\npreprocess = { min_size = 320, max_size = 320, mean = [0.5, 0.5, 0.5], '
                    'std = [0.25, 0.25, 0.25] }\nweights_kind = "none"\n')
    res = CliRunner().invoke(app, ["--zoo", str(mine), "zoo", "show", "my-r18-retina"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["classes"] == ["cat", "dog"]
    monkeypatch.delenv("KDCLI_ZOO", raising=False)
    assert CliRunner().invoke(app, ["zoo", "show", "my-r18-retina"]).exit_code != 0
    mine.write_text('[broken]\narchitecture = "yolo"\n')
    res = CliRunner().invoke(app, ["--zoo", str(mine), "zoo", "list"])
    assert res.exit_code != 0 and f"zoo manifest {mine} [broken]: unknown architecture 'yolo'" in str(res.exception)


def test_progress_redraws_on_a_terminal_and_prints_lines_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdcli import weights

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock = iter(range(0, 1000))
    monkeypatch.setattr("time.monotonic", lambda: float(next(clock)))  # one second per call
    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        bar = weights.Progress("x.pth", 100_000_000, stream=stream)
        for _ in range(50):
            bar.update(2_000_000)
        bar.close()
    assert tty.getvalue().count("\r") == 51 and tty.getvalue().endswith("\n")
    assert "x.pth: 100.0 MB / 100.0 MB (100%), 2.0 MB/s, ETA 0:00" in tty.getvalue()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10  # every 10%, no redraws in a log file
    assert lines[4].startswith("x.pth: 50.0 MB / 100.0 MB (50%), 2.0 MB/s, ETA 0:25")


def test_the_wheel_lists_every_package_and_the_manifests() -> None:
    """pyproject.toml names the packages one by one (the top-level zoo/ folder ships as kdcli.zoo.manifests):
    a new package folder must be added there, or the wheel would silently leave it out."""
    import tomllib

    import kdcli
    from kdcli.zoo import _load_manifests

    root = Path(kdcli.__file__).parent
    cfg = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(root.parent).parts) for p in root.rglob("__init__.py")}
    assert set(cfg["packages"]) == folders | {"kdcli.zoo.manifests"}
    assert cfg["package-dir"] == {"kdcli.zoo.manifests": "zoo"}
    assert cfg["package-data"] == {"kdcli.zoo.manifests": ["*.toml"]}
    assert sorted(p.name for p in (root.parent / "zoo").glob("*.toml")) == ["detection.toml", "segmentation.toml"]
    assert "r101-retina" in _load_manifests(())  # read through the package, as an installed copy reads it

