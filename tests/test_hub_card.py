"""What a push publishes is true: subsets are stated, no local path leaves the machine, equal weights give
equal bytes; and what a pull reports is what happened (a 501, a rejected token on a cached repo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hubserver import HubServer  # tests/ is on sys.path (pytest prepends it)
from test_hub import TOKEN, front_matter, runs, server, write_run  # noqa: F401 - fixtures

from kdcli import hub
from kdcli.errors import KdcliError
from kdcli.export import export
from kdcli.io import save_json


def test_the_card_states_subsets_and_publishes_no_local_path(server: HubServer, tmp_path: Path):  # noqa: F811
    teacher = tmp_path / "home" / "alice" / "runs" / "teacher-r101"
    save_json(teacher / "metrics.json", {"epoch": 8, "mIoU": 0.7})
    save_json(teacher / "model.json", {"model": {}})
    run = write_run(tmp_path / "home" / "alice" / "runs" / "kd", teacher, 0.61)
    record = json.loads((run / "config.json").read_text())
    record["config"].update(data=f"semantic:{tmp_path}/home/alice/data/shapes-seg", max_val_images=8,
                            max_train_images=32, student_weights=str(tmp_path / "home" / "alice" / "init.pth"))
    record["images"] = {"train": {"used": 32, "total": 400}, "val": {"used": 8, "total": 100}}
    save_json(run / "config.json", record)
    hub.push(run, "kd-org/subset")
    files = server.state.repos["kd-org/subset"].branches["main"]
    for name, data in files.items():  # neither the temporary folder nor the user's home appears anywhere
        assert str(tmp_path).encode() not in data and b"/home/alice" not in data, name
    card = files["README.md"].decode()
    results = front_matter(card)["model-index"][0]["results"][0]
    assert results["dataset"]["split"] == "val[:8]"
    assert results["dataset"]["name"] == "shapes-seg (val: first 8 of 100 images)"
    body = card.split("---\n", 2)[2]
    assert "| images used | training: first 32 of 400 images; validation: first 8 of 100 images |" in body
    assert "## Results (validation subset: first 8 of 100 images)" in body
    assert "`local run (teacher-r101)`" in body and "semantic (local folder shapes-seg)" in body
    published = json.loads(files["run_config.json"])
    assert published["teacher"]["id"] == "local run (teacher-r101)"
    assert published["config"]["teacher"] == "local run (teacher-r101)"
    assert published["config"]["student_weights"] == "local file (init.pth)"
    assert published["config"]["out"] == "kd" and published["config"]["method"] == "mgd"
    assert json.loads(files["config.json"])["teacher"] == "local run (teacher-r101)"


def test_exports_of_the_same_weights_are_byte_identical(runs: dict[str, Path], tmp_path: Path):  # noqa: F811
    a = export(runs["kd"], tmp_path / "a").files["safetensors"].read_bytes()
    b = export(runs["kd"], tmp_path / "b").files["safetensors"].read_bytes()
    assert a == b
    import struct

    (n,) = struct.unpack("<Q", a[:8])
    meta = json.loads(a[8:8 + n])["__metadata__"]  # in the order the file holds them
    assert list(meta) == sorted(meta) and meta["method"] == "mgd"


def test_a_hub_answering_501_is_reported_as_such(server: HubServer, runs: dict[str, Path]):  # noqa: F811
    hub.push(runs["kd"], "kd-org/no-xet")
    server.state.force += [("HEAD", "/resolve/", 501), ("GET", "/resolve/", 501)]
    with pytest.raises(KdcliError) as info:
        hub.fetch("hf-hub:kd-org/no-xet")
    msg = str(info.value)
    assert "\n" not in msg and "answered 501" in msg and "cannot reach" not in msg


def test_a_wrong_token_on_a_cached_private_repo_is_an_error(server: HubServer, runs: dict[str, Path],  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch):
    hub.push(runs["kd"], "kd-org/secret", private=True)
    hub.fetch("hf-hub:kd-org/secret")  # cached now
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(KdcliError, match=r"rejected the token \(401\)"):
        hub.fetch("hf-hub:kd-org/secret")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert (hub.fetch("hf-hub:kd-org/secret") / "model.safetensors").is_file()
