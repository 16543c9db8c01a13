"""``kdcli zoo`` (list, show, fetch, import) and ``kdcli data``: parse options and call :mod:`kdcli.api`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .cli_options import _O
from .cli_options import echo_err as _echo
from .errors import ConfigError

zoo_app = typer.Typer(no_args_is_help=True, help="The model zoo: list, show, fetch weights, import checkpoints.")
data_app = typer.Typer(no_args_is_help=True, help="Embedded data sets.")


SHORT_METRIC = {"box_map": "mAP", "miou": "mIoU", "mask_map": "mask mAP"}


@zoo_app.command("list")
def zoo_list(task: str = _O(None, help="detection | segmentation")) -> None:
    """List zoo entries: task, role, weights kind, headline metric, download size, cached (the rest: zoo show)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from . import api
    from .zoo import names, raw_spec

    # 80 columns (a log, a narrow terminal): no borders, short cells; the architecture, the data set of the
    # weights and the sources are in `kdcli zoo show`
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("name", "task", "role", "kind", "metric", "size", "cached"):
        table.add_column(col, no_wrap=True)
    for n in names():
        s = raw_spec(n)
        if task and s.task != task:
            continue
        st = api.zoo_status(n)
        role = {"teacher, student": "both"}.get(st["role"], st["role"])
        role = "scratch" if s.weights_kind == "none" else role
        metric = next(iter(s.metric.items()), None)  # the headline one; all of them in `zoo show`
        size = (st["download_size"] or "—").replace("about ", "~")
        table.add_row(n, s.task[:3], role, s.weights_kind,
                      f"{SHORT_METRIC.get(metric[0], metric[0])} {metric[1]}" if metric else "", size,
                      st["cached"].split(" ")[0])
    Console().print(table)


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
