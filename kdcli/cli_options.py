"""Command-line helpers shared by the ``kdcli`` commands, and the run options of ``kdcli train`` and
``kdcli distill`` declared once (:data:`RUN_OPTIONS`, added to both by :func:`run_options`).

Only typer here: ``kdcli --help`` imports this module and must stay torch-free.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from .config import RECIPES

_O = typer.Option


def echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def dflt(text: str, default: Any) -> str:
    return f"{text} (default: {default})" if text else f"(default: {default})"


def command_line() -> str:
    """This process's command line, as recorded in benchmark reports (``python -m kdcli`` reads as kdcli)."""
    import shlex

    prog = Path(sys.argv[0]).name
    return shlex.join(["kdcli" if prog == "__main__.py" else prog, *sys.argv[1:]])


_REF = RECIPES["reference"]
# (parameter, type, option, RunConfig key): None = not given, so the --config file, then the task's
# defaults, then RunConfig's decide; the help states the default a run gets (kdcli.config)
RUN_OPTIONS: list[tuple[str, type, Any, str]] = [
    ("set_", list[str], _O(None, "--set", help="method option key=value (method.key=value when combined); "
                                               "see `kdcli methods`"), "set"),
    ("student_weights", str, _O(None, help=dflt("initial weights: zoo | backbone (ImageNet backbone only) | FILE",
                                                "from scratch")), "student_weights"),
    ("data", str, _O(None, help=dflt("shapes | coco:/path | cityscapes:/path | semantic:/path | data.toml/.yaml",
                                     "shapes")), "data"),
    ("epochs", int, _O(None, help=dflt("", 12)), "epochs"),
    ("batch_size", int, _O(None, "--batch-size", "-b", help=dflt("images per step and process", 8)), "batch_size"),
    ("lr", float, _O(None, help=dflt("learning rate", _REF["lr"])), "lr"),
    ("optimizer", str, _O(None, help=dflt("sgd | adamw", f"{_REF['optimizer']}, momentum 0.9")), "optimizer"),
    ("weight_decay", float, _O(None, help=dflt("", _REF["weight_decay"])), "weight_decay"),
    ("schedule", str, _O(None, help=dflt("cosine | poly | step | constant", "cosine; poly for segmentation")),
     "schedule"),
    ("warmup_iters", int, _O(None, help=dflt("linear warm-up steps", _REF["warmup_iters"])), "warmup_iters"),
    ("grad_clip", float, _O(None, help=dflt("L2 max-norm, 0 disables", 35)), "grad_clip"),
    ("seed", int, _O(None, help=dflt("", 0)), "seed"),
    ("workers", int, _O(None, help=dflt("data loader processes", 2)), "workers"),
    ("image_size", int, _O(None, help=dflt("input side", "the model's size")), "image_size"),
    ("device", str, _O(None, help=dflt("auto | cpu | cuda[:i]", "auto")), "device"),
    ("amp", str, _O(None, help=dflt("none | bf16 | fp16 | auto (bf16 where the hardware has native bf16)",
                                    _REF["amp"])), "amp"),
    ("max_train_images", int, _O(None, help=dflt("train on the first N images", "0: all")), "max_train_images"),
    ("max_val_images", int, _O(None, help=dflt("validate on the first N images", "0: all")), "max_val_images"),
    ("bn_recal", int, _O(None, help=dflt("batches to re-estimate BN statistics before evaluation", 10)), "bn_recal"),
    ("out", Path, _O(None, help=dflt("run folder (refused if it holds a run)", "runs/<task>/<method>-<student>-from-"
                                     "<teacher>, numbered -2, -3... when taken")), "out"),
    ("config", Path, _O(None, help="TOML, YAML or JSON options file, or a run folder / its config.json "
                                   "(repeat a run)"), ""),
    ("resume", Path, _O(None, help="continue this run folder"), ""),
    ("accumulate", int, _O(None, help="micro-batches per optimizer step (gradient accumulation)"), "accumulate"),
    ("channels_last", bool, _O(None, "--channels-last/--no-channels-last", help="NHWC memory format"),
     "channels_last"),
    ("compile_", bool, _O(None, "--compile/--no-compile", help="torch.compile the student's backbone/neck/head"),
     "compile"),
    ("sync_bn", bool, _O(None, "--sync-bn/--no-sync-bn", help="SyncBatchNorm across processes (CUDA)"), "sync_bn"),
    ("scale_lr", bool, _O(None, "--scale-lr/--no-scale-lr", help="linear rule: lr x processes x accumulate"),
     "scale_lr"),
    ("ckpt_every_steps", int, _O(None, help="resumable checkpoint every N optimizer steps (0: epoch ends)"),
     "ckpt_every_steps"),
    ("zero_loss_steps", int, _O(None, help="stop if a distillation loss is exactly 0 N steps in a row (0: off)"),
     "zero_loss_steps"),
    ("nproc", int, _O(None, "--nproc", help="processes on this machine (DDP via torch.distributed.run)"), ""),
    ("devices", str, _O(None, "--devices", help="CUDA devices, e.g. 0,1,2,3 (one process each)"), ""),
    ("log_every", int, _O(None, "--log-every", help="steps between progress lines when stderr is not a terminal "
                                                    "(default: about 10 % of an epoch, and every 30 s)"), "log_every"),
    ("keep", str, _O(None, "--keep", help="what a finished run keeps: best (best weights only) | last (+ the newest "
                                          "resumable checkpoint) | all (default)"), "keep"),
    ("print_config", bool, _O(False, "--print-config", help="print the resolved config (JSON, usable as --config) "
                                                           "and exit"), ""),
]
KEYS = {param: key for param, _, _, key in RUN_OPTIONS if key}


def run_options(func: Callable[..., None]) -> Callable[..., None]:
    """Add :data:`RUN_OPTIONS` to a command: ``func`` declares its own options and takes the shared ones
    as ``**shared`` (parameter names as in :data:`RUN_OPTIONS`)."""
    sig = inspect.signature(func)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
             for name, kind, opt, _ in RUN_OPTIONS]

    @functools.wraps(func)
    def command(**kwargs: Any) -> None:
        func(**kwargs)

    command.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    return command


def given_options(shared: dict[str, Any]) -> dict[str, Any]:
    """The run options given on the command line, as :class:`~kdcli.config.RunConfig` keys (only they
    override a --config file)."""
    from .config import parse_sets

    opts = {KEYS[k]: v for k, v in shared.items() if k in KEYS and v is not None and v != []}
    if "set" in opts:
        opts["set"] = parse_sets(opts["set"])
    if "out" in opts:
        opts["out"] = str(opts["out"])
    return opts
