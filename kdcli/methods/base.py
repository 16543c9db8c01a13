"""Method base class: two sets of taps in, named weighted losses out."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

from torch import Tensor, nn

from .. import hparams
from ..errors import ConfigError, MethodError
from ..models.taps import ModelOutput, TapInfo, fpn_taps
from .common import check_pair, float32_region, upcast


@dataclasses.dataclass
class NoOptions:
    """The Config of a method without options (the method set itself)."""


class Method(nn.Module):
    """A distillation method: two sets of taps in, named weighted losses out.

    The contract (docs/design.md, "Methods"):

    - class attributes: ``name``, ``paper``, ``evidence``, ``tasks``, ``needs_targets``,
      ``needs_teacher``, ``teacher_note``, ``binds_student``, ``presets``, and ``Config``: a
      dataclass of the method's options (type, default and one-line help per field,
      :func:`kdcli.hparams.opt`). Every preset is checked against ``Config`` when the method is
      registered; ``--set`` values are converted by its field types.
    - the constructor receives the student's and teacher's tap info (channels, strides), the task
      and the resolved options (the task's preset, then the overrides). ``self.cfg`` is the
      typed ``Config``; ``self.hp`` the same values by option name (recorded in the run report).
    - the losses: a method whose loss is a sum of independent per-tap terms implements only
      :meth:`tap_loss` and inherits :meth:`forward` and :meth:`loss_tap`; any other method
      implements :meth:`forward`.
    - hooks, all with defaults here, called by the engine on the method set :func:`build` returns
      (:class:`kdcli.methods.MethodSet` delegates each to its members): :meth:`set_progress`,
      :meth:`schedule`, :meth:`degenerate`, :meth:`teacher_forward`, :meth:`bind_student`,
      :meth:`on_epoch_end`, :meth:`internals` and :attr:`last_stats`.

    Learnable parts (adapters, generators, attention) are submodules: they are trained with the
    student and never exported.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    evidence: ClassVar[str] = ""  # parity-tested | loss parity-tested; ... | reconstruction (...)
    tasks: ClassVar[tuple[str, ...]] = ("detection", "segmentation")
    needs_targets: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True
    # what `kdcli methods` shows instead of "no (self-KD)" for a method without a teacher
    teacher_note: ClassVar[str] = ""
    # the method needs the student model itself (PS-KD's snapshot): the engine calls bind_student
    binds_student: ClassVar[bool] = False
    # task -> hyper-parameters; copied from the official configs where they exist.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # the options' dataclass (types, defaults, help); presets and --set are read through it
    Config: ClassVar[type] = NoOptions

    def __init__(
        self,
        student: dict[str, TapInfo],
        teacher: dict[str, TapInfo],
        task: str,
        **hp: Any,
    ) -> None:
        super().__init__()
        self.task = task
        # typed values, defaults for options a caller left out; the subclass reads ``hp`` as given
        typed = self.read_options(hp, "")
        opts = hparams.options(self.Config)
        self.cfg = self.Config(**{opts[k].attr: v for k, v in typed.items()})
        self.hp = {k: getattr(self.cfg, o.attr) for k, o in opts.items()}
        self.needs: tuple[str, ...] = ()
        # every method's preset has `taps` and most have `weight`: resolve them once, here
        self.taps: tuple[str, ...] = ()
        if "taps" in hp:
            self.taps = select_taps(self.tap_spec(hp, student), student, teacher, self.name)
            self.needs = self.taps
        if "weight" in hp:
            self.weight = float(hp["weight"])

    def tap_spec(self, hp: dict[str, Any], student: dict[str, TapInfo]) -> Any:
        """The tap spec to resolve; a method with a model-dependent default (FGD's ``auto``) overrides it."""
        return hp["taps"]

    # -- the losses -------------------------------------------------------------------
    def forward(self, s: ModelOutput, t: ModelOutput, targets: Any = None) -> dict[str, Tensor]:
        """``{"<name>.<tap>": weighted loss}`` for every tap, in tap order (:meth:`loss_tap` per tap).

        A method whose terms are not independent per tap (random draws in a set order, shared
        targets, several terms per tap) overrides this."""
        return {f"{self.name}.{tap}": self.loss_tap(tap, s.taps[tap], t.taps[tap]) for tap in self.taps}

    def loss_tap(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        """The weighted loss of one tap: two (N, C, H, W) maps of one batch are required; the loss
        runs in float32 with autocast off (fp16/bf16 upcast, float64 kept), the teacher detached."""
        check_pair(self.name, tap, fs, ft)
        with float32_region(fs):
            return self.tap_loss(tap, upcast(fs), upcast(ft.detach()))

    def tap_loss(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The weighted loss of one tap from float32+ maps (teacher detached). The method applies its
        weight where its official code does (CWD multiplies before dividing by N·C), so moving a
        method onto the default loop never reorders its arithmetic."""
        raise NotImplementedError(f"method '{self.name}' implements neither forward nor tap_loss")

    # -- engine hooks (optional; the engine calls them on every method) ----------------
    progress: float = 0.0  # fraction of the schedule done, in [0, 1)
    epoch: int = 0

    def set_progress(self, epoch: int, it: int, epochs: int, iters_per_epoch: int) -> None:
        """Called before every training step (``it`` counts steps within ``epoch``, both from 0).

        Schedules that depend on training progress (DKD's warm-up, SAMKD's progressive pyramid,
        PS-KD's alpha) read ``self.epoch`` / ``self.progress``."""
        self.epoch = epoch
        self.progress = (epoch + it / max(1, iters_per_epoch)) / max(1, epochs)

    def schedule(self) -> float:
        """The factor on the method's terms at the current step (DKD's warm-up); 1 when unscheduled.

        The engine's zero-loss guard does not count a step where it is exactly 0."""
        return 1.0

    def degenerate(self, tap: str, hw: tuple[int, int]) -> str | None:
        """Why the term of ``tap`` is exactly 0 for any input when the teacher's map is ``hw`` = (H, W)
        (checked before training at the run's largest map sizes), or None. Default: never."""
        return None

    def teacher_forward(self, batch: Any, need: set[str]) -> ModelOutput | None:
        """Self-distillation: produce the teacher output when the run has no teacher model."""
        return None

    def bind_student(self, student: nn.Module) -> None:
        """Called once before training (and before any resume) with the student model, for the methods with
        ``binds_student = True`` (PS-KD keeps a frozen snapshot of it). Default: nothing."""

    def on_epoch_end(self, student: nn.Module, epoch: int) -> None:
        """Called after each training epoch, before validation (PS-KD takes its snapshot here)."""

    def stat_warnings(self, columns: dict[str, float]) -> dict[str, str]:
        """Warnings about this method's epoch statistics (``columns``: the ``mask/<method>.<tap>.<map>.<stat>``
        averages of :mod:`kdcli.engine.monitor`, keyed with the method's registered name), ``{key: message}``;
        the engine prints each key once per run. Default: none."""
        return {}

    @property
    def last_stats(self) -> dict[str, float]:
        """Diagnostics of the last forward (``<tap>.<stat>``: ACAM's mask means, DMKD's kept fractions),
        as Python floats (one device sync). Default: none."""
        return {}

    def internals(
        self, s: ModelOutput, t: ModelOutput, targets: Any = None, query: tuple[float, float] = (0.5, 0.5)
    ) -> dict[str, Tensor]:
        """The maps the method computes internally, for ``kdcli viz`` and the ``mask/...`` columns of results.csv.

        Keys are ``<tap>.<map>``; values are float tensors of shape (N, H, W) (one spatial map per image),
        (N, K, H, W) (K spatial maps), (N, C) (one channel weighting) or (N, K, C). A name ending in ``mask``
        is a mask: its mean, entropy and Dice between its K maps are logged during training
        (:mod:`kdcli.engine.monitor`). A name ending in ``query_attention`` is the attention row of the map
        position nearest ``query`` = (y, x), given as fractions of the map's height and width
        (:meth:`query_index`). Called under ``torch.no_grad()``; must not change the method's state (the
        caller forks the random streams). Default: no internals.
        """
        return {}

    @staticmethod
    def query_index(h: int, w: int, query: tuple[float, float]) -> int:
        """Flat index (row-major) of the position of an H×W map nearest ``query`` = (y, x) in [0, 1]."""
        y = min(max(int(query[0] * h), 0), h - 1)
        x = min(max(int(query[1] * w), 0), w - 1)
        return y * w + x

    # -- options ----------------------------------------------------------------------
    @classmethod
    def read_options(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
        """Every option: its default, updated with ``values`` checked and converted by the Config's types
        (and by the Config's own ``__post_init__`` checks, if it has any)."""
        opts = hparams.options(cls.Config)
        out = {**{k: copy.deepcopy(o.default) for k, o in opts.items()}, **hparams.read(cls.name, opts, values, where)}
        cls.Config(**{opts[k].attr: v for k, v in out.items()})
        return out

    @classmethod
    def check_presets(cls) -> None:
        """Each preset reads as the Config (at registration: a wrong preset fails at import, not in a run)."""
        for task, preset in cls.presets.items():
            cls.read_options(preset, f"{cls.__qualname__}.presets[{task!r}]: ")

    @classmethod
    def resolve_hparams(
        cls, task: str, overrides: dict[str, Any] | None = None, where: str = "--set "
    ) -> dict[str, Any]:
        """Every option for ``task``: the Config's defaults < the task's preset < ``overrides``.

        Values are converted by the Config's field types; an unknown key or an unreadable value is one
        :class:`ConfigError` line naming the option (``where`` + key: ``--set cwd.tau``) and the method."""
        if task not in cls.presets:
            raise MethodError(
                f"method '{cls.name}' has no preset for task '{task}' (it supports: "
                f"{', '.join(sorted(cls.presets))})"
            )
        hp = cls.read_options(cls.presets[task], f"{cls.__qualname__}.presets[{task!r}]: ")
        hp.update(hparams.read(cls.name, hparams.options(cls.Config), dict(overrides or {}), where))
        return hp


def coerce(value: Any, like: Any, where: str) -> Any:
    """Convert a command-line string to the type of the preset value ``like``."""
    if not isinstance(value, str) or isinstance(like, str):
        return value
    try:
        if isinstance(like, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
        if isinstance(like, (list, tuple)):
            items = [v.strip() for v in value.split(",") if v.strip()]
            if like and not isinstance(like[0], str):
                return type(like)(coerce(v, like[0], where) for v in items)
            return type(like)(items)
    except ValueError:
        raise ConfigError(f"{where}: cannot read '{value}' as {type(like).__name__}") from None
    return value


def select_taps(
    spec: str | list[str] | tuple[str, ...],
    student: dict[str, TapInfo],
    teacher: dict[str, TapInfo],
    method: str,
) -> tuple[str, ...]:
    """Resolve a tap spec to names both models have.

    ``spec`` is a list of tap names, or ``"fpn"`` (all FPN levels), or ``"fpn:K"`` (the K finest
    FPN levels of the student: P3..P6 for RetinaNet/FCOS, P2..P5 for Faster R-CNN).
    """
    if isinstance(spec, str):
        if spec.startswith("fpn"):
            levels = fpn_taps(student)
            if ":" in spec:
                levels = levels[: int(spec.split(":", 1)[1])]
            names: tuple[str, ...] = tuple(levels)
        else:
            names = tuple(n.strip() for n in spec.split(",") if n.strip())
    else:
        names = tuple(spec)
    if not names:
        raise MethodError(f"method '{method}': tap spec {spec!r} selects no tap of the student")
    for n in names:
        for who, info in (("student", student), ("teacher", teacher)):
            if n not in info:
                raise MethodError(
                    f"method '{method}' needs tap '{n}' but the {who} has only "
                    f"{', '.join(info) or 'no taps'}; choose taps with --set taps=..."
                )
    return names
