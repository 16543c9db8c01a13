"""The training loop for `kdcli train` (one model) and `kdcli distill` (teacher + student + method).

Per step: the student preprocesses the batch once; the student runs in train mode; the frozen
teacher runs in eval mode under ``torch.no_grad()`` on the same input and computes only the
taps the method needs; task and distillation losses are summed (each logged separately).
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import TASK_DEFAULTS, RunConfig
from ..errors import ConfigError, KdcliError, TrainingError
from ..models import TapModel, build_model
from ..zoo import ModelSpec, resolve_ref
from . import checkpoint as ckpt
from .evaluate_model import evaluate_model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_ctx(device: torch.device, amp: str) -> Any:
    if amp == "none":
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ConfigError(f"--amp {amp}: expected none, bf16 or fp16")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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


def _resolve_student_spec(cfg: RunConfig, classes: list[str]) -> tuple[ModelSpec, Path | str | None]:
    ref = resolve_ref(cfg.model)
    spec = ref.spec
    weights: Path | str | None = ref.weights
    if cfg.student_weights:
        weights = cfg.student_weights
    if len(spec.classes) != len(classes) or spec.classes != classes:
        if weights is not None:
            raise KdcliError(
                f"--model {cfg.model}: its weights have {len(spec.classes)} classes but --data {cfg.data} has "
                f"{len(classes)} ({', '.join(classes[:5])}...); train it from scratch or use matching data"
            )
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


def image_size_of(spec: ModelSpec) -> int:
    pp = spec.preprocess
    return int(pp.get("size", pp.get("min_size", 512)))


def build_run(cfg: RunConfig, log: Callable[[str], None] = print) -> Run:
    from ..data import build_dataset, collate_detection, collate_segmentation, subset
    from ..methods import build as build_method

    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    if not cfg.model:
        raise ConfigError("--model/--student: name a model (see `kdcli zoo list`)")
    probe = resolve_ref(cfg.model).spec
    task = probe.task
    size = cfg.image_size or image_size_of(probe)
    train_ds = build_dataset(cfg.data, task, "train", size, train=True)
    val_ds = build_dataset(cfg.data, task, "val", size, train=False)
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
    if cfg.teacher:
        tref = resolve_ref(cfg.teacher)
        if tref.spec.task != task:
            raise KdcliError(f"--teacher {cfg.teacher} is a {tref.spec.task} model but the student is {task}")
        if tref.spec.classes != list(train_ds.classes):
            raise KdcliError(
                f"--teacher {cfg.teacher}: predicts {len(tref.spec.classes)} classes but --data {cfg.data} has "
                f"{len(train_ds.classes)}; a teacher must be trained on the data's classes"
            )
        teacher = build_model(tref.spec, tref.weights if tref.weights is not None else "zoo").to(device)
        teacher.eval()
        teacher.requires_grad_(False)
        if cfg.inherit:
            inherited = inherit_from_teacher(student, teacher)
            log(f"inherit: {inherited} tensors of the neck/head copied from the teacher")
        if not cfg.method:
            raise ConfigError("--method: name a distillation method (see `kdcli methods`)")
    if cfg.method:
        # self-distillation methods (no teacher model) see the student's taps on both sides
        t_info = teacher.tap_info if teacher is not None else student.tap_info
        method = build_method(cfg.method, student.tap_info, t_info, task, dict(cfg.set)).to(device)
    collate = collate_detection if task == "detection" else collate_segmentation
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    workers = cfg.workers if cfg.workers >= 0 else 0
    common = dict(num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0)
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.batch_size,
        generator=g, worker_init_fn=_seed_worker, **common)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, **common)
    folder = Path(cfg.out or f"runs/{cfg.method + '-' if cfg.method else ''}{Path(cfg.model).name}")
    return Run(cfg, task, folder, student, teacher, method, train_loader, val_loader, val_ds, device, log)


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def inherit_from_teacher(student: TapModel, teacher: TapModel) -> int:
    """Copy every teacher tensor outside the backbone body whose name and shape match (§1.4)."""
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


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"--optimizer {cfg.optimizer}: expected sgd or adamw")


def _to_device(images: Any, targets: Any, device: torch.device) -> tuple[Any, Any]:
    if isinstance(images, list):
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
    else:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    return images, targets


def train_step(run: Run, images: Any, targets: Any) -> tuple[Tensor, dict[str, float]]:
    """One forward of student (+ teacher + method); returns the total loss and each term."""
    images, targets = _to_device(images, targets, run.device)
    batch = run.student.preprocess(images, targets)
    with autocast_ctx(run.device, run.cfg.amp):
        s_out = run.student(batch)
        terms: dict[str, Tensor] = dict(s_out.losses)
        if run.method is not None:
            with torch.no_grad():
                if run.teacher is not None:
                    t_out = run.teacher(batch, need=set(run.method.needs), losses=False)
                else:  # self-distillation: the method makes its own teacher output, or none
                    t_out = run.method.teacher_forward(batch, set(run.method.needs))
            terms.update(run.method(s_out, t_out, batch.targets))
    values = {k: float(v.detach()) for k, v in terms.items()}
    for k, v in values.items():
        if not math.isfinite(v):
            where = f"method '{k.split('.')[0]}', tap '{k.split('.', 1)[1]}'" if "." in k else f"task loss '{k}'"
            raise TrainingError(f"non-finite loss in {where} ({v}); the last good checkpoint is kept. "
                                "Lower --lr or the method's weight (--set weight=...)")
    total = sum(v.float() for v in terms.values())
    return total, values


def _write_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    old_rows: list[dict[str, Any]] = []
    if not new:
        with open(path) as f:
            old_rows = list(csv.DictReader(f))
    keys = list(dict.fromkeys([*(old_rows[0].keys() if old_rows else []), *row.keys()]))
    rows = [*old_rows, row]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    os.replace(tmp, path)


def main_metric(task: str) -> str:
    return "mAP" if task == "detection" else "mIoU"


def fit(run: Run, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train for ``cfg.epochs`` epochs, validating and checkpointing after each.

    ``stop_after`` ends the session after that many epochs of the schedule (the run stays
    resumable); used to split a run across sessions and by the resume test."""
    from ..report import describe_run, epoch_progress

    cfg = run.cfg
    folder = run.folder
    weights_dir = folder / "weights"
    params = _trainable(run)
    opt = make_optimizer(cfg, params)
    iters_per_epoch = max(1, len(run.train_loader))
    total_iters = cfg.epochs * iters_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_iters))
    # fp16 needs loss scaling; bf16 has float32's range and does not
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.amp == "fp16")
    start_epoch, best = 0, -1.0
    state_path = weights_dir / "last_state.pt"
    if resume:
        if not state_path.exists():
            raise TrainingError(f"--resume {folder}: no checkpoint ({state_path}) to resume from")
        state = ckpt.load_state(state_path)
        tensors = ckpt.load_tensors(weights_dir / "last.safetensors")
        run.student.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        if run.method is not None:
            run.method.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("method.")})
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        run.train_loader.generator.set_state(state["loader_rng"])
        start_epoch, best = int(state["epoch"]), float(state["best"])
        run.log(f"resumed {folder} at epoch {start_epoch}/{cfg.epochs}")
    else:
        if (folder / "results.csv").exists():
            raise ConfigError(f"--out {folder}: already holds a run; continue it with --resume {folder} "
                              "or choose another --out")
        folder.mkdir(parents=True, exist_ok=True)
        describe_run(run)
    metric_name = main_metric(run.task)
    metrics: dict[str, Any] = {}
    end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(start_epoch, end):
        run.student.train()
        if run.method is not None:
            run.method.train()
        t0 = time.time()
        sums: dict[str, float] = {}
        n = 0
        with epoch_progress(run, epoch, iters_per_epoch, enabled=progress) as advance:
            for it, (images, targets) in enumerate(run.train_loader):
                if run.method is not None:
                    run.method.set_progress(epoch, it, cfg.epochs, iters_per_epoch)
                total, values = train_step(run, images, targets)
                opt.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                n += 1
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                advance(values)
        train_time = time.time() - t0
        if run.method is not None:
            run.method.on_epoch_end(run.student, epoch)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                               "train_time_s": round(train_time, 2)}
        row.update({f"loss/{k}": round(v / max(n, 1), 6) for k, v in sums.items()})
        last_epoch = epoch + 1 == cfg.epochs
        if cfg.bn_recal > 0:
            recalibrate_bn(run.student, run.train_loader, cfg.bn_recal, run.device)
        if last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            # the latest predictions go to last/; the best epoch's are copied next to best.safetensors
            metrics = evaluate_model(run.student, run.val_loader, run.val_ds, run.device,
                                     out_dir=folder / "last", amp=cfg.amp)
            row.update({f"val/{k}": round(v, 5) for k, v in metrics.items() if isinstance(v, float)})
            score = float(metrics.get(metric_name, -1.0))
            if score > best:
                best = score
                ckpt.save_tensors(weights_dir / "best.safetensors", run.student.net.state_dict(),
                                  {"format": "pt", "epoch": str(epoch + 1), metric_name: f"{score:.5f}"})
                ckpt.save_json(folder / "metrics.json", {"epoch": epoch + 1, **metrics})
                latest = folder / "last" / "predictions.json"
                if latest.exists():
                    os.replace(latest, folder / "predictions.json")
        _write_csv(folder / "results.csv", row)
        # last state: student + method tensors (safetensors) and optimizer/RNG state
        tensors = {f"net.{k}": v for k, v in run.student.net.state_dict().items()}
        if run.method is not None:
            tensors.update({f"method.{k}": v for k, v in run.method.state_dict().items()})
        ckpt.save_tensors(weights_dir / "last.safetensors", tensors)
        ckpt.save_state(state_path, {
            "epoch": epoch + 1, "best": best, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": ckpt.rng_state(), "loader_rng": run.train_loader.generator.get_state(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        })
        run.log(" ".join(f"{k}={v}" for k, v in row.items()))
    return ckpt_metrics(folder)


def ckpt_metrics(folder: Path) -> dict[str, Any]:
    import json

    p = folder / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else {}


__all__ = ["Run", "build_run", "fit", "TASK_DEFAULTS"]
