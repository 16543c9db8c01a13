"""Run configuration: defaults < task defaults < --config file < command-line options.

Method hyper-parameters live in the method's preset and are overridden with ``--set k=v``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class RunConfig:
    model: str = ""  # the model trained: the student in `distill`
    teacher: str | None = None
    method: str | None = None
    set: dict[str, Any] = field(default_factory=dict)  # method hyper-parameter overrides
    data: str = "shapes"
    out: str = ""  # run folder; default runs/<method>-<model>
    epochs: int = 12
    batch_size: int = 8
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | poly | constant
    warmup_iters: int = 100
    grad_clip: float = 35.0  # L2 max-norm; 0 disables (35 in FGD/MGD/MasKD/CanKD configs)
    seed: int = 0
    workers: int = 2
    image_size: int = 0  # 0: the model's preprocess size
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16 | auto (kdcli/runtime.py)
    max_train_images: int = 0  # 0: all
    max_val_images: int = 0
    bn_recal: int = 10  # batches used to re-estimate BatchNorm statistics before evaluation
    # None: as built (from scratch); "zoo" (the entry's weights, full or backbone), "backbone" (ImageNet
    # backbone only, docs/zoo.md) or a file
    student_weights: str | None = None
    inherit: bool = False
    # evaluate the teacher on this many validation images before distilling (kdcli/engine/teacher_check.py)
    teacher_check_images: int = 50
    skip_teacher_check: bool = False
    eval_every: int = 1
    keep: str = "all"  # best | last | all: what a finished run keeps of its weights (engine/keep.py)
    log_every: int = 0  # steps between plain progress lines when stderr is not a terminal (0: ~10 % of an epoch)
    # `kdcli train --objective mcmi` (adds the teacher-free method `mcmi`); `--augment hard`
    # wraps the method(s) with HARD's augmentor, whose options (`--set hard.k=v`) move to augment_set
    objective: str = "ce"  # ce | mcmi
    augment: str = "none"  # none | hard
    augment_set: dict[str, Any] = field(default_factory=dict)
    # scale and reliability (docs/distributed.md, docs/reliability.md)
    accumulate: int = 1  # gradient accumulation: micro-batches per optimizer step
    channels_last: bool = False
    compile: bool = False  # torch.compile of the student's backbone/neck/head
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)
    scale_lr: bool = False  # linear scaling: lr × world size × accumulate
    ckpt_every_steps: int = 500  # resumable checkpoint every N optimizer steps (0: epoch ends only)
    zero_loss_steps: int = 50  # stop when a distillation term is exactly 0 this many steps in a row (0: off)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> RunConfig:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(_did_you_mean(k, known) for k in bad)} "
                              f"(valid: {', '.join(sorted(known))})")
        check_values(d, where)
        floats = {f.name for f in fields(cls) if str(f.type) == "float"}
        return cls(**{k: float(v) if k in floats else v for k, v in d.items()})  # `lr = 1` is 1.0

    def merged(self, updates: dict[str, Any]) -> RunConfig:
        d = self.to_dict()
        d.update({k: v for k, v in updates.items() if v is not None})
        return RunConfig.from_dict(d, "options")


def _did_you_mean(key: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key.replace("-", "_"), sorted(known), n=1, cutoff=0.6)
    return f"{key} (did you mean {close[0]}?)" if close else key


# Lower bounds of numeric options, checked before anything is built: a wrong value must not start a run
# that ends without weights (0 epochs) or fails later in the schedule or the optimizer.
MINIMUM: dict[str, float] = {
    "epochs": 1, "batch_size": 1, "lr": 0.0, "momentum": 0.0, "weight_decay": 0.0, "warmup_iters": 0,
    "grad_clip": 0.0, "image_size": 0, "max_train_images": 0, "max_val_images": 0, "bn_recal": 0,
    "teacher_check_images": 0, "eval_every": 0, "accumulate": 1, "ckpt_every_steps": 0, "zero_loss_steps": 0,
}
EXCLUSIVE = {"lr"}  # must be strictly above the bound
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "str | None": "a string", "dict[str, Any]": "a table of key = value"}


def _fits(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "str | None":
        return value is None or isinstance(value, str)
    if kind.startswith("dict"):
        return isinstance(value, dict)
    return True


def check_values(d: dict[str, Any], where: str) -> None:
    """Each value of ``d`` has its option's type and range, else a one-line :class:`ConfigError`
    naming the option (``--epochs``) and, for a config file, the file."""
    kinds = {f.name: str(f.type) for f in fields(RunConfig)}
    for key, value in d.items():
        kind = kinds.get(key, "")
        name = f"{where}: {key} = {value!r}" if where != "options" else f"--{key.replace('_', '-')} {value!r}"
        if not _fits(value, kind):
            raise ConfigError(f"{name}: expected {_KINDS.get(kind, kind)}" + (" (finite)" if kind == "float" else ""))
        low = MINIMUM.get(key)
        if low is None:
            continue
        if value < low or (key in EXCLUSIVE and value == low):
            bound = f"> {low:g}" if key in EXCLUSIVE else f">= {low:g}"
            raise ConfigError(f"{name}: expected {_KINDS[kind]} {bound}")


# The two training recipes (docs/cli.md#recipes). "reference": `kdcli train` / `kdcli distill` unless told
# otherwise (RunConfig's defaults and TASK_DEFAULTS): SGD with momentum 0.9, weight decay 1e-4 and float32, as
# torchvision's detection/segmentation reference scripts and mmdetection/mmsegmentation configs train
# models that start from pretrained weights; float32 so that one command gives the same numbers on every
# machine (`auto` is bf16 on some CPUs, float32 on others). "shapes": the demo and `kdcli bench quality`,
# which train the embedded shapes models from scratch in minutes: AdamW converges there in far fewer
# steps than SGD, and bf16 where the hardware has it roughly halves a CPU detector step.
RECIPES: dict[str, dict[str, Any]] = {
    "reference": {"optimizer": "sgd", "lr": 0.01, "weight_decay": 1e-4, "warmup_iters": 100, "amp": "none"},
    "shapes": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup_iters": 50, "amp": "auto"},
}


TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # torchvision's detection reference recipe uses SGD 0.02 at batch 16; from scratch on
    # the shapes set AdamW converges in far fewer steps, so the demo uses it (see docs).
    "detection": {"lr": 0.01, "weight_decay": 1e-4},
    # segmentation reference: SGD 0.01-0.02, poly, wd 1e-4..5e-4
    "segmentation": {"lr": 0.01, "weight_decay": 1e-4, "schedule": "poly"},
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML, YAML or JSON file, or from a run: its folder or its ``config.json``
    (the recorded ``config`` without ``out``, so that the repeat gets a run folder of its own)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    try:
        if p.suffix == ".json":
            d = json.loads(p.read_text())
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(p.read_text()) or {}
        else:
            d = tomllib.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {p}: {err}") from None
    except ImportError:
        raise ConfigError(f"--config {p}: YAML needs PyYAML (pip install pyyaml)") from None
    except Exception as err:  # yaml.YAMLError: its message spans lines
        raise ConfigError(f"--config {p}: {' '.join(str(err).split())}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config {p}: expected a table of options, got {type(d).__name__}")
    if isinstance(d.get("config"), dict) and "task" in d:  # a run's record (kdcli.engine.record.describe_run)
        d = {k: v for k, v in d["config"].items() if k != "out"}
    return d


def parse_sets(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item}: expected key=value")
        out[key.strip()] = value.strip()
    return out


OBJECTIVES = ("ce", "mcmi")
AUGMENTS = ("none", "hard")


def apply_objective_and_augment(cfg: RunConfig) -> RunConfig:
    """Turn ``objective``/``augment`` into what the engine builds (idempotent, so a resumed
    run's recorded config maps to the same thing).

    - ``objective = "mcmi"`` adds the teacher-free method ``mcmi`` (CE − λ·CMI) to ``method``;
    - ``augment = "hard"`` moves the ``hard.*`` keys of ``set`` to ``augment_set``; the remaining
      unprefixed keys of a single method are prefixed with its name when the method list grew.
    """
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"--objective {cfg.objective}: expected one of {', '.join(OBJECTIVES)}")
    if cfg.augment not in AUGMENTS:
        raise ConfigError(f"--augment {cfg.augment}: expected one of {', '.join(AUGMENTS)}")
    updates: dict[str, Any] = {}
    sets = dict(cfg.set)
    hard = {k.split(".", 1)[1]: v for k, v in sets.items() if k.startswith("hard.")}
    if hard:
        if cfg.augment != "hard":
            raise ConfigError(f"--set hard.{next(iter(hard))}: HARD options need --augment hard")
        sets = {k: v for k, v in sets.items() if not k.startswith("hard.")}
        updates["augment_set"] = {**cfg.augment_set, **hard}
    if cfg.augment == "hard" and not cfg.method:
        raise ConfigError("--augment hard: wraps a distillation method; name one with --method")
    names = [n.strip() for n in (cfg.method or "").split("+") if n.strip()]
    if cfg.objective == "mcmi" and "mcmi" not in names:
        if len(names) == 1:  # options given for the single method keep working once mcmi joins it
            sets = {(k if "." in k else f"{names[0]}.{k}"): v for k, v in sets.items()}
        names.append("mcmi")
        updates["method"] = "+".join(names)
    updates["set"] = sets
    return cfg.merged(updates)
