"""The training loop for `kdcli train` (one model) and `kdcli distill` (teacher + student + method).

Per step: the student preprocesses the batch once; the frozen teacher runs in eval mode under
``torch.no_grad()`` on the same input and computes only the taps the method needs; the student
(train mode) and the method run inside :class:`~kdcli.engine.distributed.DistillStep` (what DDP
wraps); task and distillation losses are summed (each logged separately).

Around it: gradient accumulation (``--accumulate``, DDP ``no_sync`` on the non-final micro-steps),
AMP, guards (:mod:`kdcli.engine.guards`), checkpoints every ``--ckpt-every-steps`` optimizer steps
and at each epoch end that resume bit-identically (:mod:`kdcli.engine.checkpoint`), and a clean
stop on SIGINT/SIGTERM. Under torchrun every rank runs this loop; rank 0 alone logs and writes.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import TASK_DEFAULTS, RunConfig
from ..errors import ConfigError, KdcliError, TrainingError
from ..models import TapModel, build_model
from ..models.build import imagenet_source, required_file
from ..models.taps import TapInfo
from ..runtime import autocast_ctx, flush_denormals, resolve_amp, seed_everything
from ..zoo import ModelSpec, resolve_ref
from . import checkpoint as ckpt
from . import distributed as ddp
from .augment import attach_models, augment_batch
from .evaluate_model import evaluate_model
from .guards import GracefulStop, Interrupted, LossGuard, ignore_sigint_in_worker
from .keep import check_keep
from .monitor import checkpoint_state as mask_stats_state
from .monitor import epoch_columns as mask_columns  # mask/... columns of results.csv
from .monitor import observe as observe_internals
from .monitor import restore_state as restore_mask_stats
from .teacher_check import check_teacher_kind, teacher_check


def pick_device(name: str) -> torch.device:
    return ddp.pick_device(name)


def lr_lambda(cfg: RunConfig, total_iters: int) -> Callable[[int], float]:
    warm = max(0, min(cfg.warmup_iters, total_iters // 2))

    def f(it: int) -> float:
        if warm and it < warm:
            return 0.001 + (1 - 0.001) * it / warm  # linear warm-up from ratio 0.001 (mmdet)
        p = min(1.0, (it - warm) / max(1, total_iters - warm))
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * p))
        if cfg.schedule == "poly":
            return (1 - p) ** 0.9
        if cfg.schedule == "step":  # mmdet 2x: x0.1 at 2/3 and 11/12 of training
            return 0.1 ** ((p >= 2 / 3) + (p >= 11 / 12))
        if cfg.schedule == "constant":
            return 1.0
        raise ConfigError(f"--schedule {cfg.schedule}: expected cosine, poly, step or constant")

    return f


@torch.no_grad()
def recalibrate_bn(model: TapModel, batches: Iterable[Any], n: int, device: torch.device) -> None:
    """Re-estimate BatchNorm running statistics as a plain average over ``n`` training batches.

    Short runs leave running statistics far from the weights' (MobileNetV3 uses momentum 0.01);
    evaluating with them predicts background only. This is part of training, deterministic.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or n <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was = model.training
    model.train()
    for i, (images, _targets) in enumerate(batches):
        if i >= n:
            break
        b = model.preprocess([im.to(device) for im in images] if isinstance(images, list) else images.to(device))
        model(b, need={"seg_logits"} if model.task == "segmentation" else None, losses=False)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.train(was)


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
    command: str = "train"  # the kdcli command that started the run (resume hints; see started_by)
    # (method, tap) groups whose term is exactly 0 for any input at this run's map sizes, with the reason
    degenerate: dict[str, str] = field(default_factory=dict)
    # called on the main rank after each epoch's results.csv row, with the run folder and the log; the
    # engine never draws or publishes anything itself (the API wires results.png here)
    epoch_end: list[Callable[[Path, Callable[[str], None]], Any]] = field(default_factory=list)

    @property
    def wrapped(self) -> nn.Module:
        if self.step_module is None:
            self.step_module = ddp.DistillStep(self.student, self.method)
        return self.step_module

    @property
    def inner_step(self) -> ddp.DistillStep:
        m = self.wrapped
        return m.module if hasattr(m, "module") else m  # type: ignore[return-value]

    @property
    def batches_per_epoch(self) -> int:
        """Batches of one full epoch on this rank (the loader is shorter after a mid-epoch resume)."""
        if self.sampler is None:
            return max(1, len(self.train_loader))
        n, bs = self.sampler.num_samples, self.cfg.batch_size
        return max(1, n // bs if n > bs else 1)


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


def image_size_of(spec: ModelSpec) -> int:
    pp = spec.preprocess
    return int(pp.get("size", pp.get("min_size", 512)))


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


COMMANDS = ("train", "distill")


def started_by(cfg: RunConfig) -> str:
    """The kdcli command that starts a run like ``cfg``: this process's own command when its command
    line is ``kdcli [--offline] train|distill ...`` (also ``python -m kdcli``, as torchrun's workers run);
    otherwise ``distill`` when the run has something only ``kdcli distill`` takes (a teacher,
    ``--augment hard``, ``--inherit``), else ``train`` (a model alone, teacher-free methods,
    ``--objective mcmi``)."""
    import sys

    prog = Path(sys.argv[0]) if sys.argv else Path()
    if prog.stem == "kdcli" or (prog.name == "__main__.py" and prog.parent.name == "kdcli"):
        cmd = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        if cmd in COMMANDS:
            return cmd
    return "distill" if cfg.teacher or cfg.augment == "hard" or cfg.inherit else "train"


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


def degenerate_terms(method: nn.Module | None, maps: dict[str, tuple[int, int]]) -> dict[str, str]:
    """``method.tap`` -> why, for each term that is exactly 0 for any input at these map sizes (CWD's
    spatial softmax over a 1x1 map is 1; CanKD's instance norm of a 1x1 map is 0), as each method's
    :meth:`~kdcli.methods.base.Method.degenerate` says."""
    out: dict[str, str] = {}
    if method is None:
        return out
    for name, m in getattr(method, "methods", {"": method}).items():
        check = getattr(m, "degenerate", None)
        for tap in getattr(m, "taps", ()):
            why = check(tap, maps[tap]) if check is not None and tap in maps else None
            if why:
                out[f"{name or m.name}.{tap}"] = why
    return out


def run_folder(cfg: RunConfig) -> Path:
    """The run folder: ``--out``, else the first free ``runs/<task>/<name>[-N]`` (:func:`default_run_folder`)."""
    if cfg.out:
        return Path(cfg.out)
    from ..zoo import resolve_ref

    return default_run_folder(cfg, resolve_ref(cfg.model).spec.task)


def existing_run(folder: Path) -> str | None:
    """What in ``folder`` shows that a run already lives there (None: free for a fresh start): its
    config.json, a checkpoint of any kind, or results.csv. A run that died before its first checkpoint
    still left config.json, and a fresh start over it would let ``--resume`` mix two runs."""
    marks = ["config.json", "results.csv", *(f"weights/{s}{x}" for s in (*ckpt.SLOTS, "best")
                                            for x in (".safetensors", "_state.pt"))]
    found = [m for m in marks if (folder / m).exists()]
    return ", ".join(found) if found else None


def check_writable(folder: Path) -> None:
    """``--out`` can be written (its nearest existing folder takes a new file), checked before the
    data and the models are loaded so that a read-only place fails in a second, not after the setup."""
    import tempfile

    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {folder}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".kdcli-probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"--out {folder}: cannot write in {probe} ({err.strerror or err})") from None


def build_run(cfg: RunConfig, log: Callable[[str], None] = print, command: str | None = None) -> Run:
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
            raise ConfigError("--method: name a distillation method (see `kdcli methods`)")
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
              dist=dist, sampler=sampler, command=command if command in COMMANDS else started_by(cfg))
    # images used of each split (a card must not present a subset's score as the split's)
    run.meta["images"] = {"train": {"used": len(train_ds), "total": totals["train"]},
                          "val": {"used": len(val_ds), "total": totals["val"]}}
    if method is not None:
        # terms that are 0 by construction at this input size: said once here, not counted by the zero guard
        maps = largest_maps(student, teacher.tap_info if teacher is not None else student.tap_info)
        run.degenerate = degenerate_terms(method, maps)
        members = dict(getattr(method, "methods", {}))
        for g, why in run.degenerate.items():
            name, _, tap = g.partition(".")
            h, w = maps[tap]
            keep = [t for t in getattr(members.get(name), "taps", ()) if f"{name}.{t}" not in run.degenerate]
            key = "taps" if len(members) == 1 else f"{name}.taps"
            drop = f"leave it out with --set {key}={','.join(keep)}" if keep else "choose larger taps with --set"
            log(f"warning: {LossGuard.describe(g)}: the map is {h}x{w} at this input size and {why}; the term "
                f"teaches nothing and the zero-loss guard ignores it ({drop})")
    run.step_module = ddp.wrap(ddp.DistillStep(student, method), dist)
    return run


def _ref_name(ref: str) -> str:
    return ref.rstrip("/").replace(":", "/").split("/")[-1].split("@")[0]


def default_run_folder(cfg: RunConfig, task: str, root: Path = Path("runs")) -> Path:
    """``runs/<task>/<name>``, ``<name>-2``, ``<name>-3``, ... (the first not yet there, as Ultralytics
    numbers its runs): ``<name>`` is ``[<method>-]<model>[-from-<teacher>]``."""
    name = (f"{cfg.method.replace('+', '-')}-" if cfg.method else "") + _ref_name(cfg.model)
    if cfg.teacher:
        name += f"-from-{_ref_name(cfg.teacher)}"
    base = root / task / name
    folder, i = base, 1
    # taken: it holds a run, or anything but the lock file a failed start leaves behind (runlock.py)
    while folder.exists() and (existing_run(folder) or any(p.name != ".lock" for p in folder.iterdir())):
        i += 1
        folder = base.with_name(f"{name}-{i}")
    return folder


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


def _trainable(run: Run) -> list[nn.Parameter]:
    params = [p for p in run.student.parameters() if p.requires_grad]
    if run.method is not None:
        params += [p for p in run.method.parameters() if p.requires_grad]
    return params


def effective_lr(cfg: RunConfig, world: int) -> float:
    """``--lr``, or with ``--scale-lr`` the linear scaling rule (Goyal et al. 2017): ``--lr`` is meant for
    one process at ``--batch-size``; the effective batch is ``batch × world × accumulate``."""
    return cfg.lr * world * cfg.accumulate if cfg.scale_lr else cfg.lr


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"--optimizer {cfg.optimizer}: expected sgd or adamw")


def _to_device(images: Any, targets: Any, device: torch.device) -> tuple[Any, Any]:
    if isinstance(images, list):
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
    else:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    return images, targets


def train_step(run: Run, images: Any, targets: Any) -> tuple[Tensor, dict[str, float]]:
    """One forward of student (+ teacher + method); returns the total loss and each term.

    The terms are checked by the run's :class:`LossGuard` in :func:`fit` (after they are averaged
    over ranks); here, at the first steps, the guard looks for distillation terms without gradient
    to the student."""
    images, targets = _to_device(images, targets, run.device)
    batch = run.student.preprocess(images, targets)
    batch = augment_batch(run, batch)  # HARD (engine/augment.py); unchanged without --augment hard
    if run.cfg.channels_last:
        batch.images = batch.images.contiguous(memory_format=torch.channels_last)
    with autocast_ctx(run.device, run.cfg.amp):
        t_out = None
        if run.method is not None:
            with torch.no_grad():
                if run.teacher is not None:
                    t_out = run.teacher(batch, need=set(run.method.needs), losses=False)
                else:  # self-distillation: the method makes its own teacher output, or none
                    t_out = run.method.teacher_forward(batch, set(run.method.needs))
        terms: dict[str, Tensor] = run.wrapped(batch, t_out)
    if run.guard is not None and run.guard.needs_grad_check():
        # fp16 gradients of small losses can underflow to exactly 0: look at them scaled, as GradScaler does
        run.guard.inspect_gradients(terms, run.inner_step.last, 65536.0 if run.cfg.amp == "fp16" else 1.0)
    if run.method is not None and run.dist.is_main:  # mask statistics every few steps, never in the loss
        observe_internals(run, run.inner_step.last, t_out, batch.targets)
    run.inner_step.last = None
    if not terms:
        raise TrainingError("the model returned no loss: does the training data have targets?")
    stacked = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
    values = dict(zip(terms.keys(), stacked.tolist(), strict=True))  # one device sync for all terms
    total = sum(v.float() for v in terms.values())
    return total, values  # type: ignore[return-value]


def _write_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    old_rows: list[dict[str, Any]] = []
    if not new:
        with open(path) as f:
            old_rows = list(csv.DictReader(f))
    keys = list(dict.fromkeys([*(old_rows[0].keys() if old_rows else []), *row.keys()]))
    rows = [*old_rows, row]
    _write_rows(path, keys, rows)


def _write_rows(path: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    os.replace(tmp, path)


def _truncate_csv(path: Path, epochs: int) -> None:
    """Drop rows of epochs after ``epochs``: written before a kill, they are redone after the resume."""
    if not path.exists():
        return
    with open(path) as f:
        reader = csv.DictReader(f)
        keys = list(reader.fieldnames or [])
        rows = list(reader)
    keep = [r for r in rows if int(r.get("epoch") or 0) <= epochs]
    if len(keep) != len(rows):
        _write_rows(path, keys, keep)


def main_metric(task: str) -> str:
    return "mAP" if task == "detection" else "mIoU"


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint so that a resume continues exactly here."""

    epoch: int = 0  # epochs completed
    pos: int = 0  # batches of epoch ``epoch`` already consumed (0 at an epoch boundary)
    step: int = 0  # optimizer steps so far
    best: float = -1.0
    sums: dict[str, float] = field(default_factory=dict)  # loss sums of the current epoch (results.csv)
    n: int = 0


class _Training:
    """The pieces :func:`fit` builds (optimizer, schedule, scaler, guard) and how to (re)store them."""

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.run = run
        self.params = _trainable(run)
        self.lr = effective_lr(cfg, run.dist.world)
        self.opt = make_optimizer(cfg, self.params, self.lr)
        self.steps_per_epoch = math.ceil(run.batches_per_epoch / cfg.accumulate)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, cfg.epochs * self.steps_per_epoch))
        # fp16 needs loss scaling; bf16 has float32's range and does not
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.amp == "fp16")
        self.guard = LossGuard(run.method, cfg.zero_loss_steps, exempt=run.degenerate)
        run.guard = self.guard
        self.generators = ckpt.module_generators(run.method)
        self.st = LoopState()
        self.last_intact = True  # False after resuming from prev: the damaged last pair must not become prev

    # -- checkpoint ---------------------------------------------------------------------------------
    def tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        run = self.run
        tensors = {f"net.{k}": v for k, v in run.student.net.state_dict().items()}
        extra: dict[str, Any] = {}
        if run.method is not None:
            for k, v in run.method.state_dict().items():
                if isinstance(v, Tensor):
                    tensors[f"method.{k}"] = v
                else:  # get_extra_state() of a method: plain Python values
                    extra[k] = v
        return tensors, extra

    def save(self) -> None:
        """Collective: every rank's RNG state goes to rank 0, which writes the checkpoint."""
        run, st = self.run, self.st
        ddp.broadcast_buffers(run.student, run.dist)  # the BN statistics rank 0 saves are everyone's
        rngs = ddp.gather_objects(ckpt.rng_state(self.generators), run.dist)
        tensors, extra = self.tensors()
        if run.dist.enabled:
            self._check_ranks_agree(tensors)
        if not run.dist.is_main:
            self.guard.saved = True
            return
        rotate, self.last_intact = self.last_intact, True
        ckpt.save_checkpoint(run.folder / "weights", tensors, {
            "epoch": st.epoch, "pos": st.pos, "step": st.step, "best": st.best, "sums": dict(st.sums), "n": st.n,
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rngs, "guard": self.guard.state_dict(), "method_extra": extra, "mask_stats": mask_stats_state(run),
            "world": run.dist.world, "batch_size": run.cfg.batch_size, "accumulate": run.cfg.accumulate,
        }, rotate=rotate)
        self.guard.saved = True  # only once written: a failed first write has nothing to fall back on

    def _check_ranks_agree(self, tensors: dict[str, Tensor]) -> None:
        import hashlib

        h = hashlib.sha256()
        for k, v in tensors.items():
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        hashes = ddp.gather_objects(h.hexdigest(), self.run.dist)
        if len(set(hashes)) > 1:
            raise TrainingError(f"the ranks hold different weights at step {self.st.step} (a DDP "
                                "synchronisation failed); the checkpoint was not written")

    def restore(self) -> None:
        run, cfg = self.run, self.run.cfg
        loaded = ckpt.load_checkpoint(run.folder / "weights")
        for line in loaded.skipped:
            run.log(f"resume: skipped {line}")
        self.last_intact = loaded.slot == "last"
        state, tensors = loaded.state, loaded.tensors
        run.student.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        if run.method is not None:
            m_state: dict[str, Any] = {k[7:]: v for k, v in tensors.items() if k.startswith("method.")}
            m_state.update(state.get("method_extra", {}))
            run.method.load_state_dict(m_state)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.guard.load_state_dict(state.get("guard", {}))
        self.guard.saved = True
        restore_mask_stats(run, state.get("mask_stats"))
        st = LoopState(int(state["epoch"]), int(state.get("pos", 0)), int(state.get("step", 0)),
                       float(state["best"]), dict(state.get("sums", {})), int(state.get("n", 0)))
        same_layout = (int(state.get("world", 1)), int(state.get("batch_size", cfg.batch_size)),
                       int(state.get("accumulate", 1))) == (run.dist.world, cfg.batch_size, cfg.accumulate)
        if st.pos and not same_layout:
            raise ConfigError(
                f"--resume {run.folder}: the checkpoint is {st.pos} batches into epoch {st.epoch + 1} with "
                f"{state.get('world', 1)} process(es); resume with the same number of processes")
        rngs = state["rng"]
        if isinstance(rngs, dict):  # format 1: one process
            rngs = [rngs]
        if len(rngs) == run.dist.world:
            ckpt.set_rng_state(rngs[run.dist.rank], self.generators)
        else:
            seed_everything(cfg.seed + 1_000_003 * run.dist.rank + st.step)
            run.log(f"resume: {len(rngs)} process(es) wrote the checkpoint, {run.dist.world} resume it: "
                    "random streams are re-seeded (the run stays valid but is not bit-identical)")
        self.st = st
        where = f"epoch {st.epoch + 1}, batch {st.pos}" if st.pos else f"epoch {st.epoch}/{cfg.epochs} done"
        run.log(f"resumed {run.folder} at {where} (step {st.step}, from {loaded.slot}_state.pt)")

    # -- one optimizer step ---------------------------------------------------------------------------
    def optimizer_step(self) -> None:
        cfg = self.run.cfg
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.st.step += 1


def _record_training(run: Run, lr: float) -> None:
    """Effective batch and learning-rate rule next to the resolved config (``config.json``)."""
    import json

    cfg, dist = run.cfg, run.dist
    path = run.folder / "config.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record["command"] = run.command  # `kdcli <command> --resume` continues the run (api.resume reads it)
    record["effective_batch"] = cfg.batch_size * dist.world * cfg.accumulate
    record["training"] = {
        "world_size": dist.world, "backend": dist.backend or "none", "batch_per_process": cfg.batch_size,
        "accumulate": cfg.accumulate, "effective_batch": record["effective_batch"],
        "lr_rule": "linear: lr x world_size x accumulate" if cfg.scale_lr else "none: --lr as given",
        "lr_given": cfg.lr, "lr_used": lr, "amp": cfg.amp, "channels_last": cfg.channels_last,
        "compile": cfg.compile, "sync_bn": cfg.sync_bn and dist.world > 1,
        "ddp": "student + method in one DistributedDataParallel, find_unused_parameters=True"
               if dist.enabled else "none",
    }
    ckpt.save_json(path, record)


def _resume_hint(run: Run) -> str:
    """The command line that continues ``run``: the kdcli command that started it (``train`` even for
    ``kdcli train --method pskd`` / ``--objective mcmi``), under torchrun when it runs there."""
    cmd = run.command if run.command in COMMANDS else started_by(run.cfg)
    launch = f"torchrun --nproc_per_node {run.dist.world} -m kdcli" if run.dist.enabled else "kdcli"
    return f"{launch} {cmd} --resume {run.folder}"


def fit(run: Run, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train for ``cfg.epochs`` epochs, validating and checkpointing after each.

    ``stop_after`` ends the session after that many epochs of the schedule (the run stays
    resumable); used to split a run across sessions and by the resume test."""
    with GracefulStop() as stop:  # from here on a signal stops at the next step boundary, with a checkpoint
        try:
            return _fit(run, resume, progress, stop_after, stop)
        except (OSError, RuntimeError) as err:
            reason = write_failure(err, run.folder)
            if reason is None:
                raise
            kept = "the last complete checkpoint in weights/ is kept" if run.guard is not None and run.guard.saved \
                else "no checkpoint had been written yet"
            raise TrainingError(f"--out {run.folder}: cannot write ({reason}); {kept}") from None


# errno values that mean the run folder cannot take more bytes, whatever file was being written
_NO_SPACE = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def write_failure(err: BaseException, folder: Path) -> str | None:
    """One line for an error that is the run folder refusing a write (full disk, read-only, quota,
    permissions), else None. ``torch.save`` reports a failed write as a RuntimeError of its zip writer."""
    if isinstance(err, OSError):
        where = str(getattr(err, "filename", "") or "")
        ours = where.startswith(str(folder)) or not where
        if err.errno in _NO_SPACE or (err.errno in (errno.EACCES, errno.EPERM) and ours):
            return f"{err.strerror or os.strerror(err.errno or 0)}" + (" - disk full?" if err.errno == errno.ENOSPC
                                                                      else "")
        return None
    text = str(err)
    if "PytorchStreamWriter" in text or "inline_container" in text or "file write failed" in text:
        return "the checkpoint writer failed (disk full or read-only?)"
    return None


def _fit(run: Run, resume: bool, progress: bool, stop_after: int | None, stop: GracefulStop) -> dict[str, Any]:
    from .record import describe_run, epoch_progress, epoch_summary, run_header

    cfg, dist, folder = run.cfg, run.dist, run.folder
    tr = _Training(run)
    if resume:
        if not any((folder / "weights" / f"{slot}_state.pt").exists() for slot in ckpt.SLOTS):
            raise TrainingError(f"--resume {folder}: no checkpoint yet (stopped before its first one); "
                                "start the run again without --resume")
        tr.restore()
        if dist.is_main:
            _truncate_csv(folder / "results.csv", tr.st.epoch)
    else:
        taken = ddp.broadcast_object(existing_run(folder), dist)  # rank 0's file system decides
        if taken:
            raise ConfigError(f"--out {folder}: already holds a run ({taken}); continue it with {_resume_hint(run)} "
                              "or choose another --out")
        if dist.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            describe_run(run)
            _record_training(run, tr.lr)
    if dist.is_main and progress:
        for line in run_header(run, tr.steps_per_epoch):
            run.log(line)
    st = tr.st
    metric_name = main_metric(run.task)
    metrics: dict[str, Any] = {}
    k = cfg.accumulate
    batches = run.batches_per_epoch
    end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(st.epoch, end):
        run.student.train()
        if run.method is not None:
            run.method.train()
        if run.sampler is not None:
            run.sampler.set_epoch(epoch, skip=st.pos * cfg.batch_size)
        t0 = time.time()
        with epoch_progress(run, epoch, batches, enabled=progress and dist.is_main, start=st.pos,
                            lr=lambda: tr.opt.param_groups[0]["lr"]) as advance:
            it = st.pos
            for images, targets in run.train_loader:
                if run.method is not None:
                    run.method.set_progress(epoch, it, cfg.epochs, batches)
                group = it - it % k
                group_len = min(k, batches - group)
                last_micro = it + 1 == group + group_len
                # DDP averages gradients only on the last micro-batch of an accumulation group
                no_sync = run.wrapped.no_sync() if dist.enabled and not last_micro else nullcontext()
                with no_sync:
                    total, values = train_step(run, images, targets)
                    values, no_grad, stop_now = _agree(run, values, tr.guard, stop.requested)
                    tr.guard.check(values, no_grad)
                    tr.scaler.scale(total / group_len if group_len > 1 else total).backward()
                it += 1
                st.n += 1
                for key, v in values.items():
                    st.sums[key] = st.sums.get(key, 0.0) + v
                advance(values)
                if not last_micro:
                    continue
                tr.optimizer_step()
                st.pos = it
                if stop_now:
                    tr.save()
                    raise Interrupted(
                        f"interrupted by {stop.requested or 'a signal on another rank'} at epoch {epoch + 1}, "
                        f"batch {it}/{batches} (step {st.step}); checkpoint saved in {folder / 'weights'}. "
                        f"Continue with: {_resume_hint(run)}")
                if cfg.ckpt_every_steps and st.step % cfg.ckpt_every_steps == 0 and it < batches:
                    tr.save()
        train_time = time.time() - t0
        if run.method is not None:
            run.method.on_epoch_end(run.student, epoch)  # the unwrapped student, never the DDP module
        ddp.broadcast_buffers(run.student, dist)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": tr.opt.param_groups[0]["lr"],
                               "train_time_s": round(train_time, 2)}
        row.update({f"loss/{key}": round(v / max(st.n, 1), 6) for key, v in st.sums.items()})
        row.update(mask_columns(run))  # mask/<method>.<tap>.<mask>.<stat> (kdcli/engine/monitor.py)
        last_epoch = epoch + 1 == cfg.epochs
        if cfg.bn_recal > 0:
            if run.sampler is not None:
                run.sampler.set_epoch(epoch)
            recalibrate_bn(run.student, run.train_loader, cfg.bn_recal, run.device)
            ddp.average_bn_statistics(run.student, dist)
        t_eval = time.time()
        if last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            # the latest predictions go to last/; the best epoch's are copied next to best.safetensors
            shard = ddp.EvalShard(dist, run.val_ds) if dist.enabled else None
            metrics = evaluate_model(run.student, run.val_loader, run.val_ds, run.device,
                                     out_dir=folder / "last" if dist.is_main else None, amp=cfg.amp, shard=shard,
                                     progress=progress)
            row.update({f"val/{key}": round(v, 5) for key, v in metrics.items() if isinstance(v, float)})
            score = float(metrics.get(metric_name, -1.0))
            if score > st.best:
                st.best = score
                if dist.is_main:
                    ckpt.save_tensors(folder / "weights" / "best.safetensors", run.student.net.state_dict(),
                                      {"format": "pt", "epoch": str(epoch + 1), metric_name: f"{score:.5f}"})
                    ckpt.save_json(folder / "metrics.json", {"epoch": epoch + 1, **metrics})
                    for name in ("predictions.json", "predictions_segm.json"):  # mask models write both
                        latest = folder / "last" / name
                        if latest.exists():
                            os.replace(latest, folder / name)
        if dist.is_main:
            _write_csv(folder / "results.csv", row)
            for callback in run.epoch_end:  # e.g. results.png (kdcli.viz.plots, wired by kdcli.api)
                callback(folder, run.log)
        st.epoch, st.pos, st.sums, st.n = epoch + 1, 0, {}, 0
        tr.save()
        run.log(epoch_summary({**row, "eval_time_s": time.time() - t_eval}, cfg.epochs, metric_name, st.best))
        if epoch + 1 < end and _any_rank(run, stop.requested is not None):
            raise Interrupted(f"interrupted by {stop.requested or 'a signal on another rank'} after epoch "
                              f"{epoch + 1}; checkpoint saved in {folder / 'weights'}. "
                              f"Continue with: {_resume_hint(run)}")
    if dist.is_main and end == cfg.epochs and cfg.keep != "all":
        from .keep import prune

        prune(folder, cfg.keep)
    # every rank returns rank 0's record of the best epoch
    return ddp.broadcast_object(ckpt_metrics(folder) if dist.is_main else None, dist) or metrics


def _any_rank(run: Run, flag: bool) -> bool:
    if not run.dist.enabled:
        return flag
    return bool(ddp.all_reduce_sum(torch.tensor([1.0 if flag else 0.0]), run.dist)[0] > 0)


def _agree(run: Run, values: dict[str, float], guard: LossGuard, stop: str | None
           ) -> tuple[dict[str, float], list[str], bool]:
    """Loss terms averaged over ranks, the terms some rank found without gradient, and whether any
    rank was asked to stop: one small all-reduce per micro-step, so every rank decides alike."""
    keys = list(values)
    flags = guard.flags(keys)
    if not run.dist.enabled:
        return values, [key for key, f in zip(keys, flags, strict=True) if f], stop is not None
    vec = torch.tensor([*values.values(), *flags, 1.0 if stop else 0.0], dtype=torch.float64)
    vec = ddp.all_reduce_sum(vec, run.dist)
    n = len(keys)
    avg = (vec[:n] / run.dist.world).tolist()
    no_grad = [key for key, f in zip(keys, vec[n:2 * n].tolist(), strict=True) if f > 0]
    return dict(zip(keys, avg, strict=True)), no_grad, bool(vec[-1] > 0)


def ckpt_metrics(folder: Path) -> dict[str, Any]:
    import json

    p = folder / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else {}


__all__ = ["Interrupted", "Run", "build_run", "fit", "inherit_from_teacher", "recalibrate_bn", "train_step",
           "TASK_DEFAULTS"]
