"""The ``kdcli`` command line. Thin: parses options and calls :mod:`kdcli.api`.

Heavy libraries (torch, torchvision, timm) are imported inside commands so ``kdcli --help`` is
instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from .errors import ConfigError, KdcliError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation for dense prediction on torchvision/timm models.")
zoo_app = typer.Typer(no_args_is_help=True, help="The model zoo: list entries, show one.")
data_app = typer.Typer(no_args_is_help=True, help="Embedded data sets.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(data_app, name="data")


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


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


def _run_training(options: dict[str, Any], config: Path | None, resume: Path | None) -> None:
    from . import api
    from .config import RunConfig, read_config_file

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
    scores = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    typer.echo(f"run folder: {folder}\nbest: {scores}")


_O = typer.Option


@app.command()
def train(
    model: str = _O(None, "--model", "-m", help="zoo name, run folder or exported folder"),
    data: str = _O(None, help="shapes | coco:/path | semantic:/path (default shapes)"),
    epochs: int = _O(None), batch_size: int = _O(None, "--batch-size", "-b"), lr: float = _O(None),
    optimizer: str = _O(None, help="sgd | adamw"), weight_decay: float = _O(None),
    schedule: str = _O(None, help="cosine | poly | step | constant"), warmup_iters: int = _O(None),
    grad_clip: float = _O(None, help="L2 max-norm, 0 disables"), seed: int = _O(None), workers: int = _O(None),
    image_size: int = _O(None), device: str = _O(None, help="auto | cpu | cuda[:i]"),
    amp: str = _O(None, help="none | bf16 | fp16"), max_train_images: int = _O(None),
    max_val_images: int = _O(None), bn_recal: int = _O(None, help="batches to re-estimate BN stats"),
    out: Path = _O(None, help="run folder"), config: Path = _O(None, help="TOML/JSON config file"),
    resume: Path = _O(None, help="continue this run folder"),
) -> None:
    """Train one model (used to make teachers)."""
    opts = _train_options(data, epochs, batch_size, lr, optimizer, weight_decay, schedule, warmup_iters,
                          grad_clip, seed, workers, image_size, device, amp, max_train_images, max_val_images,
                          bn_recal, out)
    if model:
        opts["model"] = model
    _run_training(opts, config, resume)


@app.command()
def distill(
    method: str = _O(None, "--method", help="method name, or several joined by + (cwd+fgd)"),
    teacher: str = _O(None, "--teacher", "-t", help="zoo name, run folder or exported folder"),
    student: str = _O(None, "--student", "-s", help="zoo name, run folder or exported folder"),
    set_: list[str] = _O(None, "--set", help="method option key=value (method.key=value when combined)"),
    inherit: bool = _O(False, "--inherit", help="initialise the student's neck/head from the teacher"),
    data: str = _O(None, help="shapes | coco:/path | semantic:/path (default shapes)"),
    epochs: int = _O(None), batch_size: int = _O(None, "--batch-size", "-b"), lr: float = _O(None),
    optimizer: str = _O(None), weight_decay: float = _O(None), schedule: str = _O(None),
    warmup_iters: int = _O(None), grad_clip: float = _O(None), seed: int = _O(None), workers: int = _O(None),
    image_size: int = _O(None), device: str = _O(None), amp: str = _O(None), max_train_images: int = _O(None),
    max_val_images: int = _O(None), bn_recal: int = _O(None), out: Path = _O(None),
    config: Path = _O(None), resume: Path = _O(None),
) -> None:
    """Distil a teacher into a student with a method."""
    from .config import parse_sets

    opts = _train_options(data, epochs, batch_size, lr, optimizer, weight_decay, schedule, warmup_iters,
                          grad_clip, seed, workers, image_size, device, amp, max_train_images, max_val_images,
                          bn_recal, out)
    given = {"model": student, "teacher": teacher, "method": method}
    opts.update({k: v for k, v in given.items() if v})
    if resume is None and config is None:
        missing = [f"--{'student' if k == 'model' else k}" for k, v in given.items() if not v]
        if missing:
            raise ConfigError(f"kdcli distill: missing {', '.join(missing)} (or give --config / --resume)")
    # only options given on the command line override a --config file
    if set_:
        opts["set"] = parse_sets(set_)
    if inherit:
        opts["inherit"] = True
    _run_training(opts, config, resume)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="run folder, exported folder or zoo name"),
    data: str = _O("shapes"), batch_size: int = _O(8, "--batch-size", "-b"), device: str = _O("auto"),
    max_images: int = _O(0), per_class: bool = _O(False, "--per-class"), out: Path = _O(None),
) -> None:
    """Evaluate a model: COCO box AP (detection) or mIoU (segmentation)."""
    from rich.console import Console

    from . import api
    from .report import metrics_table

    metrics = api.evaluate(model, data, batch_size, device, max_images, out_dir=out)
    task = "detection" if "mAP" in metrics else "segmentation"
    console = Console()
    console.print(metrics_table([(model, metrics)], task))
    if task == "detection":
        typer.echo(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    elif per_class:
        for i, iou in enumerate(metrics.get("per_class_iou", [])):
            typer.echo(f"class {i}: IoU {iou:.4f}")


@app.command()
def export(run: Path = typer.Argument(..., help="run folder"), out: Path = _O(None, help="default RUN/export")) -> None:
    """Write model.safetensors (student only) and config.json."""
    from . import api

    typer.echo(f"exported to {api.export(run, out)}")


@app.command()
def methods() -> None:
    """List distillation methods with paper, tasks and default hyper-parameters."""
    from rich.console import Console
    from rich.table import Table

    from .methods import available

    table = Table()
    for col in ("method", "paper", "tasks", "teacher", "detection preset", "segmentation preset"):
        table.add_column(col, overflow="fold")
    for name, cls in available().items():
        table.add_row(name, cls.paper, ", ".join(cls.tasks), "yes" if cls.needs_teacher else "no (self-KD)",
                      _fmt(cls.presets.get("detection")), _fmt(cls.presets.get("segmentation")))
    Console(width=160).print(table)


def _fmt(d: dict | None) -> str:
    return "—" if not d else ", ".join(f"{k}={v}" for k, v in d.items())


@zoo_app.command("list")
def zoo_list(task: str = _O(None, help="detection | segmentation")) -> None:
    """List zoo entries."""
    from rich.console import Console
    from rich.table import Table

    from .zoo import names, raw_spec

    table = Table()
    for col in ("name", "task", "architecture", "backbone", "classes", "weights", "metric"):
        table.add_column(col)
    for n in names():
        s = raw_spec(n)
        if task and s.task != task:
            continue
        classes = s.classes if isinstance(s.classes, str) else f"{len(s.classes)} names"
        table.add_row(n, s.task, s.architecture, s.backbone, classes, s.weights_kind,
                      ", ".join(f"{k} {v}" for k, v in s.metric.items()))
    Console(width=160).print(table)


@zoo_app.command("show")
def zoo_show(name: str) -> None:
    """Show one zoo entry in full."""
    import json

    from .zoo import raw_spec

    typer.echo(json.dumps(raw_spec(name).to_dict(), indent=2))


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


def one_line(err: BaseException) -> str:
    """The user-facing line of an error; errors re-raised from DataLoader workers carry the
    worker's traceback text, whose last line is ``module.Class: message``."""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main() -> None:
    try:
        app()
    except KdcliError as err:
        typer.echo(f"error: {one_line(err)}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
