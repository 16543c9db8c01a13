"""The Python API the CLI calls: train, distill, evaluate, export, demo."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import hub  # noqa: F401 - registers the hf-hub: scheme with the zoo (no torch at import)
from .config import RECIPES, TASK_DEFAULTS, RunConfig, apply_objective_and_augment
from .errors import ConfigError, KdcliError

if TYPE_CHECKING:
    from .engine.build import Run


def _with_task_defaults(cfg: RunConfig, explicit: set[str]) -> RunConfig:
    from .zoo import resolve_ref

    task = resolve_ref(cfg.model).spec.task
    updates = {k: v for k, v in TASK_DEFAULTS[task].items() if k not in explicit}
    return cfg.merged(updates)


# choices the engine accepts (kdcli.engine, kdcli.runtime), checked here without importing torch
CHOICES = {"optimizer": ("sgd", "adamw"), "schedule": ("cosine", "poly", "step", "constant"),
           "amp": ("none", "bf16", "fp16", "auto"), "keep": ("best", "last", "all"), "objective": ("ce", "mcmi"),
           "augment": ("none", "hard")}


def check_options(cfg: RunConfig) -> None:
    """Cheap checks before any data set or model is built (and before torch is imported): choices,
    method names, ``--set`` keys and value types, and that named files and folders exist."""
    from .catalog import check_method_spec, check_sets

    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value not in allowed:
            raise ConfigError(f"--{key.replace('_', '-')} {value}: expected one of {', '.join(allowed)}")
    if cfg.method:
        check_method_spec(cfg.method)
        check_sets(cfg.method, dict(cfg.set), cfg.objective)
    elif cfg.set and cfg.objective != "mcmi" and not all(k.startswith("hard.") for k in cfg.set):
        raise ConfigError(f"--set {next(iter(cfg.set))}: method options need --method")
    for option, ref in (("--model", cfg.model), ("--teacher", cfg.teacher)):
        if ref and not ref.startswith("hf-hub:") and ("/" in ref or ref.startswith(".")) and not Path(ref).exists():
            raise ConfigError(f"{option} {ref}: no such folder")
    if cfg.student_weights not in (None, "zoo", "backbone") and not Path(cfg.student_weights).is_file():
        raise ConfigError(f"--student-weights {cfg.student_weights}: no such file")
    kind, sep, rest = cfg.data.partition(":")
    if sep and kind in ("coco", "cityscapes", "semantic") and rest:
        where = Path(rest.partition("?")[0]).expanduser()
        if not where.is_dir():
            raise ConfigError(f"--data {cfg.data}: folder {where} does not exist")
    elif cfg.data.endswith((".toml", ".yaml", ".yml")) and not Path(cfg.data).expanduser().is_file():
        raise ConfigError(f"--data {cfg.data}: no such file")


def resolve_config(cfg: RunConfig, explicit: set[str] | None = None) -> RunConfig:
    """The config a run would use: the task's defaults for options not in ``explicit``, then
    ``objective``/``augment`` turned into methods (what ``--print-config`` shows)."""
    if explicit is not None:
        cfg = _with_task_defaults(cfg, explicit)
    return apply_objective_and_augment(cfg)


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def _config_from(options: dict[str, Any], config: str | Path | None) -> tuple[RunConfig, set[str]]:
    """``config`` (a file or run folder, as ``--config``) overridden by keyword ``options``; with the
    keys given (the task's defaults fill the others)."""
    from .config import read_config_file

    base = read_config_file(config) if config is not None else {}
    given = {k: v for k, v in options.items() if v is not None}
    cfg = RunConfig.from_dict({**base, **given}, str(config) if config is not None else "options")
    return cfg, set(base) | set(given)


COMMANDS = ("train", "distill")


def started_by(cfg: RunConfig) -> str:
    """The kdcli command that starts a run like ``cfg``: this process's own command when its command
    line is ``kdcli [--offline] train|distill ...`` (also ``python -m kdcli``, as torchrun's workers run);
    otherwise ``distill`` when the run has something only ``kdcli distill`` takes (a teacher,
    ``--augment hard``, ``--inherit``), else ``train`` (a model alone, teacher-free methods,
    ``--objective mcmi``)."""
    import sys

    prog = Path(sys.argv[0]) if sys.argv else Path()
    if prog.stem == "kdcli" or (prog.name == "__main__.py" and prog.parent.name == "kdcli"):
        cmd = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        if cmd in COMMANDS:
            return cmd
    return "distill" if cfg.teacher or cfg.augment == "hard" or cfg.inherit else "train"


def resume_hint(run: Run) -> str:
    """The command line that continues ``run``: the kdcli command that started it (``train`` even for
    ``kdcli train --method pskd`` / ``--objective mcmi``), under torchrun when it runs there."""
    launch = f"torchrun --nproc_per_node {run.dist.world} -m kdcli" if run.dist.enabled else "kdcli"
    return f"{launch} {run.command} --resume {run.folder}"


def train(cfg: RunConfig | str | None = None, resume: bool = False, log: Any = None,
          explicit: set[str] | None = None, stop_after: int | None = None, command: str | None = None,
          *, config: str | Path | None = None, **options: Any) -> tuple[Path, dict]:
    """Train a model (no teacher), or distil when the config has a teacher/method; returns the run
    folder and the best epoch's metrics.

    ``kdcli.train("shapes-r18-fcos", epochs=2, data="shapes")``: a model and run options (the keys of
    :class:`~kdcli.config.RunConfig`), optionally over a ``config`` file or run folder; options not
    given take the task's defaults. Or a whole :class:`RunConfig` (``explicit``: the keys the user
    set, the others take the task's defaults; None: the config as it is).

    ``command``: the kdcli command that started the run (``train`` or ``distill``), recorded in
    ``config.json`` and named in resume hints; None: this process's kdcli command line, else what the
    config implies (:func:`started_by`). ``log``: progress and log lines
    (default: stderr)."""
    import os
    from contextlib import nullcontext

    if not isinstance(cfg, RunConfig):
        if cfg is not None:
            options["model"] = cfg
        cfg, given = _config_from(options, config)
        explicit = given if explicit is None else explicit
    elif options or config is not None:
        raise ConfigError("kdcli.train: give a RunConfig or keyword options, not both")
    log = log or _stderr
    check_options(cfg)
    import torch

    from .engine import distributed as ddp
    from .engine.build import build_run
    from .engine.callbacks import AfterEpoch, standard
    from .engine.folders import check_writable, existing_run, run_folder
    from .engine.loop import fit
    from .engine.runlock import RunLock
    from .viz.plots import update_results_png

    if explicit is not None:
        cfg = _with_task_defaults(cfg, explicit)
    cfg = apply_objective_and_augment(cfg)  # --objective mcmi, --augment hard
    if not cfg.model and not resume:
        raise ConfigError("--model (--student for distill): name the model to train (a zoo name or a folder)")
    command = command if command in COMMANDS else started_by(cfg)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 alone writes (and locks) the folder
    folder = run_folder(cfg)
    if main_rank and not cfg.out:  # the numbered default folder, fixed before it is locked and built
        cfg = cfg.merged({"out": str(folder)})
    if main_rank:  # an --out that cannot be written is refused before anything is built
        check_writable(folder)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ok = False
    with RunLock(folder, log, "--resume" if resume else "--out") if main_rank else nullcontext():
        taken = None if resume or not main_rank else existing_run(folder)
        if taken:  # checked under the lock, before the models are built
            raise ConfigError(f"--out {folder}: already holds a run ({taken}); continue it with "
                              f"`kdcli {command} --resume {folder}` or choose another --out")
        try:
            run = build_run(cfg, log=log, command=command)
            run.resume_hint = resume_hint(run)
            # results.png after results.csv's row; a plotting failure is logged, never raised
            run.callbacks = [*standard(), AfterEpoch(update_results_png)]
            metrics = fit(run, resume=resume, stop_after=stop_after)
            ok = True
        finally:
            ddp.finish(run.dist if ok else ddp.DistInfo(), ok)
    return run.folder, metrics


def distill(method: str, teacher: str | None = None, student: str | None = None, *,
            config: str | Path | None = None, log: Any = None, **options: Any) -> tuple[Path, dict]:
    """Distil ``teacher`` into ``student`` with ``method`` (``"cwd+fgd"`` combines; a self-KD method
    needs no teacher); run options as for :func:`train`. Returns the run folder and the best metrics."""
    cfg, given = _config_from({**options, "method": method, "teacher": teacher, "model": student}, config)
    if not cfg.model:
        raise ConfigError("kdcli.distill: name the student (student=...)")
    return train(cfg, log=log, explicit=given, command="distill")


def resume(folder: str | Path, log: Any = print) -> tuple[Path, dict]:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"--resume {folder}: not a run folder (no config.json)")
    record = json.loads(cfg_path.read_text())
    cfg = RunConfig.from_dict(record["config"], str(cfg_path))
    cfg.out = str(folder)
    # the command that started the run (kdcli train / distill), for the hints of this session
    return train(cfg, resume=True, log=log, command=record.get("command"))


# -- what `kdcli train` / `kdcli distill` do with their options --------------------------------------
def check_teacher_free(spec: str) -> None:
    """``kdcli train --method``: only methods that need no teacher."""
    from .catalog import check_method_spec, methods

    for name in check_method_spec(spec):
        if methods()[name].needs_teacher:
            raise ConfigError(f"--method {name}: needs a teacher; use `kdcli distill --teacher ...` "
                              "(`kdcli train --method` takes self-KD methods only, see `kdcli methods`)")


def _check_command(command: str, options: dict[str, Any], config: Path | None, resume: Path | None) -> None:
    """What a command needs when neither ``--config`` nor ``--resume`` supplies it."""
    alone = config is None and resume is None
    if command == "train":
        if alone and not options.get("model"):
            raise ConfigError("kdcli train: missing --model (a zoo name, run folder or exported folder), "
                              "or give --config / --resume")
        if options.get("method"):
            check_teacher_free(options["method"])
    elif alone:
        # a self-KD method (pskd, uskd) runs without --teacher; the engine names a method that needs one
        missing = [flag for flag, key in (("--method", "method"), ("--student", "model")) if not options.get(key)]
        if missing:
            raise ConfigError(f"kdcli distill: missing {', '.join(missing)} (or give --config / --resume)")


def _command_config(options: dict[str, Any], config: Path | None) -> tuple[RunConfig, set[str]]:
    """Precedence: RunConfig's defaults < the task's defaults < the ``config`` file < ``options``;
    with the keys given (file and options), which the task's defaults never override."""
    from .config import read_config_file

    base = read_config_file(config) if config is not None else {}
    cfg = (RunConfig.from_dict(base, str(config)) if base else RunConfig()).merged(options)
    return cfg, set(base) | set(options)


def resolved_run_config(command: str, options: dict[str, Any], config: Path | None = None,
                        resume_folder: Path | None = None) -> RunConfig:
    """The config ``kdcli COMMAND ... --print-config`` shows: what :func:`run` would train with."""
    _check_command(command, options, config, resume_folder)
    cfg, explicit = _command_config(options, resume_folder if resume_folder is not None else config)
    return resolve_config(cfg, explicit)


def run(command: str, options: dict[str, Any], config: Path | None = None, resume_folder: Path | None = None,
        log: Any = None) -> tuple[Path, dict]:
    """``kdcli train`` (``command="train"``) or ``kdcli distill``: ``options`` are the
    :class:`~kdcli.config.RunConfig` keys given on the command line (the student is ``model``), over
    the ``config`` file; ``resume_folder``: continue that run with its recorded config instead.
    Returns the run folder and the best epoch's metrics."""
    log = log or _stderr
    _check_command(command, options, config, resume_folder)
    if resume_folder is not None:
        if config is not None or set(options) - {"model", "teacher", "method"}:
            log("note: --resume continues the run with its recorded config.json; other options are ignored")
        return resume(resume_folder, log=log)
    cfg, explicit = _command_config(options, config)
    return train(cfg, log=log, explicit=explicit)


def evaluate(ref: str, data: str | None = None, batch_size: int = 8, device: str = "auto",
             max_images: int | None = None, out_dir: Path | None = None, workers: int = 2, per_class: bool = False,
             slide: str | None = None, write_labelids: Path | None = None, amp: str | None = None) -> dict[str, Any]:
    """Evaluate a zoo model (cached weights), a run folder or an exported folder.

    A run folder without ``data`` is evaluated as the run validated it (its ``data``,
    ``max_val_images`` and ``amp`` from config.json), so the result reproduces its metrics.json;
    otherwise the defaults are ``shapes``, all images, float32. ``slide``: ``CROP[:STRIDE]`` as ``HxW`` (segmentation
    sliding-window inference; stride default 2/3 of the crop); ``write_labelids``: folder for
    Cityscapes labelId PNGs of the predictions. The result holds the metrics and ``class_names``."""
    import torch

    from .data import build_dataset, collate_detection, collate_segmentation, data_hints, subset
    from .engine.evaluate_model import evaluate_model, parse_slide
    from .engine.teacher_check import check_teacher_kind
    from .models import build_model, image_size_of
    from .models.build import required_file
    from .runtime import pick_device
    from .zoo import resolve_ref

    r = resolve_ref(ref, role="eval")
    if r.weights is None:  # a zoo entry: its full weights, checked before any data is read
        check_teacher_kind(r.spec, ref, flag="kdcli eval")
        required_file(r.spec, "zoo")
    run_cfg = _run_config(ref) if data is None else {}  # without --data: as the run validated
    data = data or str(run_cfg.get("data") or "shapes")
    max_images = int(run_cfg.get("max_val_images") or 0) if max_images is None else max_images
    amp = amp or str(run_cfg.get("amp") or "none")
    dev = pick_device(device)
    if amp == "auto":
        from .runtime import resolve_amp

        amp = resolve_amp(amp, dev)[0]
    window = parse_slide(slide) if slide else None
    if r.spec.task == "detection" and (window or write_labelids):
        raise ConfigError("--slide / --write-labelids are for segmentation models")
    if data == "shapes":  # the class check before the (possibly long) generation of the shapes set
        from .zoo import class_names

        want = class_names("shapes", r.spec.task)
        if r.spec.classes != want:
            raise KdcliError(f"{ref}: predicts {len(r.spec.classes)} classes but --data shapes has {len(want)}; "
                             "give the data it was trained on with --data")
    ds = build_dataset(data, r.spec.task, "val", image_size_of(r.spec), train=False,
                       hints=data_hints(r.spec, fixed_head=True))
    if list(ds.classes) != r.spec.classes:
        raise KdcliError(f"{ref}: predicts {len(r.spec.classes)} classes but --data {data} has {len(ds.classes)}")
    if max_images:
        ds = subset(ds, max_images)
    model = build_model(r.spec, r.weights if r.weights is not None else "zoo").to(dev)
    collate = collate_detection if r.spec.task == "detection" else collate_segmentation
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=workers,
                                         pin_memory=dev.type == "cuda")
    metrics = evaluate_model(model, loader, ds, dev, out_dir=out_dir, amp=amp, per_class=per_class, slide=window,
                             label_ids_dir=write_labelids)
    return {**metrics, "class_names": list(ds.classes)}


def _run_config(ref: str) -> dict[str, Any]:
    """The recorded options of a run folder (``config.json`` next to ``model.json``), else {}."""
    folder = Path(ref)
    if ref.startswith("hf-hub:") or not (folder / "model.json").is_file() or not (folder / "config.json").is_file():
        return {}
    try:
        record = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    cfg = record.get("config") if isinstance(record, dict) else None
    return cfg if isinstance(cfg, dict) else {}


def export(run: str | Path, out: str | Path | None = None, formats: str | list[str] | None = None,
           image_size: int | None = None, onnx_exporter: str = "dynamo") -> Path:
    """Write ``model.safetensors`` (student only, plain torchvision/timm keys) + ``config.json``, and
    ``model.onnx`` / ``model.torchscript.pt`` when asked (:mod:`kdcli.export`); returns the folder."""
    from .export import export as _export

    return _export(run, out, formats, image_size, onnx_exporter).folder


def push(run: str | Path, repo: str, private: bool = False, revision: str | None = None, create_pr: bool = False,
         formats: str | list[str] | None = None, **card: Any) -> str:
    """Upload a run's student, config, model card and results to the Hugging Face Hub (:mod:`kdcli.hub`)."""
    from .hub import push as _push

    return _push(run, repo, private=private, revision=revision, create_pr=create_pr, formats=formats, **card)


def pull(ref: str) -> Path:
    """Download ``hf-hub:org/name[@rev]`` into the Hugging Face cache; returns the local snapshot folder."""
    from .hub import fetch

    return fetch(ref)


def fetch_weights(names: list[str], all_: bool = False, backbone: bool = False,
                  log: Any = print, file: str | Path | None = None,
                  mirror: str | None = None) -> list[tuple[str, Path]]:
    """``kdcli zoo fetch``: download the weights of zoo entries (or raw sources) into the standard
    caches (:func:`kdcli.weights.fetch`); an OpenMMLab release (``convert`` entries) is verified and
    converted into ``$KDCLI_HOME/zoo/<name>`` (:func:`kdcli.convert.fetch.fetch_converted`);
    ``file``: that entry's checkpoint, downloaded by hand; ``mirror``: a base URL replacing the
    scheme and host of release URLs. Returns (name, local path) pairs."""
    from .weights import fetch
    from .zoo import get_spec
    from .zoo import names as zoo_names

    if file is not None and (all_ or len(names) != 1 or backbone or ":" in names[0]):
        raise ConfigError("kdcli zoo fetch --file: name exactly one zoo entry (its checkpoint, downloaded by hand)")
    todo: dict[str, str] = {}  # source → first name asking for it
    converted: list[str] = []
    for name in (zoo_names() if all_ else names):
        if ":" in name:
            todo.setdefault(name, name)
            continue
        spec = get_spec(name)
        if spec.convert and not backbone:
            converted.append(name)
            continue
        if file is not None:
            raise ConfigError(f"kdcli zoo fetch {name} --file: only entries converted from an OpenMMLab release "
                              "take a hand-downloaded checkpoint")
        source = spec.backbone_weights if backbone else spec.weights
        if not source or source == "none":
            if all_:
                continue
            what = "backbone_weights" if backbone else "weights"
            raise KdcliError(f"kdcli zoo fetch {name}: the zoo has no {what} for it"
                             + ("" if backbone else f"; train it with `kdcli train --model {name}`"))
        todo.setdefault(source, name)
    from .weights import UnpinnedRevision

    done: list[tuple[str, Path]] = []
    if converted:
        from .convert import fetch as releases

        for name in converted:
            done.append((name, releases.fetch_converted(get_spec(name), file=file, mirror=mirror, log=log)))
    for source, name in todo.items():
        try:
            done.append((name, fetch(source, log=log)))
        except UnpinnedRevision as err:
            if not all_:
                raise
            log(f"skipped: {err}")  # --all fetches every pinned source; the message names the command
    return done


def zoo_status(name: str) -> dict[str, Any]:
    """What ``kdcli zoo list`` / ``show`` say of an entry beyond its spec: roles, the data set its
    weights were trained on, the download (URL, size, hashes) and whether it is cached."""
    from urllib.parse import urlparse

    from .models.build import imagenet_source
    from .weights import (
        cached_file,
        converted_folder,
        entry_size,
        expected_sha256,
        recorded_sha256,
        release_prefix,
        release_url,
        source_size,
    )
    from .zoo import raw_spec

    s = raw_spec(name)
    roles = (["teacher"] if s.weights_kind == "full" else []) + (["student"] if imagenet_source(s) else [])
    if s.weights_kind == "none":
        roles = ["train from scratch"]
    classes = s.classes if isinstance(s.classes, str) else f"{len(s.classes)} classes"
    dataset = {"coco": "COCO", "cityscapes": "Cityscapes", "voc": "COCO (VOC classes)"}.get(classes, classes)
    out: dict[str, Any] = {"role": ", ".join(roles), "dataset": dataset if s.weights_kind == "full" else
                           ("ImageNet (backbone)" if s.weights_kind == "backbone" else "—"),
                           "download_size": entry_size(s) if s.weights_kind == "full" else source_size(s.weights),
                           "cached": "—"}
    if s.convert:
        url = release_url(s)
        fname = urlparse(url).path.rsplit("/", 1)[-1]
        folder = converted_folder(name)
        out.update(source_url=url, sha256_in_name=release_prefix(url) or "", sha256_published=s.sha256 or "",
                   sha256_recorded=recorded_sha256().get(fname, ""), sha256_expected=expected_sha256(s),
                   cached=f"yes ({folder})" if (folder / "config.json").is_file() else "no")
    elif s.weights != "none":
        try:
            out["cached"] = f"yes ({cached_file(s.weights)})"
        except KdcliError:
            out["cached"] = "no"
        if s.weights.startswith("torchvision:"):
            from .weights import _torchvision_url

            try:
                out["source_url"] = _torchvision_url(s.weights.partition(":")[2])
            except KdcliError:
                pass
    return out


def _finished_epochs(folder: Path, log: Any = None) -> int:
    """Epochs a run folder has completed (0 if none), from its newest intact checkpoint.

    The same choice as ``--resume`` (:func:`kdcli.engine.checkpoint.load_checkpoint`): a damaged
    ``last_state.pt`` (or its tensor file) falls back to ``prev_state.pt``; the files passed over are
    named through ``log``. No checkpoint, or none intact: 0 (nothing to continue)."""
    from .engine.checkpoint import SLOTS, load_checkpoint
    from .errors import TrainingError

    weights = folder / "weights"
    if not any((weights / f"{slot}_state.pt").exists() for slot in SLOTS):
        return 0
    try:
        loaded = load_checkpoint(weights, tensors=False)
    except TrainingError as err:
        if log is not None:
            log(f"{folder}: {err}")
        return 0
    if log is not None:
        for line in loaded.skipped:
            log(f"{folder}: skipped {line}")
    return int(loaded.state["epoch"])


def cached_teacher(model: str, epochs: int, base: dict[str, Any], log: Any = print, fresh: bool = False,
                   key: str | None = None, tag: str = "") -> Path:
    """Train ``model`` for ``epochs`` (run options ``base``) once, cached in ``$KDCLI_HOME/demo-teachers/<key>``
    (default ``<model>-e<epochs>``); an interrupted run is continued, a finished one reused. The demo and
    ``kdcli bench quality`` share these teachers (same key and options: same teacher)."""
    from .weights import kdcli_home

    t_dir = kdcli_home() / "demo-teachers" / (key or f"{model}-e{epochs}")
    done = _finished_epochs(t_dir, log=log)
    if fresh or done == 0:
        log(f"{tag}training the teacher {model} ({epochs} epochs; cached in {t_dir})")
        shutil.rmtree(t_dir, ignore_errors=True)
        train(RunConfig(model=model, out=str(t_dir), epochs=epochs, **base), log=log)
    elif done < epochs:  # an interrupted teacher run is continued, not mistaken for a cached one
        log(f"{tag}continuing the interrupted teacher run {t_dir} at epoch {done}/{epochs}")
        resume(t_dir, log=log)
    else:
        log(f"{tag}teacher {model} from cache {t_dir}")
    return t_dir


# -- demo -------------------------------------------------------------------------------------
DEMO = {
    "detection": {
        "teacher": "shapes-r34-fcos", "student": "shapes-r18-fcos", "method": "cankd",
        "teacher_epochs": 16, "student_epochs": 8,
    },
    "segmentation": {
        "teacher": "shapes-r18-deeplabv3", "student": "shapes-mbv3-lraspp", "method": "kd",
        "teacher_epochs": 8, "student_epochs": 6,
    },
}


def demo(tasks: list[str], out: Path = Path("runs/demo"), log: Any = print, quick: bool = False,
         fresh_teacher: bool = False) -> dict[str, list[tuple[str, dict]]]:
    """Teacher (cached), student baseline and distilled student on ``shapes``; returns the tables."""
    tables: dict[str, list[tuple[str, dict]]] = {}
    for task in tasks:
        d = DEMO[task]
        # the shapes recipe (kdcli.config.RECIPES): these models train from scratch in minutes
        base = dict(RECIPES["shapes"], data="shapes", schedule="cosine", seed=0, eval_every=2)
        if task == "segmentation":
            base["schedule"] = "poly"
        if quick:
            base.update(max_train_images=16, max_val_images=8, batch_size=4)
        for sub in (f"{task}-baseline", f"{task}-{d['method']}"):
            shutil.rmtree(out / sub, ignore_errors=True)  # a demo rerun replaces its student runs
        t_epochs = 1 if quick else d["teacher_epochs"]
        s_epochs = 1 if quick else d["student_epochs"]
        key = f"{d['teacher']}-e{t_epochs}{'-quick' if quick else ''}"
        t0 = time.time()
        t_dir = cached_teacher(d["teacher"], t_epochs, base, log=log, fresh=fresh_teacher, key=key, tag=f"[{task}] ")
        t_metrics = json.loads((t_dir / "metrics.json").read_text())
        log(f"[{task}] teacher ready in {time.time() - t0:.0f}s")
        rows = [(f"teacher {d['teacher']}", t_metrics)]
        t0 = time.time()
        log(f"[{task}] student baseline {d['student']} ({s_epochs} epochs)")
        _, s_metrics = train(RunConfig(model=d["student"], out=str(out / f"{task}-baseline"), epochs=s_epochs,
                                       **base), log=log)
        rows.append((f"student {d['student']}", s_metrics))
        log(f"[{task}] baseline done in {time.time() - t0:.0f}s")
        t0 = time.time()
        log(f"[{task}] distilled student ({d['method']}, same budget)")
        _, k_metrics = train(RunConfig(model=d["student"], teacher=str(t_dir), method=d["method"],
                                       set=dict(d.get("set", {})), out=str(out / f"{task}-{d['method']}"),
                                       epochs=s_epochs, **base), log=log)
        rows.append((f"student + {d['method']}", k_metrics))
        log(f"[{task}] distillation done in {time.time() - t0:.0f}s")
        tables[task] = rows
        log(f"[{task}] run folders: {t_dir} (teacher), {out / (task + '-baseline')}, "
            f"{out / (task + '-' + d['method'])}")
    return tables
