"""The run record: versions, the weight hash, ``env.json``, the header, the per-epoch progress and summary
lines of a training run. Engine-level: :class:`RunRecord` (a run callback) writes ``config.json``,
``model.json`` and ``env.json`` when a run starts, the loop prints the lines; the presentation tables of
finished results are in :mod:`kdcli.report`.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .._version import __version__
from .callbacks import Callback

if TYPE_CHECKING:
    from .build import Run


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"kdcli": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "timm", "faster-coco-eval", "safetensors", "huggingface-hub", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def weight_hash(model: Any) -> str:
    """sha256 over the model's state dict (names, dtypes and bytes), to identify exact weights."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        t = v.detach().cpu().contiguous()
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def describe_run(run: Run) -> None:
    from ..io import save_json

    cfg = run.cfg
    record: dict[str, Any] = {
        "config": cfg.to_dict(),
        "task": run.task,
        "student": {"id": cfg.model, "spec": run.student.spec.name, "init_hash": weight_hash(run.student.net)},
        "effective_batch": cfg.batch_size,
    }
    if run.meta.get("images"):
        record["images"] = run.meta["images"]
    if run.teacher is not None:
        record["teacher"] = {"id": cfg.teacher, "spec": run.teacher.spec.name, "hash": weight_hash(run.teacher.net)}
    if run.method is not None:
        record["method"] = {
            name: {"hparams": m.hp, "needs": list(m.needs)} for name, m in run.method.methods.items()
        }
    save_json(run.folder / "config.json", record)
    save_json(run.folder / "model.json", {"model": run.student.spec.to_dict()})
    save_json(run.folder / "env.json", versions())


class RunRecord(Callback):
    """At a fresh start: the resolved config, the models' hashes and versions (:func:`describe_run`), then
    the effective batch and learning-rate rule (:func:`record_training`). ``kdcli <command> --resume``
    reads the run back from ``config.json``."""

    def on_start(self, run: Run, resumed_at: int | None) -> None:
        if resumed_at is None:
            describe_run(run)
            record_training(run)


def record_training(run: Run) -> None:
    """Effective batch and learning-rate rule next to the resolved config (``config.json``)."""
    import json

    from ..io import save_json
    from .optim import effective_lr

    cfg, dist = run.cfg, run.dist
    lr = effective_lr(cfg, dist.world)
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
    save_json(path, record)


@contextmanager
def epoch_progress(run: Run, epoch: int, total: int, enabled: bool = True, start: int = 0,
                   lr: Callable[[], float] | None = None) -> Iterator[Callable[[dict], None]]:
    """The progress of one training epoch (:class:`kdcli.progress.Progress`): a bar with the epoch's
    and the run's ETA on a terminal, a plain line every ``--log-every`` steps otherwise."""
    from ..progress import Progress

    cfg = run.cfg
    info = (lambda: f"lr {lr():.3g}") if lr is not None else None
    with Progress(f"epoch {epoch + 1}/{cfg.epochs}", total, start=start, after=(cfg.epochs - epoch - 1) * total,
                  log=run.log, every=getattr(cfg, "log_every", 0), info=info, enabled=enabled) as bar:
        yield bar.advance


def run_header(run: Run, steps_per_epoch: int) -> list[str]:
    """What a run is, said once at its start: folder, device and precision, models, data, steps."""
    cfg = run.cfg
    what = cfg.model if run.teacher is None else f"{cfg.teacher} -> {cfg.model}"
    if cfg.method:
        what += f" with {cfg.method}"
    n_train = getattr(run.train_loader, "dataset", None)
    n_train_s = f"{len(n_train)}" if n_train is not None else "?"
    world = f" x {run.dist.world} processes" if run.dist.world > 1 else ""
    return [
        f"run {run.folder}  ({run.task})",
        f"  model   {what}",
        f"  data    {cfg.data}: {n_train_s} train / {len(run.val_ds)} val images",
        f"  device  {run.device}{world}, precision {'fp32' if cfg.amp == 'none' else cfg.amp}",
        f"  budget  {cfg.epochs} epochs x {steps_per_epoch} steps (batch {cfg.batch_size}"
        f"{f' x {cfg.accumulate} accumulated' if cfg.accumulate > 1 else ''}), {cfg.optimizer} lr {cfg.lr:g}, "
        f"{cfg.schedule}",
    ]


def epoch_summary(row: dict[str, Any], epochs: int, metric: str, best: float) -> str:
    """Two lines per epoch: the validation score (and best so far), lr and times; then the losses."""
    losses = {k[5:]: float(v) for k, v in row.items() if k.startswith("loss/")}
    parts = [f"epoch {row['epoch']}/{epochs}"]
    key = f"val/{metric}"
    if key in row:
        parts.append(f"{metric} {float(row[key]):.4f} (best {best:.4f})")
    parts.append(f"lr {float(row['lr']):.3g}")
    times = f"train {row['train_time_s']:.0f}s"
    if "eval_time_s" in row:
        times += f" eval {row['eval_time_s']:.0f}s"
    parts.append(times)
    text = " | ".join(parts)
    if losses:
        # wrapped at 80 columns between terms, never inside one: a method with many taps adds lines
        import textwrap

        body = f"loss {sum(losses.values()):.4g}: " + ", ".join(f"{k} {v:.3g}" for k, v in losses.items())
        text += "\n" + textwrap.fill(body, width=80, initial_indent="  ", subsequent_indent="    ",
                                     break_long_words=False, break_on_hyphens=False)
    return text
