"""Building a run: the student's start, checks of every option and weight file before any data is read,
data sets and loaders, teacher, student and method, and the :class:`Run` that holds them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError, KdcliError
from ..methods import MethodSet
from ..models import TapModel, build_model, image_size_of
from ..models.build import imagenet_source, required_file
from ..models.taps import TapInfo
from ..runtime import flush_denormals, resolve_amp, seed_everything
from ..zoo import ModelSpec, resolve_ref
from . import distributed as ddp
from .augment import attach_models
from .callbacks import Callback
from .folders import check_writable, run_folder
from .guards import LossGuard, ignore_sigint_in_worker
from .keep import check_keep
from .step import DistillStep
from .teacher_check import check_teacher_kind, teacher_check


@dataclass
class Run:
    """Everything a training run is made of."""

    cfg: RunConfig
    task: str
    folder: Path
    student: TapModel
    teacher: TapModel | None
    method: nn.Module | None
    train_loader: Any
    val_loader: Any
    val_ds: Any
    device: torch.device
    log: Callable[[str], None] = print
    meta: dict[str, Any] = field(default_factory=dict)
    dist: ddp.DistInfo = field(default_factory=ddp.DistInfo)
    # student + method in one module (DistributedDataParallel over it under torchrun)
    step_module: nn.Module | None = None
    sampler: ddp.EpochSampler | None = None
    guard: LossGuard | None = None
    command: str = "train"  # the kdcli command that started the run, recorded in config.json (kdcli.api sets it)
    # the command line that continues the run, named when it stops (kdcli.api sets it; the engine never
    # reads the process's command line)
    resume_hint: str = ""
    # (method, tap) groups whose term is exactly 0 for any input at this run's map sizes, with the reason
    degenerate: dict[str, str] = field(default_factory=dict)
    # results.csv, the run record, mask statistics, results.png: wired by the caller (engine/callbacks.py);
    # the loop itself writes only checkpoints, best weights and metrics.json
    callbacks: list[Callback] = field(default_factory=list)

    @property
    def wrapped(self) -> nn.Module:
        if self.step_module is None:
            self.step_module = DistillStep(self.student, self.method)
        return self.step_module

    @property
    def inner_step(self) -> DistillStep:
        m = self.wrapped
        return m.module if hasattr(m, "module") else m  # type: ignore[return-value]

    @property
    def batches_per_epoch(self) -> int:
        """Batches of one full epoch on this rank (the loader is shorter after a mid-epoch resume)."""
        if self.sampler is None:
            return max(1, len(self.train_loader))
        n, bs = self.sampler.num_samples, self.cfg.batch_size
        return max(1, n // bs if n > bs else 1)

    @property
    def hint(self) -> str:
        """How to continue this run, for messages: the caller's command line, else the folder to resume."""
        return self.resume_hint or f"resume {self.folder}"


def student_start(cfg: RunConfig) -> tuple[ModelSpec, Path | str | None]:
    """The student's spec and initial weights before any data is read. A zoo student starts from its
    ImageNet backbone when the zoo has one (papers never train students from scratch), whatever
    the entry's full weights; ``student_weights``: ``none`` (scratch), ``zoo`` (the entry's own
    weights: an OpenMMLab entry's converted model), ``backbone`` or a file."""
    ref = resolve_ref(cfg.model, role="student")
    spec, weights = ref.spec, ref.weights
    if cfg.student_weights:
        weights = None if cfg.student_weights == "none" else cfg.student_weights
    elif weights is None and imagenet_source(spec):
        weights = "backbone"
    if weights == "zoo" and spec.convert:
        converted = resolve_ref(cfg.model, role="student-zoo")
        spec, weights = converted.spec, converted.weights
    return spec, weights


def _resolve_student_spec(cfg: RunConfig, classes: list[str]) -> tuple[ModelSpec, Path | str | None]:
    spec, weights = student_start(cfg)
    # backbone-only weights leave the classifier fresh: the student may take the data's classes
    head_fixed = weights is not None and weights != "backbone" and not (
        weights == "zoo" and spec.weights_kind == "backbone")
    if len(spec.classes) != len(classes) or spec.classes != classes:
        if head_fixed:
            raise KdcliError(class_mismatch(cfg, spec.classes, classes))
        spec = spec.with_classes(classes)
    if cfg.image_size:
        pp = dict(spec.preprocess)
        if spec.task == "detection":
            pp.update(min_size=cfg.image_size, max_size=cfg.image_size)
        else:
            pp.update(size=cfg.image_size)
        from dataclasses import replace

        spec = replace(spec, preprocess=pp)
    return spec, weights


def class_mismatch(cfg: RunConfig, model_classes: list[str], data_classes: list[str]) -> str:
    """Why weights whose classifier was trained on ``model_classes`` (the class list of the model's
    spec, which the weights' head follows) cannot train on ``data_classes``: the counts, or the first
    position where the names differ when the counts are equal."""
    src = f"--student-weights {cfg.student_weights}" if cfg.student_weights else "its weights"
    n, m = len(model_classes), len(data_classes)
    if n != m:
        what = f"{n} classes but --data {cfg.data} has {m}"
    else:
        i = next(k for k, (a, b) in enumerate(zip(model_classes, data_classes, strict=True)) if a != b)
        what = (f"{n} classes, as --data {cfg.data} has, but other ones: class {i} is "
                f"'{model_classes[i]}' in the model and '{data_classes[i]}' in the data")
    return (f"--model {cfg.model} with {src}: the classifier predicts {what}; "
            "train it from scratch (no --student-weights, or --student-weights backbone) or use matching data")


def _check_speed_options(cfg: RunConfig) -> None:
    if cfg.accumulate < 1:
        raise ConfigError(f"--accumulate {cfg.accumulate}: expected a number of micro-batches >= 1")
    if cfg.ckpt_every_steps < 0:
        raise ConfigError(f"--ckpt-every-steps {cfg.ckpt_every_steps}: expected >= 0 (0: epoch ends only)")
    if cfg.zero_loss_steps < 0:
        raise ConfigError(f"--zero-loss-steps {cfg.zero_loss_steps}: expected >= 0 (0: guard off)")


def compile_student(student: TapModel) -> list[str]:
    """``torch.compile`` the student's heavy parts in place (``nn.Module.compile``: key names unchanged).

    The TapModel forward itself (Python control flow over taps and losses) stays eager; what is
    compiled is each part it calls: the detector's backbone body, FPN and head, or the
    segmenter's backbone. Returns the compiled parts' names."""
    net = student.net
    parts = {"backbone.body": None, "backbone.fpn": None, "head": None} if student.task == "detection" \
        else {"backbone": None}
    done = []
    for path in parts:
        m: Any = net
        for a in path.split("."):
            m = getattr(m, a, None)
            if m is None:
                break
        if isinstance(m, nn.Module):
            m.compile()
            done.append(path)
    return done


def largest_maps(model: TapModel, info: dict[str, TapInfo]) -> dict[str, tuple[int, int]]:
    """The largest (H, W) each spatial tap in ``info`` (strides of the model that computes it) can have
    on this run's training inputs, which ``model`` (the student) preprocesses: detection resizes the
    long side to at most ``max_size`` and pads to a multiple of 32, so no batch exceeds that square;
    segmentation trains on ``size`` crops. Strided convolutions round up: ``ceil(side / stride)``."""
    pp = model.spec.preprocess
    if model.task == "detection":
        side = math.ceil(int(pp.get("max_size", 1333)) / 32) * 32
    else:
        side = int(pp.get("size", 512))
    return {name: (math.ceil(side / i.stride),) * 2 for name, i in info.items() if i.stride > 0}


def degenerate_terms(method: MethodSet | None, maps: dict[str, tuple[int, int]]) -> dict[str, str]:
    """``method.tap`` -> why, for each term that is exactly 0 for any input at these map sizes (CWD's
    spatial softmax over a 1x1 map is 1; CanKD's instance norm of a 1x1 map is 0), as each method's
    :meth:`~kdcli.methods.base.Method.degenerate` says."""
    return {} if method is None else method.degenerate_terms(maps)


def build_run(cfg: RunConfig, log: Callable[[str], None] = print, command: str = "train") -> Run:
    """The run ``cfg`` describes: options and weight files checked first, then data, models, method, loaders.
    ``command``: the kdcli command that started it (recorded in config.json by the run record)."""
    from ..data import build_dataset, collate_detection, collate_segmentation, data_hints, subset
    from ..methods import build as build_method

    _check_speed_options(cfg)
    check_keep(cfg.keep)
    check_writable(run_folder(cfg))
    dist = ddp.init(cfg.device)
    device = dist.device
    if not dist.is_main:
        log = _quiet  # rank 0 alone reports
    amp, warning = resolve_amp(cfg.amp, device)
    if warning:
        log(f"warning: {warning}")
    flush_denormals(device)  # subnormals slow CPU arithmetic many times over (kdcli/runtime.py)
    if amp != cfg.amp:  # "auto": the run (and config.json, so a resume) uses the precision chosen here
        log(f"--amp {cfg.amp}: {amp} on {device}")
        cfg = dataclasses.replace(cfg, amp=amp)
    seed_everything(cfg.seed)  # the same initial weights in every rank
    if not cfg.model:
        raise ConfigError("--model/--student: name a model (see `kdcli zoo list`)")
    probe = resolve_ref(cfg.model).spec
    task = probe.task
    size = cfg.image_size or image_size_of(probe)
    # every weight file the run reads is checked now, before any data set or model is built
    tref = resolve_ref(cfg.teacher, role="teacher") if cfg.teacher else None
    if tref is not None and tref.weights is None:  # a zoo entry: backbone-only weights cannot make a teacher
        check_teacher_kind(tref.spec, cfg.teacher)
        if tref.spec.weights_kind != "none":  # an untrained entry is refused where the teacher is built
            required_file(tref.spec, "zoo")
    s_spec, s_weights = student_start(cfg)
    required_file(s_spec, s_weights)
    # the data's label space follows the teacher's classes (else the student's); see kdcli.data.DataHints
    hints = data_hints(probe, tref.spec if tref is not None else None, cfg.image_size,
                       fixed_head=s_weights not in (None, "backbone"))
    train_ds = build_dataset(cfg.data, task, "train", size, train=True, hints=hints)
    val_ds = build_dataset(cfg.data, task, "val", size, train=False, hints=hints)
    totals = {"train": len(train_ds), "val": len(val_ds)}  # the split sizes, before --max-*-images
    if cfg.max_train_images:
        train_ds = subset(train_ds, cfg.max_train_images)
    if cfg.max_val_images:
        val_ds = subset(val_ds, cfg.max_val_images)
    spec, weights = _resolve_student_spec(cfg, list(train_ds.classes))
    student = build_model(spec, weights).to(device)
    teacher = method = None
    if cfg.method:
        from ..methods import get as get_method

        names = [n.strip() for n in cfg.method.split("+")]
        need_teacher = any(get_method(n).needs_teacher for n in names)
        if need_teacher and not cfg.teacher:
            raise ConfigError(f"--teacher: method '{cfg.method}' needs a teacher")
    if tref is not None:
        if tref.spec.task != task:
            raise KdcliError(f"--teacher {cfg.teacher} is a {tref.spec.task} model but the student is {task}")
        if tref.spec.classes != list(train_ds.classes):
            raise KdcliError(
                f"--teacher {cfg.teacher}: predicts {len(tref.spec.classes)} classes but --data {cfg.data} has "
                f"{len(train_ds.classes)}; a teacher must be trained on the data's classes"
            )
        # every rank builds its own frozen teacher from the id; it is never wrapped in DDP
        teacher = build_model(tref.spec, tref.weights if tref.weights is not None else "zoo").to(device)
        teacher.eval()
        teacher.requires_grad_(False)
        if not cfg.skip_teacher_check:  # a teacher far below its reported score stops the run
            teacher_check(teacher, cfg.teacher, val_ds, device, cfg.teacher_check_images, amp=cfg.amp, log=log)
        if cfg.inherit:
            inherited = inherit_from_teacher(student, teacher)
            log(f"inherit: {inherited} tensors of the neck/head copied from the teacher")
        if not cfg.method:
            if not cfg.inherit:
                raise ConfigError("--method: name a distillation method (see `kdcli methods`)")
            teacher = None  # --inherit alone: the teacher only initialised the student's neck and head
    if cfg.method:
        # self-distillation methods (no teacher model) see the student's taps on both sides
        t_info = teacher.tap_info if teacher is not None else student.tap_info
        method = build_method(cfg.method, student.tap_info, t_info, task, dict(cfg.set)).to(device)
        attach_models(method, cfg, student, teacher)  # PS-KD's snapshot, HARD's augmentor (engine/augment.py)
    if cfg.sync_bn:
        if dist.world > 1:
            student = ddp.convert_sync_bn(student, dist)  # type: ignore[assignment]
        else:
            log("note: --sync-bn has no effect in a single process")
    if cfg.channels_last:
        student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    if cfg.compile:
        log(f"compile: {', '.join(compile_student(student)) or 'nothing'} (the first steps include compilation)")
    # after the models: each rank its own random streams (method masks, dropout)
    seed_everything(cfg.seed + 1_000_003 * dist.rank)
    collate = collate_detection if task == "detection" else collate_segmentation
    workers = cfg.workers if cfg.workers >= 0 else 0
    common = dict(num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0, worker_init_fn=ignore_sigint_in_worker)
    # augmentation is seeded per (seed, epoch, sample): reproducible with any worker count and on resume
    sampler = ddp.EpochSampler(train_ds, dist.world, dist.rank, cfg.seed)
    per_rank = sampler.num_samples
    batches = torch.utils.data.BatchSampler(sampler, cfg.batch_size, drop_last=per_rank > cfg.batch_size)
    train_loader = torch.utils.data.DataLoader(ddp.SeededDataset(train_ds, cfg.seed), batch_sampler=batches,
                                               generator=torch.Generator().manual_seed(cfg.seed), **common)
    val_sampler = ddp.ShardSampler(len(val_ds), dist.rank, dist.world) if dist.enabled else None
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, sampler=val_sampler,
                                             generator=torch.Generator().manual_seed(cfg.seed), **common)
    # rank 0's folder for every rank: a default folder is numbered when taken (default_run_folder)
    folder = Path(ddp.broadcast_object(str(run_folder(cfg)), dist))
    run = Run(cfg, task, folder, student, teacher, method, train_loader, val_loader, val_ds, device, log,
              dist=dist, sampler=sampler, command=command)
    # images used of each split (a card must not present a subset's score as the split's)
    run.meta["images"] = {"train": {"used": len(train_ds), "total": totals["train"]},
                          "val": {"used": len(val_ds), "total": totals["val"]}}
    if method is not None:
        # terms that are 0 by construction at this input size: said once here, not counted by the zero guard
        maps = largest_maps(student, teacher.tap_info if teacher is not None else student.tap_info)
        run.degenerate = degenerate_terms(method, maps)
        members = dict(method.methods)
        for g, why in run.degenerate.items():
            name, _, tap = g.partition(".")
            h, w = maps[tap]
            keep = [t for t in members[name].taps if f"{name}.{t}" not in run.degenerate]
            key = "taps" if len(members) == 1 else f"{name}.taps"
            drop = f"leave it out with --set {key}={','.join(keep)}" if keep else "choose larger taps with --set"
            log(f"warning: {LossGuard.describe(g)}: the map is {h}x{w} at this input size and {why}; the term "
                f"teaches nothing and the zero-loss guard ignores it ({drop})")
    run.step_module = ddp.wrap(DistillStep(student, method), dist)
    return run


def _quiet(_msg: str) -> None:
    pass


def inherit_from_teacher(student: TapModel, teacher: TapModel) -> int:
    """Copy every teacher tensor outside the backbone body whose name and shape match (the "inheriting strategy" of
    FGD/MasKD's configs: the student starts from the teacher's neck and head)."""
    t_state = teacher.net.state_dict()
    s_state = student.net.state_dict()
    n = 0
    for k, v in t_state.items():
        if k.startswith("backbone.body.") or (k.startswith("backbone.") and ".fpn." not in k
                                              and student.task == "segmentation"):
            continue
        if k in s_state and s_state[k].shape == v.shape:
            s_state[k].copy_(v)
            n += 1
    return n
