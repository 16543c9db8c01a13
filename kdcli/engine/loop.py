"""The training loop for `kdcli train` (one model) and `kdcli distill` (teacher + student + method).

Per step :func:`~kdcli.engine.step.train_step` runs teacher, student and method; task and distillation
losses are summed (each logged separately). Around it: gradient accumulation (``--accumulate``, DDP
``no_sync`` on the non-final micro-steps), AMP, guards (:mod:`kdcli.engine.guards`), checkpoints every
``--ckpt-every-steps`` optimizer steps and at each epoch end that resume bit-identically
(:mod:`kdcli.engine.state`), validation, BN recalibration, and a clean stop on SIGINT/SIGTERM. Under
torchrun every rank runs this loop; rank 0 alone logs and writes. What the run reports besides its
checkpoints, best weights and metrics.json (results.csv, the run record, mask statistics, results.png)
comes from the callbacks the caller put in ``Run.callbacks`` (:mod:`kdcli.engine.callbacks`).
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, TrainingError
from ..io import save_json, save_tensors
from . import checkpoint as ckpt
from . import distributed as ddp
from .bn import recalibrate_bn
from .build import Run
from .evaluate_model import evaluate_model
from .folders import existing_run, write_failure
from .guards import GracefulStop, Interrupted, LossGuard
from .result import StepResult
from .state import Training
from .step import train_step


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


def _fit(run: Run, resume: bool, progress: bool, stop_after: int | None, stop: GracefulStop) -> dict[str, Any]:
    from .record import epoch_progress, epoch_summary, run_header

    cfg, dist, folder = run.cfg, run.dist, run.folder
    tr = Training(run)
    if resume:
        if not any((folder / "weights" / f"{slot}_state.pt").exists() for slot in ckpt.SLOTS):
            raise TrainingError(f"--resume {folder}: no checkpoint yet (stopped before its first one); "
                                "start the run again without --resume")
        tr.restore()
        if dist.is_main:
            for callback in run.callbacks:  # e.g. results.csv drops the rows of epochs the checkpoint has not
                callback.on_start(run, tr.st.epoch)
    else:
        taken = ddp.broadcast_object(existing_run(folder), dist)  # rank 0's file system decides
        if taken:
            raise ConfigError(f"--out {folder}: already holds a run ({taken}); continue it with {run.hint} "
                              "or choose another --out")
        if dist.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            for callback in run.callbacks:  # e.g. the run record (config.json, model.json, env.json)
                callback.on_start(run, None)
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
                    result = train_step(run, images, targets)
                    result, no_grad, stop_now = _agree(run, result, tr.guard, stop.requested)
                    tr.guard.check(result, no_grad)
                    total = result.total
                    tr.scaler.scale(total / group_len if group_len > 1 else total).backward()
                values = result.terms()  # results.csv's loss/ columns
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
                        f"Continue with: {run.hint}")
                if cfg.ckpt_every_steps and st.step % cfg.ckpt_every_steps == 0 and it < batches:
                    tr.save()
        train_time = time.time() - t0
        if run.method is not None:
            run.method.on_epoch_end(run.student, epoch)  # the unwrapped student, never the DDP module
        ddp.broadcast_buffers(run.student, dist)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": tr.opt.param_groups[0]["lr"],
                               "train_time_s": round(train_time, 2)}
        row.update({f"loss/{key}": round(v / max(st.n, 1), 6) for key, v in st.sums.items()})
        for callback in run.callbacks:  # e.g. mask/<method>.<tap>.<mask>.<stat> (kdcli/engine/monitor.py)
            row.update(callback.epoch_columns(run))
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
                    save_tensors(folder / "weights" / "best.safetensors", run.student.net.state_dict(),
                                      {"format": "pt", "epoch": str(epoch + 1), metric_name: f"{score:.5f}"})
                    save_json(folder / "metrics.json", {"epoch": epoch + 1, **metrics})
                    for name in ("predictions.json", "predictions_segm.json"):  # mask models write both
                        latest = folder / "last" / name
                        if latest.exists():
                            os.replace(latest, folder / name)
        if dist.is_main:
            for callback in run.callbacks:  # results.csv, then e.g. results.png (wired by kdcli.api)
                callback.on_epoch_end(run, row)
        st.epoch, st.pos, st.sums, st.n = epoch + 1, 0, {}, 0
        tr.save()
        run.log(epoch_summary({**row, "eval_time_s": time.time() - t_eval}, cfg.epochs, metric_name, st.best))
        if epoch + 1 < end and _any_rank(run, stop.requested is not None):
            raise Interrupted(f"interrupted by {stop.requested or 'a signal on another rank'} after epoch "
                              f"{epoch + 1}; checkpoint saved in {folder / 'weights'}. "
                              f"Continue with: {run.hint}")
    if dist.is_main and end == cfg.epochs and cfg.keep != "all":
        from .keep import prune

        prune(folder, cfg.keep)
    # every rank returns rank 0's record of the best epoch
    return ddp.broadcast_object(ckpt_metrics(folder) if dist.is_main else None, dist) or metrics


def _any_rank(run: Run, flag: bool) -> bool:
    if not run.dist.enabled:
        return flag
    return bool(ddp.all_reduce_sum(torch.tensor([1.0 if flag else 0.0]), run.dist)[0] > 0)


def _agree(run: Run, result: StepResult, guard: LossGuard, stop: str | None
           ) -> tuple[StepResult, list[str], bool]:
    """Loss terms averaged over ranks, the terms some rank found without gradient, and whether any
    rank was asked to stop: one small all-reduce per micro-step, so every rank decides alike."""
    values = result.terms()
    keys = list(values)
    flags = guard.flags(result)
    if not run.dist.enabled:
        return result, [key for key, f in zip(keys, flags, strict=True) if f], stop is not None
    vec = torch.tensor([*values.values(), *flags, 1.0 if stop else 0.0], dtype=torch.float64)
    vec = ddp.all_reduce_sum(vec, run.dist)
    n = len(keys)
    avg = (vec[:n] / run.dist.world).tolist()
    no_grad = [key for key, f in zip(keys, vec[n:2 * n].tolist(), strict=True) if f > 0]
    return result.with_values(avg), no_grad, bool(vec[-1] > 0)


def main_metric(task: str) -> str:
    return "mAP" if task == "detection" else "mIoU"


def ckpt_metrics(folder: Path) -> dict[str, Any]:
    import json

    p = folder / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else {}
