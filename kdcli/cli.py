"""The ``kdcli`` command line. Thin: parses options and calls :mod:`kdcli.api`.

Heavy libraries (torch, torchvision, timm) are imported inside commands so ``kdcli --help`` is
instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from .errors import ConfigError, KdcliError, UserInterrupt

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation for dense prediction on torchvision/timm models.")
zoo_app = typer.Typer(no_args_is_help=True, help="The model zoo: list, show, fetch weights, import checkpoints.")
data_app = typer.Typer(no_args_is_help=True, help="Embedded data sets.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(data_app, name="data")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: every method's quality at one budget; step time.")
app.add_typer(bench_app, name="bench")


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def _show_version(value: bool) -> None:
    if value:
        from ._version import __version__

        typer.echo(f"kdcli {__version__}")
        raise typer.Exit()


@app.callback()
def _global(offline: bool = typer.Option(False, "--offline", help="no downloads at all (also KDCLI_OFFLINE=1); "
                                          "sets HF_HUB_OFFLINE before huggingface_hub is imported"),
            zoo: list[Path] = typer.Option(None, "--zoo", help="your own zoo entries: a TOML of the manifest's form "
                                           "(also KDCLI_ZOO, several joined by the path separator)"),
            version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                         help="print the version and exit")) -> None:
    """Knowledge distillation for dense prediction on torchvision/timm models."""
    import os

    if zoo:
        from .zoo import ZOO_ENV

        os.environ[ZOO_ENV] = os.pathsep.join([*filter(None, [os.environ.get(ZOO_ENV)]), *(str(p) for p in zoo)])

    if offline or os.environ.get("KDCLI_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        from .weights import set_offline

        set_offline()


# Training options shared by `train` and `distill` (None = not given: the config file/defaults decide).
def _train_options(
    data: str | None, epochs: int | None, batch_size: int | None, lr: float | None, optimizer: str | None,
    weight_decay: float | None, schedule: str | None, warmup_iters: int | None, grad_clip: float | None,
    seed: int | None, workers: int | None, image_size: int | None, device: str | None, amp: str | None,
    max_train_images: int | None, max_val_images: int | None, bn_recal: int | None, out: Path | None,
) -> dict[str, Any]:
    given = dict(data=data, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                 weight_decay=weight_decay, schedule=schedule, warmup_iters=warmup_iters, grad_clip=grad_clip,
                 seed=seed, workers=workers, image_size=image_size, device=device, amp=amp,
                 max_train_images=max_train_images, max_val_images=max_val_images, bn_recal=bn_recal,
                 out=str(out) if out else None)
    return {k: v for k, v in given.items() if v is not None}


def _scale_options(accumulate: int | None, channels_last: bool | None, compile_: bool | None,
                   sync_bn: bool | None, scale_lr: bool | None, ckpt_every_steps: int | None,
                   zero_loss_steps: int | None) -> dict[str, Any]:
    """Speed and reliability options (docs/distributed.md, docs/reliability.md); None = not given."""
    given = dict(accumulate=accumulate, channels_last=channels_last, compile=compile_, sync_bn=sync_bn,
                 scale_lr=scale_lr, ckpt_every_steps=ckpt_every_steps, zero_loss_steps=zero_loss_steps)
    return {k: v for k, v in given.items() if v is not None}


def _maybe_launch(nproc: int | None, devices: str | None) -> None:
    """``--nproc N`` / ``--devices 0,1``: re-run this command under torch.distributed.run (one machine)."""
    if not (devices or (nproc or 1) > 1):
        return  # one process: torch is not imported before the cheap option checks
    from .engine.distributed import launch, launched_by_torchrun

    if not launched_by_torchrun():
        sys.exit(launch(nproc, devices, sys.argv[1:]))


def _run_training(options: dict[str, Any], config: Path | None, resume: Path | None,
                  print_config: bool = False) -> None:
    from . import api
    from .config import RunConfig, read_config_file

    if print_config:
        import json

        base = read_config_file(resume if resume is not None else config) if (config or resume) else {}
        cfg = (RunConfig.from_dict(base, str(config)) if base else RunConfig()).merged(options)
        typer.echo(json.dumps(api.resolve_config(cfg, set(base) | set(options)).to_dict(), indent=2))
        return
    if resume is not None:
        if config is not None or set(options) - {"model", "teacher", "method"}:
            _echo("note: --resume continues the run with its recorded config.json; other options are ignored")
        folder, metrics = api.resume(resume, log=_echo)
    else:
        base = read_config_file(config) if config else {}
        explicit = set(base) | set(options)
        cfg = RunConfig.from_dict(base, str(config)) if base else RunConfig()
        cfg = cfg.merged(options)
        folder, metrics = api.train(cfg, log=_echo, explicit=explicit)
    import os

    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        _print_result(folder, metrics)


def _print_result(folder: Path, metrics: dict[str, Any]) -> None:
    """The best epoch's scores as a table and what the run folder holds (stdout)."""
    from rich.console import Console

    from .report import fmt_bytes, folder_size, scores_table

    epoch = metrics.get("epoch")
    if any(isinstance(v, float) for v in metrics.values()):
        Console(soft_wrap=False).print(scores_table(metrics, f"best epoch{f' ({epoch})' if epoch else ''}"))
    typer.echo(f"run folder: {folder} ({fmt_bytes(folder_size(folder))})")


_O = typer.Option
# scale and reliability options shared by `train` and `distill` (one definition, one help text)
_SCALE = {
    "accumulate": _O(None, help="micro-batches per optimizer step (gradient accumulation)"),
    "channels_last": _O(None, "--channels-last/--no-channels-last", help="NHWC memory format"),
    "compile": _O(None, "--compile/--no-compile", help="torch.compile the student's backbone/neck/head"),
    "sync_bn": _O(None, "--sync-bn/--no-sync-bn", help="SyncBatchNorm across processes (CUDA)"),
    "scale_lr": _O(None, "--scale-lr/--no-scale-lr", help="linear rule: lr x processes x accumulate"),
    "ckpt_every_steps": _O(None, help="resumable checkpoint every N optimizer steps (0: epoch ends)"),
    "zero_loss_steps": _O(None, help="stop if a distillation loss is exactly 0 N steps in a row (0: off)"),
    "nproc": _O(None, "--nproc", help="processes on this machine (DDP via torch.distributed.run)"),
    "devices": _O(None, "--devices", help="CUDA devices, e.g. 0,1,2,3 (one process each)"),
    "keep": _O(None, "--keep", help="what a finished run keeps: best (best weights only) | last (+ the newest "
                                    "resumable checkpoint) | all (default)"),
    "print_config": _O(False, "--print-config", help="print the resolved config (JSON, usable as --config) "
                                                    "and exit"),
    "log_every": _O(None, "--log-every", help="steps between progress lines when stderr is not a terminal "
                                              "(default: about 10 % of an epoch, and every 30 s)"),
}


def _dflt(text: str, default: Any) -> str:
    return f"{text} (default: {default})" if text else f"(default: {default})"


# training options shared by `train` and `distill`: None = not given (the --config file, then the task's
# defaults, then RunConfig's decide); the help states the default a run gets (kdcli.config)
_TRAIN = {
    "data": _O(None, help=_dflt("shapes | coco:/path | cityscapes:/path | semantic:/path | data.toml/.yaml",
                                "shapes")),
    "epochs": _O(None, help=_dflt("", 12)),
    "batch_size": _O(None, "--batch-size", "-b", help=_dflt("images per step and process", 8)),
    "lr": _O(None, help=_dflt("learning rate", 0.01)),
    "optimizer": _O(None, help=_dflt("sgd | adamw", "sgd")),
    "weight_decay": _O(None, help=_dflt("", "1e-4")),
    "schedule": _O(None, help=_dflt("cosine | poly | step | constant", "cosine; poly for segmentation")),
    "warmup_iters": _O(None, help=_dflt("linear warm-up steps", 100)),
    "grad_clip": _O(None, help=_dflt("L2 max-norm, 0 disables", 35)),
    "seed": _O(None, help=_dflt("", 0)),
    "workers": _O(None, help=_dflt("data loader processes", 2)),
    "image_size": _O(None, help=_dflt("input side", "the model's size")),
    "device": _O(None, help=_dflt("auto | cpu | cuda[:i]", "auto")),
    "amp": _O(None, help=_dflt("none | bf16 | fp16 | auto (bf16 where the hardware has native bf16)", "none")),
    "max_train_images": _O(None, help=_dflt("train on the first N images", "0: all")),
    "max_val_images": _O(None, help=_dflt("validate on the first N images", "0: all")),
    "bn_recal": _O(None, help=_dflt("batches to re-estimate BN statistics before evaluation", 10)),
    "out": _O(None, help=_dflt("run folder (refused if it holds a run)",
                               "runs/<task>/<method>-<student>-from-<teacher>, numbered -2, -3... when taken")),
    "config": _O(None, help="TOML, YAML or JSON options file, or a run folder / its config.json (repeat a run)"),
    "resume": _O(None, help="continue this run folder"),
    "student_weights": _O(None, help=_dflt("initial weights: zoo | backbone (ImageNet backbone only) | FILE",
                                           "from scratch")),
    "set": _O(None, "--set", help="method option key=value (method.key=value when combined); see `kdcli methods`"),
}


@app.command()
def train(
    model: str = _O(None, "--model", "-m", help="zoo name, run folder, exported folder or hf-hub:org/name"),
    data: str = _TRAIN["data"], epochs: int = _TRAIN["epochs"], batch_size: int = _TRAIN["batch_size"],
    lr: float = _TRAIN["lr"], optimizer: str = _TRAIN["optimizer"], weight_decay: float = _TRAIN["weight_decay"],
    schedule: str = _TRAIN["schedule"], warmup_iters: int = _TRAIN["warmup_iters"],
    grad_clip: float = _TRAIN["grad_clip"], seed: int = _TRAIN["seed"], workers: int = _TRAIN["workers"],
    image_size: int = _TRAIN["image_size"], device: str = _TRAIN["device"], amp: str = _TRAIN["amp"],
    max_train_images: int = _TRAIN["max_train_images"], max_val_images: int = _TRAIN["max_val_images"],
    bn_recal: int = _TRAIN["bn_recal"], out: Path = _TRAIN["out"], config: Path = _TRAIN["config"],
    resume: Path = _TRAIN["resume"],
    method: str = _O(None, "--method", help="teacher-free (self-KD) method(s) only, e.g. pskd or uskd"),
    objective: str = _O(None, "--objective", help=_dflt("ce | mcmi (MCMI teacher fine-tuning: CE − 0.15·CMI)",
                                                        "ce")),
    student_weights: str = _TRAIN["student_weights"], set_: list[str] = _TRAIN["set"],
    accumulate: int = _SCALE["accumulate"], channels_last: bool = _SCALE["channels_last"],
    compile_: bool = _SCALE["compile"], sync_bn: bool = _SCALE["sync_bn"], scale_lr: bool = _SCALE["scale_lr"],
    ckpt_every_steps: int = _SCALE["ckpt_every_steps"], zero_loss_steps: int = _SCALE["zero_loss_steps"],
    nproc: int = _SCALE["nproc"], devices: str = _SCALE["devices"], log_every: int = _SCALE["log_every"],
    keep: str = _SCALE["keep"], print_config: bool = _SCALE["print_config"],
) -> None:
    """Train one model (used to make teachers), optionally with a self-KD method or the MCMI objective."""
    from .config import parse_sets

    _maybe_launch(nproc, devices)
    opts = _train_options(data, epochs, batch_size, lr, optimizer, weight_decay, schedule, warmup_iters,
                          grad_clip, seed, workers, image_size, device, amp, max_train_images, max_val_images,
                          bn_recal, out)
    opts.update(_scale_options(accumulate, channels_last, compile_, sync_bn, scale_lr, ckpt_every_steps,
                               zero_loss_steps))
    if log_every is not None:
        opts["log_every"] = log_every
    if keep is not None:
        opts["keep"] = keep
    if model:
        opts["model"] = model
    elif resume is None and config is None:
        raise ConfigError("kdcli train: missing --model (a zoo name, run folder or exported folder), "
                          "or give --config / --resume")
    # teacher-free methods and --objective mcmi on `train`
    if method:
        _check_teacher_free(method)
        opts["method"] = method
    if objective:
        opts["objective"] = objective
    if student_weights:
        opts["student_weights"] = student_weights
    if set_:
        opts["set"] = parse_sets(set_)
    _run_training(opts, config, resume, print_config)


@app.command()
def distill(
    method: str = _O(None, "--method", help="method name, or several joined by + (cwd+fgd)"),
    teacher: str = _O(None, "--teacher", "-t", help="zoo name, run folder, exported folder or hf-hub:org/name"),
    student: str = _O(None, "--student", "-s", help="zoo name, run folder, exported folder or hf-hub:org/name"),
    set_: list[str] = _TRAIN["set"],
    inherit: bool = _O(False, "--inherit", help="initialise the student's neck/head from the teacher"),
    skip_teacher_check: bool = _O(False, "--skip-teacher-check",
                                  help="do not stop when the teacher scores far below its reported metric"),
    teacher_check_images: int = _O(None, help=_dflt("validation images for the teacher check (0: skip)", 50)),
    student_weights: str = _TRAIN["student_weights"],
    data: str = _TRAIN["data"], epochs: int = _TRAIN["epochs"], batch_size: int = _TRAIN["batch_size"],
    lr: float = _TRAIN["lr"], optimizer: str = _TRAIN["optimizer"], weight_decay: float = _TRAIN["weight_decay"],
    schedule: str = _TRAIN["schedule"], warmup_iters: int = _TRAIN["warmup_iters"],
    grad_clip: float = _TRAIN["grad_clip"], seed: int = _TRAIN["seed"], workers: int = _TRAIN["workers"],
    image_size: int = _TRAIN["image_size"], device: str = _TRAIN["device"], amp: str = _TRAIN["amp"],
    max_train_images: int = _TRAIN["max_train_images"], max_val_images: int = _TRAIN["max_val_images"],
    bn_recal: int = _TRAIN["bn_recal"], out: Path = _TRAIN["out"], config: Path = _TRAIN["config"],
    resume: Path = _TRAIN["resume"],
    augment: str = _O(None, "--augment", help=_dflt("none | hard (HARD's learned augmentations; --set hard.k=v)",
                                                    "none")),
    accumulate: int = _SCALE["accumulate"], channels_last: bool = _SCALE["channels_last"],
    compile_: bool = _SCALE["compile"], sync_bn: bool = _SCALE["sync_bn"], scale_lr: bool = _SCALE["scale_lr"],
    ckpt_every_steps: int = _SCALE["ckpt_every_steps"], zero_loss_steps: int = _SCALE["zero_loss_steps"],
    nproc: int = _SCALE["nproc"], devices: str = _SCALE["devices"], log_every: int = _SCALE["log_every"],
    keep: str = _SCALE["keep"], print_config: bool = _SCALE["print_config"],
) -> None:
    """Distil a teacher into a student with a method (self-KD methods need no --teacher)."""
    from .config import parse_sets

    _maybe_launch(nproc, devices)
    opts = _train_options(data, epochs, batch_size, lr, optimizer, weight_decay, schedule, warmup_iters,
                          grad_clip, seed, workers, image_size, device, amp, max_train_images, max_val_images,
                          bn_recal, out)
    opts.update(_scale_options(accumulate, channels_last, compile_, sync_bn, scale_lr, ckpt_every_steps,
                               zero_loss_steps))
    if log_every is not None:
        opts["log_every"] = log_every
    if keep is not None:
        opts["keep"] = keep
    given = {"model": student, "teacher": teacher, "method": method}
    opts.update({k: v for k, v in given.items() if v})
    if augment:
        opts["augment"] = augment
    if resume is None and config is None:
        # a self-KD method (pskd, uskd) runs without --teacher; the engine names a method that needs one
        missing = [f"--{'student' if k == 'model' else k}" for k, v in given.items() if not v and k != "teacher"]
        if missing:
            raise ConfigError(f"kdcli distill: missing {', '.join(missing)} (or give --config / --resume)")
    # only options given on the command line override a --config file
    if set_:
        opts["set"] = parse_sets(set_)
    if inherit:
        opts["inherit"] = True
    if skip_teacher_check:
        opts["skip_teacher_check"] = True
    if teacher_check_images is not None:
        opts["teacher_check_images"] = teacher_check_images
    if student_weights:
        opts["student_weights"] = student_weights
    _run_training(opts, config, resume, print_config)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="run folder, exported folder, zoo name or hf-hub:org/name (cached)"),
    data: str = _O(None, help="shapes | coco:/path | cityscapes:/path | semantic:/path | data.toml/.yaml "
                              "(default: a run's own data, else shapes)"),
    batch_size: int = _O(8, "--batch-size", "-b"), device: str = _O("auto"),
    max_val_images: int = _O(None, "--max-val-images", help="evaluate the first N validation images "
                             "(0: all; default: a run's own --max-val-images, else all)"),
    max_images: int = _O(None, "--max-images", hidden=True),  # the old name of --max-val-images
    per_class: bool = _O(False, "--per-class", help="AP / IoU per class"),
    out: Path = _O(None, help="folder for metrics.json and predictions.json (detection)"), workers: int = _O(2),
    slide: str = _O(None, help="segmentation sliding-window inference: CROP[:STRIDE] as HxW, e.g. 512x1024"),
    write_labelids: Path = _O(None, "--write-labelids", help="write Cityscapes labelId PNGs of the predictions"),
    json_: bool = _O(False, "--json", help="print the metrics as JSON (stdout) instead of tables"),
) -> None:
    """Evaluate a model: COCO box (and mask) AP (detection) or mIoU (segmentation)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from . import api
    from .report import scores_table

    if max_images is not None:
        max_val_images = max_images
    metrics = api.evaluate(model, data, batch_size, device, max_val_images, out_dir=out, workers=workers,
                           per_class=per_class, slide=slide, write_labelids=write_labelids)
    names = metrics.pop("class_names")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    if json_:
        typer.echo(json.dumps(metrics, indent=2, default=str))
        return
    task = "detection" if "mAP" in metrics else "segmentation"
    console = Console()
    console.print(scores_table(metrics, f"{model} on {data or 'its own data'}"))
    if not per_class:
        return
    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.4f}"

    table = Table(title="per class")
    if task == "detection":
        cols = ["id", "class", "AP", "AP50"] + (["mask AP"] if "mask_per_class" in metrics else [])
        for c in cols:
            table.add_column(c, justify="left" if c == "class" else "right")
        masks = {r["id"]: r["AP"] for r in metrics.get("mask_per_class", [])}
        for r in metrics["per_class"]:
            extra = [fmt(masks.get(r["id"]))] if masks else []
            table.add_row(str(r["id"]), r["name"], fmt(r["AP"]), fmt(r["AP50"]), *extra)
    else:
        for c in ("id", "class", "IoU"):
            table.add_column(c, justify="left" if c == "class" else "right")
        for i, (name, iou) in enumerate(zip(names, metrics["per_class_iou"], strict=True)):
            table.add_row(str(i), name, fmt(iou))
    console.print(table)
    if write_labelids:
        typer.echo(f"labelId predictions written under {write_labelids}")


@app.command()
def export(
    run: Path = typer.Argument(..., help="run folder or export folder"),
    out: Path = _O(None, help="default RUN/export (an export folder: itself)"),
    format_: str = _O("safetensors", "--format", help="safetensors[,onnx,torchscript]"),
    image_size: int = _O(None, help="input side of the ONNX/TorchScript graph (default: the model's size)"),
    onnx_exporter: str = _O("dynamo", help="dynamo (torch.export) | legacy (TorchScript-based, faster)"),
) -> None:
    """Write model.safetensors (student only) and config.json, plus ONNX/TorchScript graphs."""
    from .export import export as run_export

    res = run_export(run, out, format_, image_size, onnx_exporter)
    for fmt, check in res.checks.items():
        _echo(f"{fmt}: max |diff| vs PyTorch {check['max_abs_diff']:.2e} on {check['images']} images "
              f"(tolerance {check['atol']} + {check['rtol']}·|value|)")
    typer.echo(f"exported to {res.folder}: {', '.join(p.name for p in res.files.values())}")


@app.command()
def push(
    run: Path = typer.Argument(..., help="run folder"),
    repo: str = _O(..., "--repo", help="org/name on the Hugging Face Hub"),
    private: bool = _O(False, "--private", help="create the repo private"),
    revision: str = _O(None, "--revision", help="branch to commit to (created if missing)"),
    create_pr: bool = _O(False, "--create-pr", help="open a pull request instead of committing"),
    format_: str = _O("safetensors", "--format", help="files to upload: safetensors[,onnx,torchscript]"),
    baseline: Path = _O(None, help="run folder of the undistilled student, for the card's comparison"),
    dataset: str = _O(None, help="data set id for the card (default: from the run's --data)"),
    license_: str = _O(None, "--license", help="license id for the card (default: the model spec's)"),
    base_model: str = _O(None, help="card base_model (default: the student's Hub repo or zoo name)"),
) -> None:
    """Upload a run's student, model card, results and config to the Hugging Face Hub."""
    from . import api

    url = api.push(run, repo, private=private, revision=revision, create_pr=create_pr, formats=format_,
                   baseline=baseline, dataset=dataset, license=license_, base_model=base_model)
    typer.echo(f"pushed to {url}")


@app.command()
def pull(ref: str = typer.Argument(..., help="hf-hub:org/name[@revision]")) -> None:
    """Download a pushed kdcli model into the Hugging Face cache (other commands read the cache only)."""
    from . import api

    typer.echo(f"cached in {api.pull(ref)}")


@app.command()
def checks(json_: bool = _O(False, "--json", help="machine-readable output")) -> None:
    """Versions, devices, CUDA/cuDNN, distributed backends, cache folders and offline state."""
    import json

    from .checks import collect, format_report

    info = collect()
    typer.echo(json.dumps(info, indent=2, default=str) if json_ else format_report(info))


@app.command()
def methods() -> None:
    """List distillation methods with paper, tasks and default hyper-parameters."""
    from rich.console import Console
    from rich.table import Table

    from .catalog import methods as catalog  # read from source: no torch import, as fast as --help

    console = Console()
    wide = console.width >= 140  # the presets need room; a narrow terminal gets the short table
    table = Table(caption=("self-KD methods run with `kdcli train --method` or `kdcli distill` without --teacher; "
                           "`--augment hard` wraps any method that has a teacher"
                           + ("" if wide else "; presets: `kdcli methods` in a terminal >= 140 columns")))
    cols = ["method", "tasks", "teacher", "evidence", "paper"] + (["detection preset", "segmentation preset"]
                                                                   if wide else [])
    for col in cols:
        if wide:
            table.add_column(col, overflow="fold")
        elif col == "paper":  # the paper gives way: one line each, cut with an ellipsis
            table.add_column(col, no_wrap=True, overflow="ellipsis", ratio=1)
        else:
            table.add_column(col, no_wrap=col not in ("teacher", "evidence"),
                             max_width=14 if col in ("teacher", "evidence") else None)
    table.expand = not wide
    for name, info in catalog().items():
        # a teacher-free class may say what it is instead (MCMI: a teacher-training objective)
        role = "yes" if info.needs_teacher else (info.teacher_note or "no (self-KD)")
        tasks = ", ".join("det" if t == "detection" else "seg" if t == "segmentation" else t for t in info.tasks)
        row = [name, tasks, role, info.evidence, info.paper]
        if wide:
            row += [_fmt(info.presets.get("detection")), _fmt(info.presets.get("segmentation"))]
        table.add_row(*row)
    console.print(table)


def _check_teacher_free(spec: str) -> None:
    """`kdcli train --method`: only methods that need no teacher."""
    from .catalog import check_method_spec, methods

    for name in check_method_spec(spec):
        if methods()[name].needs_teacher:
            raise ConfigError(f"--method {name}: needs a teacher; use `kdcli distill --teacher ...` "
                              "(`kdcli train --method` takes self-KD methods only, see `kdcli methods`)")


def _fmt(d: dict | None) -> str:
    return "—" if not d else ", ".join(f"{k}={v}" for k, v in d.items())


@zoo_app.command("list")
def zoo_list(task: str = _O(None, help="detection | segmentation")) -> None:
    """List zoo entries: role, the data their weights were trained on, metric, download size, cached."""
    from rich.console import Console
    from rich.table import Table

    from . import api
    from .zoo import names, raw_spec

    table = Table()
    for col in ("name", "task", "architecture", "role", "dataset", "kind", "metric", "download", "cached"):
        table.add_column(col)
    for n in names():
        s = raw_spec(n)
        if task and s.task != task:
            continue
        st = api.zoo_status(n)
        table.add_row(n, s.task, s.architecture, st["role"], st["dataset"], s.weights_kind,
                      ", ".join(f"{k} {v}" for k, v in s.metric.items()), st["download_size"] or "—",
                      st["cached"].split(" ")[0])
    Console(width=200).print(table)


@zoo_app.command("show")
def zoo_show(name: str) -> None:
    """Show one zoo entry in full, with its source URL, hashes and cache state."""
    import json

    from . import api
    from .zoo import raw_spec

    typer.echo(json.dumps({**raw_spec(name).to_dict(), **api.zoo_status(name)}, indent=2))


@zoo_app.command("fetch")
def zoo_fetch(
    names: list[str] = typer.Argument(None, help="zoo names, or sources: torchvision:..., hf-hub:..., "
                                                  "url:...#sha256=..."),
    all_: bool = _O(False, "--all", help="every zoo entry that has weights"),
    backbone: bool = _O(False, "--backbone", help="the entry's ImageNet backbone_weights instead of its weights"),
    offline: bool = _O(False, "--offline", help="refuse to download (report what is cached)"),
    file: Path = _O(None, "--file", help="the entry's checkpoint, downloaded by hand (verified the same way)"),
    mirror: str = _O(None, "--mirror", envvar="KDCLI_MIRROR",
                     help="base URL replacing the scheme and host of OpenMMLab release URLs (env KDCLI_MIRROR)"),
) -> None:
    """Download weights into the standard caches (torch hub, Hugging Face). The only command that downloads."""
    from .weights import set_offline

    if offline:
        set_offline()
    from . import api

    if not names and not all_:
        raise ConfigError("kdcli zoo fetch: name zoo entries or weight sources, or give --all")
    for name, path in api.fetch_weights(list(names or []), all_=all_, backbone=backbone, log=_echo, file=file,
                                        mirror=mirror):
        typer.echo(f"{name}: {path}")


@zoo_app.command("import")
def zoo_import(
    checkpoint: Path = typer.Argument(..., help="mmdetection / mmsegmentation .pth checkpoint"),
    arch: str = _O(..., "--arch", help="retinanet | fcos | fasterrcnn (mmdet) | deeplabv3 | pspnet (mmseg)"),
    out: Path = _O(None, help="folder to write (config.json + model.safetensors); default ./<checkpoint name>"),
    classes: str = _O(None, help="coco (torchvision's 91-slot layout) | cityscapes | names,comma,separated; "
                                  "default: the checkpoint's own class names"),
    metric: str = _O(None, help="the publisher's score in percent for the teacher check, e.g. box_map=38.9"),
    set_: list[str] = _O(None, "--set", help="override what the checkpoint's config says: resnet_style, bgr, "
                                              "mean, std, fcos_centerness, fcos_regression, relu_before_extra_convs"),
) -> None:
    """Convert an mmdetection / mmsegmentation checkpoint into a kdcli model folder (use it as --teacher)."""
    from .config import parse_sets
    from .convert import import_checkpoint, parse_metric, parse_options

    names: Any = classes
    if classes and classes not in ("coco", "cityscapes"):
        names = [c.strip() for c in classes.split(",") if c.strip()]
    res = import_checkpoint(checkpoint, arch, out, classes=names, metric=parse_metric(metric),
                            options=parse_options(parse_sets(set_)), log=_echo)
    typer.echo(f"imported {checkpoint} as {res.spec.architecture} ({len(res.spec.classes)} classes) into "
               f"{res.folder}; use --teacher {res.folder}")


@data_app.command("shapes")
def data_shapes(out: Path = _O(..., help="folder to write"), n_train: int = _O(400), n_val: int = _O(100),
                size: int = _O(128), seed: int = _O(0)) -> None:
    """Write the embedded shapes set (COCO json + images, Cityscapes-style label tree)."""
    from .data import write_shapes

    root = write_shapes(out, n_train=n_train, n_val=n_val, size=size, seed=seed)
    typer.echo(f"wrote {root}/coco and {root}/cityscapes")


@app.command()
def demo(
    task: str = _O("detection", help="detection | segmentation | all"),
    out: Path = _O(Path("runs/demo")), quick: bool = _O(False, help="a tiny smoke run (seconds)"),
    fresh_teacher: bool = _O(False, help="retrain the cached teacher"),
) -> None:
    """Teacher, student baseline and distilled student on the embedded shapes data; prints a table."""
    from rich.console import Console

    from . import api
    from .report import markdown_table, metrics_table, write_text

    tasks = ["detection", "segmentation"] if task == "all" else [task]
    for t in tasks:
        if t not in api.DEMO:
            raise KdcliError(f"--task {t}: expected detection, segmentation or all")
    tables = api.demo(tasks, out=out, log=_echo, quick=quick, fresh_teacher=fresh_teacher)
    console = Console()
    for t, rows in tables.items():
        console.print(metrics_table(rows, t, title=f"shapes {t}"))
        write_text(out / f"{t}-results.md", markdown_table(rows, t))


def _command_line() -> str:
    import shlex

    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


@bench_app.command("quality")
def bench_quality(
    teacher: str = _O(None, "--teacher", "-t", help="your teacher (zoo name, run or export folder); with --student"),
    student: str = _O(None, "--student", "-s", help="your student; without the pair: the shapes suite (--pairs)"),
    pairs: str = _O("all", help="shapes suite pairs: all or some of fcos,retina,deeplabv3,lraspp"),
    teacher_epochs: int = _O(0, help="epochs to train an untrained zoo teacher once (0: 16 detection, 8 segm.)"),
    data: str = _O("shapes", help="shapes | coco:/path | cityscapes:/path | semantic:/path | data file"),
    method: str = _O("all", "--method", help="all, or a+b+c (a,b,c too; the baseline always runs)"),
    methods: str = _O(None, "--methods", hidden=True),  # the old name of --method
    budget: str = _O("2e", help="per run, equal for every method: epochs (2e) or optimizer steps (300)"),
    seeds: int = _O(3), out: Path = _O(Path("runs/bench-quality"), help="suite folder (reruns reuse its runs)"),
    batch_size: int = _O(8, "--batch-size", "-b"), lr: float = _O(1e-3), optimizer: str = _O("adamw"),
    amp: str = _O("auto", help="none | bf16 | fp16 | auto (bf16 where the hardware has native bf16)"),
    image_size: int = _O(0), max_train_images: int = _O(0),
    max_val_images: int = _O(0), device: str = _O("auto"), workers: int = _O(2),
    student_weights: str = _O(None, help="zoo | backbone | FILE (default: from scratch)"),
    isolate: bool = _O(True, "--isolate/--in-process", help="one child process per run (its own peak memory)"),
    jobs: int = _O(1, help="runs at once, each with cores/jobs threads (CPU: 2 often beats 1)"),
    reference: Path = _O(None, help="quality.csv of another suite: Kendall tau between the two rankings"),
    suite: str = _O("", help="evidence: the fixed paper-like suite (docs/results/evidence.md); --out, "
                    "--device, --workers apply, its own pairs, seeds and budgets"),
    keep: str = _O("best", "--keep", help="what each finished run keeps: best | last | all"),
) -> None:
    """Every applicable method on one student at an equal budget over seeds; tables, plot, ranking."""
    if suite:
        from .bench.evidence import EvidenceOptions, run_evidence

        if suite != "evidence":
            raise ConfigError(f"--suite {suite}: expected evidence")
        ev_out = Path("runs/bench-evidence") if out == Path("runs/bench-quality") else out
        res = run_evidence(EvidenceOptions(out=ev_out, device=device, workers=workers,
                                           command=_command_line()), log=_echo)
        typer.echo(f"wrote {', '.join(str(p) for p in res.files)} ({res.wall_s / 60:.1f} min)")
        return
    from rich.console import Console
    from rich.table import Table

    from .bench.quality import CAVEAT, Pair, QualityOptions, pairs_from, run_suite

    if bool(teacher) != bool(student):
        raise ConfigError("kdcli bench quality: give --teacher and --student together (or neither: the shapes suite)")
    if teacher:
        chosen = [Pair(Path(student).name.replace("/", "_"), teacher, student, teacher_epochs)]
    else:
        chosen = [Pair(p.name, p.teacher, p.student, teacher_epochs or p.teacher_epochs) for p in pairs_from(pairs)]
    methods = (methods or method).replace("+", ",")
    opts = QualityOptions(chosen, data=data, methods=methods, budget=budget, seeds=seeds, out=out,
                          batch_size=batch_size, lr=lr, optimizer=optimizer, amp=amp, image_size=image_size,
                          max_train_images=max_train_images, max_val_images=max_val_images, device=device,
                          workers=workers, student_weights=student_weights, isolate=isolate, jobs=jobs,
                          reference=reference, command=_command_line(), keep=keep)
    res = run_suite(opts, log=_echo)
    console = Console()
    for pair in chosen:
        table = Table(title=f"{pair.name}: {pair.teacher} -> {pair.student} (ranked)")
        for col in ("rank", "method", "score", "gain", "beats baseline", "run s", "peak MB"):
            table.add_column(col, justify="left" if col in ("method", "beats baseline") else "right")
        for r in (r for r in res.rows if r["pair"] == pair.name):
            if not r["seeds"]:
                table.add_row("", r["method"], "failed", "", "", "", "")
                continue
            table.add_row(str(r["rank"]), r["method"], f"{r['mean']:.4f} ± {r['std']:.4f}",
                          "—" if r["method"] == "baseline" else f"{r['gain']:+.4f}", str(r["verdict"]),
                          f"{r['run_s']:.0f}", f"{r['peak_mem_mb']:.0f}")
        console.print(table)
    typer.echo(f"caveat: {CAVEAT}")
    typer.echo(f"wrote {', '.join(str(p) for p in res.files)} ({res.wall_s / 60:.1f} min)")


@bench_app.command("speed")
def bench_speed(
    teacher: str = _O("shapes-r34-fcos", "--teacher", "-t"), student: str = _O("shapes-r18-fcos", "--student", "-s"),
    image_size: str = _O("128", "--image-size", help="input size: H (square) or HxW, e.g. 800x1333"),
    batch_size: int = _O(8, "--batch-size", "-b"), steps: int = _O(10, help="timed pairs"),
    size: str = _O(None, "--size", hidden=True), batch: int = _O(None, "--batch", hidden=True),  # old names
    amp: str = _O("auto", help="none | bf16 | auto (bf16 where the hardware has native bf16)"),
    method: str = _O("all", "--method", help="all, or a+b+c (a,b,c too)"),
    methods: str = _O(None, "--methods", hidden=True),  # the old name of --method
    device: str = _O("all", help="all (CPU, and CUDA when available) | cpu | cuda"),
    clock: str = _O("wall", help="wall | cpu (process CPU time: steadier on a shared machine, with --threads 1)"),
    threads: int = _O(0, help="torch.set_num_threads (0: default)"),
    memory: bool = _O(True, "--memory/--no-memory", help="also the step memory of each method vs the floor"),
    set_: list[str] = _O(None, "--set", help="method option method.key=value (key=value with one method)"),
    out: Path = _O(None, help="folder for speed.md and speed.csv"),
) -> None:
    """Per method: one training step vs the floor (teacher inference + plain student step), and memory."""
    from .bench.speed import SpeedOptions, markdown, run_speed
    from .config import parse_sets

    size = image_size if size is None else size
    batch = batch_size if batch is None else batch
    methods = (methods or method).replace("+", ",")
    opts = SpeedOptions(teacher=teacher, student=student, size=size, batch=batch, steps=steps, amp=amp,
                        methods=methods, device=device, clock=clock, threads=threads, memory=memory,
                        sets=parse_sets(set_), out=out, command=_command_line())
    res = run_speed(opts, log=_echo)
    typer.echo(markdown(opts, res.rows))
    if res.files:
        typer.echo(f"wrote {', '.join(str(p) for p in res.files)}")


@app.command()
def viz(
    run: Path = typer.Argument(..., help="run folder"),
    image: Path = _O(..., "--image", help="image file (PNG/JPEG)"),
    out: Path = _O(None, help="output folder (default RUN/viz)"),
    point: str = _O(None, help="query point X,Y in image pixels for attention maps (default: the top box centre)"),
    taps: str = _O(None, help="only these taps, e.g. p3,p4"),
    score: float = _O(0.3, help="detection score threshold for drawing (and for pseudo ground truth)"),
    weights: str = _O("best", help="student weights: best | last"),
    device: str = _O("cpu", help="cpu | cuda | auto"),
) -> None:
    """Teacher and student predictions side by side, and the method's masks/attention as heatmaps."""
    from .viz.viz import parse_point, visualise

    res = visualise(run, image, out=out, point=parse_point(point),
                    taps=[t.strip() for t in taps.split(",") if t.strip()] if taps else None, device=device,
                    score=score, weights=weights)
    for note in res.notes:
        _echo(f"note: {note}")
    typer.echo(f"wrote {len(res.files)} figures to {res.folder}")


def one_line(err: BaseException) -> str:
    """The user-facing line of an error; errors re-raised from DataLoader workers carry the
    worker's traceback text, whose last line is ``module.Class: message``."""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _interrupt(_signum: int, _frame: Any) -> None:
    raise UserInterrupt("interrupted (Ctrl-C); no checkpoint was written by this stop")


def main() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # typer would swallow KeyboardInterrupt
        signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except UserInterrupt as err:
        typer.echo(str(err), err=True)
        sys.exit(err.exit_code)
    except KdcliError as err:
        # an interrupted run saved a checkpoint: its message says how to resume, it is not an error
        resumable = getattr(err, "resumable", False)
        import os

        if not (resumable and os.environ.get("RANK", "0") != "0"):  # under torchrun, rank 0 says it once
            typer.echo(f"{'' if resumable else 'error: '}{one_line(err)}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
