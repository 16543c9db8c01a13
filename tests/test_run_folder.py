"""Default run folders: numbered when taken; a folder that a failed start left with only its empty lock is free."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcli import api
from kdcli.config import RunConfig
from kdcli.engine.folders import default_run_folder
from kdcli.errors import ConfigError


def test_numbering_skips_taken_folders_but_not_a_leftover_lock(tmp_path: Path) -> None:
    cfg = RunConfig(model="shapes-r18-fcos", method="cankd", teacher="runs/t")
    base = tmp_path / "detection" / "cankd-shapes-r18-fcos-from-t"
    assert default_run_folder(cfg, "detection", tmp_path) == base
    base.mkdir(parents=True)
    (base / ".lock").write_text("")  # what RunLock leaves after a start that failed before any file
    assert default_run_folder(cfg, "detection", tmp_path) == base
    (base / "config.json").write_text("{}")
    assert default_run_folder(cfg, "detection", tmp_path) == base.with_name(base.name + "-2")
    (base.with_name(base.name + "-2")).mkdir()
    (base.with_name(base.name + "-2") / "notes.txt").write_text("the user's own file")
    assert default_run_folder(cfg, "detection", tmp_path) == base.with_name(base.name + "-3")


def test_train_without_a_model_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--model .*name the model"):
        api.train(RunConfig(data="shapes"))
    assert not any(tmp_path.iterdir())  # nothing was created


def test_bench_reuses_a_run_whatever_it_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from kdcli.bench import quality as q

    cfg = RunConfig(model="shapes-r18-fcos", out=str(tmp_path / "run"), epochs=1, keep="best")
    old = {**cfg.to_dict(), "keep": "all", "log_every": 5}  # a result written with other disk/log options
    (tmp_path / "run.result.json").write_text(json.dumps({"config": old, "status": "ok", "metrics": {"mAP": 0.5}}))
    from kdcli.bench import _proc

    class Trained(Exception):
        pass

    def child(*_a: object, **_k: object) -> None:
        raise Trained

    monkeypatch.setattr(_proc, "run_child", child)
    assert q.run_one(cfg, isolate=True, log=lambda s: None)["metrics"] == {"mAP": 0.5}  # reused, not trained
    changed = RunConfig(**{**cfg.to_dict(), "epochs": 2})  # a real change is trained again
    with pytest.raises(Trained):
        q.run_one(changed, isolate=True, log=lambda s: None)
