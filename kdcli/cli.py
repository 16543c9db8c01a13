"""The ``kdcli`` command line. Thin: parses options and calls :mod:`kdcli.api`.

Heavy libraries (torch, torchvision, timm) are imported inside commands so ``kdcli --help`` is
instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from .cli_bench import bench_app
from .cli_options import _O, dflt, run_options
from .cli_options import echo_err as _echo
from .cli_zoo import data_app, zoo_app
from .errors import KdcliError, UserInterrupt

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation for dense prediction on torchvision/timm models.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


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


def _maybe_launch(nproc: int | None, devices: str | None) -> None:
    """``--nproc N`` / ``--devices 0,1``: re-run this command under torch.distributed.run (one machine)."""
    if not (devices or (nproc or 1) > 1):
        return  # one process: torch is not imported before the cheap option checks
    from .engine.distributed import launch, launched_by_torchrun

    if not launched_by_torchrun():
        sys.exit(launch(nproc, devices, sys.argv[1:]))


def _run(command: str, own: dict[str, Any], shared: dict[str, Any]) -> None:
    """`kdcli train` / `kdcli distill`: the options given, then :func:`kdcli.api.run`; the result on stdout."""
    import json
    import os

    from . import api
    from .cli_options import given_options

    _maybe_launch(shared["nproc"], shared["devices"])
    options = {**given_options(shared), **{k: v for k, v in own.items() if v is not None and v is not False}}
    where = dict(config=shared["config"], resume_folder=shared["resume"])
    if shared["print_config"]:
        typer.echo(json.dumps(api.resolved_run_config(command, options, **where).to_dict(), indent=2))
        return
    folder, metrics = api.run(command, options, log=_echo, **where)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        from rich.console import Console

        from .report import run_summary

        for part in run_summary(folder, metrics):
            if isinstance(part, str):  # a line of text as it is: a long path is never re-wrapped
                typer.echo(part)
            else:
                Console(soft_wrap=False).print(part)


_RECIPE_HELP = ("\n\nRecipe (the reference recipe, for models that start from pretrained weights on real data): "
                "SGD with momentum 0.9, lr 0.01, weight decay 1e-4, 100 warm-up steps, grad clip 35, cosine (poly "
                "for segmentation), float32. The demo and `kdcli bench quality` train the shapes models from "
                "scratch with --optimizer adamw --lr 1e-3 --warmup-iters 50 --amp auto instead "
                "(docs/cli.md#recipes).")


@app.command(help=f"Train one model (used to make teachers), optionally with a self-KD method or the MCMI "
                  f"objective.{_RECIPE_HELP}")
@run_options
def train(
    model: str = _O(None, "--model", "-m", help="zoo name, run folder, exported folder or hf-hub:org/name"),
    method: str = _O(None, "--method", help="teacher-free (self-KD) method(s) only, e.g. pskd or uskd"),
    objective: str = _O(None, "--objective", help=dflt("ce | mcmi (MCMI teacher fine-tuning: CE − 0.15·CMI)",
                                                       "ce")),
    **shared: Any,
) -> None:
    _run("train", {"model": model, "method": method, "objective": objective}, shared)


@app.command(help=f"Distil a teacher into a student with a method (self-KD methods need no --teacher)."
                  f"{_RECIPE_HELP}")
@run_options
def distill(
    method: str = _O(None, "--method", help="method name, or several joined by + (cwd+fgd)"),
    teacher: str = _O(None, "--teacher", "-t", help="zoo name, run folder, exported folder or hf-hub:org/name"),
    student: str = _O(None, "--student", "-s", help="zoo name, run folder, exported folder or hf-hub:org/name"),
    inherit: bool = _O(False, "--inherit", help="initialise the student's neck/head from the teacher"),
    skip_teacher_check: bool = _O(False, "--skip-teacher-check",
                                  help="do not stop when the teacher scores far below its reported metric"),
    teacher_check_images: int = _O(None, help=dflt("validation images for the teacher check (0: skip)", 50)),
    augment: str = _O(None, "--augment", help=dflt("none | hard (HARD's learned augmentations; --set hard.k=v)",
                                                   "none")),
    **shared: Any,
) -> None:
    _run("distill", {"method": method, "teacher": teacher, "model": student, "inherit": inherit,
                     "skip_teacher_check": skip_teacher_check, "teacher_check_images": teacher_check_images,
                     "augment": augment}, shared)


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

    from . import api
    from .report import per_class_table, scores_table

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
    console = Console()
    console.print(scores_table(metrics, f"{model} on {data or 'its own data'}"))
    if not per_class:
        return
    console.print(per_class_table(metrics, names))
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


def _fmt(d: dict | None) -> str:
    return "—" if not d else ", ".join(f"{k}={v}" for k, v in d.items())


@app.command(help="Teacher, student baseline and distilled student on the embedded shapes data; prints a table."
                  "\n\nRecipe: the shapes recipe (AdamW, lr 1e-3, 50 warm-up steps, --amp auto), as `kdcli bench "
                  "quality` (docs/cli.md#recipes).")
def demo(
    task: str = _O("detection", help="detection | segmentation | all"),
    out: Path = _O(Path("runs/demo")), quick: bool = _O(False, help="a tiny smoke run (seconds)"),
    fresh_teacher: bool = _O(False, help="retrain the cached teacher"),
) -> None:
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


@app.command()
def viz(
    run: Path = typer.Argument(..., help="run folder"),
    image: Path = _O(..., "--image", help="image file (PNG/JPEG)"),
    out: Path = _O(None, help="output folder (default RUN/viz)"),
    point: str = _O(None, help="query point X,Y in image pixels for attention maps (default: the top box centre)"),
    taps: str = _O(None, help="only these taps, e.g. p3,p4"),
    score: float = _O(0.3, help="detection score threshold for drawing (and for pseudo ground truth)"),
    weights: str = _O("best", help="student weights: best | last"),
    device: str = _O("auto", help="auto | cpu | cuda[:i]"),
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
