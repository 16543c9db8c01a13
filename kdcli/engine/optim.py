"""The optimiser and the learning-rate schedule of a training run."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError


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


def trainable(student: nn.Module, method: nn.Module | None) -> list[nn.Parameter]:
    """The parameters the optimiser updates: the student's and the method's (adapters, generators)."""
    params = [p for p in student.parameters() if p.requires_grad]
    if method is not None:
        params += [p for p in method.parameters() if p.requires_grad]
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
