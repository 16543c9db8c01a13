"""One recipe per use, stated in the help; train and distill share their run options; device defaults."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from kdcli import api
from kdcli.bench import quality
from kdcli.bench.plan import QualityOptions
from kdcli.cli import app
from kdcli.cli_options import RUN_OPTIONS
from kdcli.config import RECIPES, TASK_DEFAULTS, RunConfig
from kdcli.errors import ConfigError


def _params(command: str) -> dict[str, object]:
    cmd = typer.main.get_command(app)
    return {p.name: p for p in cmd.commands[command].params}  # type: ignore[attr-defined]


def test_reference_recipe_is_what_train_and_distill_get():
    defaults = RunConfig()
    for key, value in RECIPES["reference"].items():
        assert getattr(defaults, key) == value, key
    for task, extra in TASK_DEFAULTS.items():  # the task defaults never move a run off its recipe
        for key in set(extra) & set(RECIPES["reference"]):
            assert extra[key] == RECIPES["reference"][key], (task, key)
    assert (defaults.optimizer, defaults.momentum, defaults.amp) == ("sgd", 0.9, "none")


def test_shapes_recipe_is_what_demo_and_bench_get():
    shapes = RECIPES["shapes"]
    opts = QualityOptions([])
    assert (opts.optimizer, opts.lr, opts.amp) == (shapes["optimizer"], shapes["lr"], shapes["amp"])
    for task in ("detection", "segmentation"):
        run = quality.recipe(task, opts)
        assert {k: run[k] for k in shapes} == shapes
    # the command line's defaults of `kdcli bench quality` are the same numbers
    bench = typer.main.get_command(app).commands["bench"].commands["quality"]  # type: ignore[attr-defined]
    got = {p.name: p.default for p in bench.params}
    assert (got["optimizer"], got["lr"], got["amp"]) == (shapes["optimizer"], shapes["lr"], shapes["amp"])


def test_demo_runs_use_the_shapes_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    seen: list[RunConfig] = []

    def fake_train(cfg: RunConfig, log: object = None, **_: object) -> tuple[Path, dict]:
        seen.append(cfg)
        return Path(cfg.out), {"mAP": 0.5}

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "metrics.json").write_text(json.dumps({"mAP": 0.6}))
    monkeypatch.setattr(api, "train", fake_train)
    monkeypatch.setattr(api, "cached_teacher", lambda *a, **k: teacher)
    api.demo(["detection", "segmentation"], out=tmp_path / "demo", log=lambda m: None, quick=True)
    assert len(seen) == 4  # baseline and distilled student per task
    for cfg in seen:
        for key, value in RECIPES["shapes"].items():
            assert getattr(cfg, key) == value, (cfg.model, key)
    assert [c.schedule for c in seen] == ["cosine", "cosine", "poly", "poly"]


def test_help_states_the_recipe():
    for cmd in ("train", "distill"):
        out = " ".join(subprocess.run([sys.executable, "-m", "kdcli", cmd, "--help"], capture_output=True,
                                      text=True, env={**os.environ, "COLUMNS": "200"}).stdout.split())
        assert "SGD with momentum 0.9, lr 0.01, weight decay 1e-4" in out, cmd
        assert "--optimizer adamw --lr 1e-3 --warmup-iters 50 --amp auto" in out, cmd


def test_train_and_distill_share_each_run_option():
    train, distill = _params("train"), _params("distill")
    for name, _, option, _ in RUN_OPTIONS:
        for params in (train, distill):
            assert params[name].help == option.help  # type: ignore[attr-defined]
            assert params[name].opts == _params("train")[name].opts  # type: ignore[attr-defined]
    own = set(train) - {n for n, *_ in RUN_OPTIONS}
    assert own == {"model", "method", "objective"}


def test_every_device_option_defaults_to_auto():
    cmd = typer.main.get_command(app)
    for name in ("eval", "viz"):
        assert {p.name: p.default for p in cmd.commands[name].params}["device"] == "auto", name  # type: ignore
    quality_cmd = cmd.commands["bench"].commands["quality"]  # type: ignore[attr-defined]
    assert {p.name: p.default for p in quality_cmd.params}["device"] == "auto"
    assert RunConfig().device == "auto"
    from kdcli.viz.viz import visualise

    assert inspect.signature(visualise).parameters["device"].default == "auto"


def test_api_run_checks_what_each_command_needs(tmp_path: Path):
    with pytest.raises(ConfigError, match="kdcli train: missing --model"):
        api.run("train", {"epochs": 1})
    with pytest.raises(ConfigError, match="kdcli distill: missing --method, --student"):
        api.run("distill", {"teacher": "shapes-r34-fcos"})
    with pytest.raises(ConfigError, match="--method kd: needs a teacher"):
        api.run("train", {"model": "shapes-r18-fcos", "method": "kd"})
    # precedence: defaults < task defaults < file < options
    (tmp_path / "c.toml").write_text('model = "shapes-r18-deeplabv3"\nepochs = 3\nlr = 0.2\n')
    cfg = api.resolved_run_config("train", {"lr": 0.05}, config=tmp_path / "c.toml")
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.schedule, cfg.optimizer) == ("shapes-r18-deeplabv3", 3, 0.05,
                                                                            "poly", "sgd")
    cfg = api.resolved_run_config("distill", {"model": "shapes-r18-fcos", "method": "kd",
                                              "teacher": "shapes-r34-fcos"})
    assert (cfg.schedule, cfg.lr, cfg.amp) == ("cosine", 0.01, "none")
