"""The training state that a checkpoint saves and a resume restores: where the loop stands
(:class:`LoopState`), and the optimizer, schedule, scaler, guard, random streams and callbacks' state
(:class:`Training`), written through :mod:`kdcli.engine.checkpoint` so that a resume is bit-identical."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, TrainingError
from ..runtime import seed_everything
from . import checkpoint as ckpt
from . import distributed as ddp
from .build import Run
from .guards import LossGuard
from .optim import effective_lr, lr_lambda, make_optimizer, trainable


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint so that a resume continues exactly here."""

    epoch: int = 0  # epochs completed
    pos: int = 0  # batches of epoch ``epoch`` already consumed (0 at an epoch boundary)
    step: int = 0  # optimizer steps so far
    best: float = -1.0
    sums: dict[str, float] = field(default_factory=dict)  # loss sums of the current epoch (results.csv)
    n: int = 0


class Training:
    """The pieces the loop builds (optimizer, schedule, scaler, guard) and how to (re)store them."""

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.run = run
        self.params = trainable(run.student, run.method)
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
            "rng": rngs, "guard": self.guard.state_dict(), "method_extra": extra,
            **{cb.state_key: cb.state_dict(run) for cb in run.callbacks if cb.state_key},  # e.g. mask_stats
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
        for cb in run.callbacks:
            if cb.state_key:
                cb.load_state_dict(run, state.get(cb.state_key))
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
