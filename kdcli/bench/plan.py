"""The options of ``kdcli bench quality``: pairs, methods, budgets, and what a suite returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RECIPES
from ..errors import ConfigError

BASELINE = "baseline"
RESULT_NEUTRAL = ("keep", "log_every")  # run options that never change a run's metrics (reruns reuse it)


@dataclass(frozen=True)
class Pair:
    """A teacher/student pair of the suite; ``teacher_epochs`` trains an untrained zoo teacher (0: default)."""

    name: str
    teacher: str
    student: str
    teacher_epochs: int = 0


# the shapes suite: detection (FCOS, RetinaNet) and segmentation (DeepLabV3, LRASPP) students; the
# segmentation teacher is the demo's DeepLabV3-R18 trained longer, for both segmentation students
SHAPES_PAIRS: dict[str, Pair] = {
    "fcos": Pair("fcos", "shapes-r34-fcos", "shapes-r18-fcos"),
    "retina": Pair("retina", "shapes-r34-retina", "shapes-r18-retina"),
    "deeplabv3": Pair("deeplabv3", "shapes-r18-deeplabv3", "shapes-r18-deeplabv3"),
    "lraspp": Pair("lraspp", "shapes-r18-deeplabv3", "shapes-mbv3-lraspp"),
}
# epochs of a teacher trained by the suite: the demo's (so that both use the same cached teachers)
TEACHER_EPOCHS = {"detection": 16, "segmentation": 8}
METRICS = {"detection": ("mAP", "AP50"), "segmentation": ("mIoU", "pixel_acc")}
CAVEAT = (
    "Short equal-budget proxies can mis-rank methods. Measured on the shapes FCOS pair against its 8-epoch "
    "budget: a 1-epoch proxy ranked with Kendall tau 0.05 (no information), a 2-epoch proxy with tau 0.45 "
    "(4 of the top 5 kept); on the LR-ASPP pair a 1-epoch proxy with tau 0.10 (docs/results/quality.md). "
    "Methods with learnable adapters, generators or masks "
    "(FGD's global block, MGD's generator, ACAM's and MasKD's masks) start slowly and gain more from longer "
    "schedules than logit methods do, and differences within one or two standard deviations are noise. "
    "Use the proxy to shortlist; confirm the top few at the full budget before choosing."
)


@dataclass
class QualityOptions:
    pairs: list[Pair]
    data: str = "shapes"
    methods: str = "all"
    budget: str = "2e"
    seeds: int = 3
    out: Path = Path("runs/bench-quality")
    batch_size: int = 8
    # the shapes recipe of the demo (kdcli.config.RECIPES); amp auto: bf16 where the hardware has it
    lr: float = RECIPES["shapes"]["lr"]
    optimizer: str = RECIPES["shapes"]["optimizer"]
    amp: str = RECIPES["shapes"]["amp"]
    image_size: int = 0
    max_train_images: int = 0
    max_val_images: int = 0
    device: str = "auto"
    workers: int = 2
    student_weights: str | None = None
    isolate: bool = True
    jobs: int = 1  # runs at once, each a child process with (usable cores // jobs) threads
    reference: Path | None = None
    command: str = ""
    keep: str = "best"  # what each finished run keeps (engine/keep.py): a suite is many runs


@dataclass
class Budget:
    epochs: int
    steps: int  # optimizer steps per run
    max_train_images: int  # 0: all
    text: str


@dataclass
class SuiteResult:
    rows: list[dict[str, Any]] = field(default_factory=list)  # quality.csv
    runs: list[dict[str, Any]] = field(default_factory=list)  # runs.csv
    contrasts: list[dict[str, Any]] = field(default_factory=list)  # contrasts.csv
    files: list[Path] = field(default_factory=list)
    wall_s: float = 0.0


# -- options ----------------------------------------------------------------------------------------------
def parse_budget(text: str) -> tuple[str, int]:
    """``"2e"``/``"2ep"``/``"2epochs"`` → ("epochs", 2); ``"300"``/``"300steps"`` → ("steps", 300)."""
    t = text.strip().lower()
    for suffix, kind in (("epochs", "epochs"), ("epoch", "epochs"), ("ep", "epochs"), ("e", "epochs"),
                         ("steps", "steps"), ("step", "steps"), ("s", "steps"), ("", "steps")):
        if t.endswith(suffix) and t[: len(t) - len(suffix)].isdigit():
            n = int(t[: len(t) - len(suffix)])
            if n < 1:
                break
            return kind, n
    raise ConfigError(f"--budget {text}: expected epochs as 2e or optimizer steps as 300")


def pairs_from(names: str) -> list[Pair]:
    """``--pairs fcos,lraspp`` (or ``all``) → the shapes suite's pairs."""
    keys = list(SHAPES_PAIRS) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    bad = [k for k in keys if k not in SHAPES_PAIRS]
    if bad or not keys:
        raise ConfigError(f"--pairs {names}: expected all or some of {', '.join(SHAPES_PAIRS)}")
    return [SHAPES_PAIRS[k] for k in keys]


def method_names(task: str, methods: str = "all") -> list[str]:
    """The student methods of the suite for ``task``, baseline first (module docstring)."""
    from ..methods import available, get

    registry = available()
    if methods.strip() == "all":
        names = list(registry)
    else:
        names = [n.strip() for n in methods.split(",") if n.strip()]
        for n in names:
            if n != BASELINE:
                get(n)  # unknown names fail here, with the list of valid ones
    out = [BASELINE]
    for n in names:
        if n == BASELINE:
            continue
        cls = registry[n]
        if task not in cls.tasks or task not in cls.presets:
            continue
        if not cls.needs_teacher and cls.teacher_note:
            continue  # a teacher-training objective (MCMI), not a way to train the student
        out.append(n)
    if methods.strip() != "all" and len(out) == 1 and names:
        raise ConfigError(f"--methods {methods}: none of them supports {task}")
    return out


def needs_teacher(method: str) -> bool:
    from ..methods import get

    return method != BASELINE and get(method).needs_teacher


def plan_budget(budget: str, n_train: int, batch_size: int) -> Budget:
    """Epochs (and a training subset for budgets under one epoch) for a budget on ``n_train`` images."""
    kind, n = parse_budget(budget)
    per_epoch = max(1, n_train // batch_size if n_train > batch_size else 1)
    if kind == "epochs":
        return Budget(n, n * per_epoch, 0, f"{n} epoch{'s' if n > 1 else ''} = {n * per_epoch} steps")
    if n < per_epoch:
        return Budget(1, n, n * batch_size, f"{n} steps (1 epoch on {n * batch_size} of {n_train} images)")
    epochs = max(1, round(n / per_epoch))
    return Budget(epochs, epochs * per_epoch, 0, f"{epochs * per_epoch} steps ({epochs} epochs; asked {n})")


def choose_pairs(teacher: str | None, student: str | None, pairs: str, teacher_epochs: int = 0) -> list[Pair]:
    """``--teacher T --student S`` (one pair, named after the student) or, without them, the shapes suite's
    ``pairs``; ``teacher_epochs`` (0: the suite's default) for teachers the suite trains."""
    if bool(teacher) != bool(student):
        raise ConfigError("kdcli bench quality: give --teacher and --student together (or neither: the shapes suite)")
    if teacher and student:
        return [Pair(Path(student).name.replace("/", "_"), teacher, student, teacher_epochs)]
    return [Pair(p.name, p.teacher, p.student, teacher_epochs or p.teacher_epochs) for p in pairs_from(pairs)]
