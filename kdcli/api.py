"""The Python API the CLI calls: train, distill, evaluate, export, demo."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .config import TASK_DEFAULTS, RunConfig
from .errors import ConfigError, KdcliError


def _with_task_defaults(cfg: RunConfig, explicit: set[str]) -> RunConfig:
    from .zoo import resolve_ref

    task = resolve_ref(cfg.model).spec.task
    updates = {k: v for k, v in TASK_DEFAULTS[task].items() if k not in explicit}
    return cfg.merged(updates)


def train(cfg: RunConfig, resume: bool = False, log: Any = print, explicit: set[str] | None = None,
          stop_after: int | None = None) -> tuple[Path, dict]:
    """Train ``cfg.model`` (no teacher), or distil when ``cfg.teacher``/``cfg.method`` are set."""
    import torch

    from .engine.trainer import build_run, fit

    if explicit is not None:
        cfg = _with_task_defaults(cfg, explicit)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = build_run(cfg, log=log)
    metrics = fit(run, resume=resume, stop_after=stop_after)
    return run.folder, metrics


def resume(folder: str | Path, log: Any = print) -> tuple[Path, dict]:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"--resume {folder}: not a run folder (no config.json)")
    record = json.loads(cfg_path.read_text())
    cfg = RunConfig.from_dict(record["config"], str(cfg_path))
    cfg.out = str(folder)
    return train(cfg, resume=True, log=log)


def evaluate(ref: str, data: str = "shapes", batch_size: int = 8, device: str = "auto",
             max_images: int = 0, out_dir: Path | None = None, workers: int = 2) -> dict[str, Any]:
    """Evaluate a zoo model (cached weights), a run folder or an exported folder."""
    import torch

    from .data import build_dataset, collate_detection, collate_segmentation, subset
    from .engine.evaluate_model import evaluate_model
    from .engine.trainer import image_size_of, pick_device
    from .models import build_model
    from .zoo import resolve_ref

    r = resolve_ref(ref)
    dev = pick_device(device)
    ds = build_dataset(data, r.spec.task, "val", image_size_of(r.spec), train=False)
    if list(ds.classes) != r.spec.classes:
        raise KdcliError(f"{ref}: predicts {len(r.spec.classes)} classes but --data {data} has {len(ds.classes)}")
    if max_images:
        ds = subset(ds, max_images)
    model = build_model(r.spec, r.weights if r.weights is not None else "zoo").to(dev)
    collate = collate_detection if r.spec.task == "detection" else collate_segmentation
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    return evaluate_model(model, loader, ds, dev, out_dir=out_dir)


def export(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``model.safetensors`` (student only, plain torchvision/timm keys) + ``config.json``."""
    from safetensors.torch import load_file

    from . import __version__
    from .engine.checkpoint import save_json, save_tensors
    from .models import build_model
    from .weights import load_strict
    from .zoo import load_model_config

    run = Path(run)
    if not (run / "model.json").is_file():
        raise ConfigError(f"{run}: not a kdcli run folder (model.json missing)")
    best = run / "weights" / "best.safetensors"
    if not best.is_file():
        raise ConfigError(f"{best}: no best weights yet (has the run finished one validation?)")
    spec = load_model_config(run / "model.json")
    state = load_file(str(best))
    load_strict(build_model(spec).net, state, str(best))  # proves the file holds the student alone
    record = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    out_dir = Path(out) if out else run / "export"
    config = {
        "model": spec.to_dict(),
        "kdcli_version": __version__,
        "teacher": record.get("teacher", {}).get("id"),
        "method": record.get("config", {}).get("method"),
        "method_hparams": {k: v.get("hparams") for k, v in record.get("method", {}).items()},
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    meta = {
        "format": "pt",
        "architecture": spec.architecture,
        "backbone": spec.backbone,
        "task": spec.task,
        "classes": json.dumps(spec.classes),
        "preprocess": json.dumps(spec.preprocess),
        "teacher": str(config["teacher"] or ""),
        "method": str(config["method"] or ""),
        "metrics": json.dumps(config["metrics"]),
        "kdcli_version": __version__,
    }
    save_tensors(out_dir / "model.safetensors", state, meta)
    save_json(out_dir / "config.json", config)
    return out_dir


def _finished_epochs(folder: Path) -> int:
    """Epochs a run folder has completed (0 if none), from its resumable state."""
    from .engine.checkpoint import load_state

    state = folder / "weights" / "last_state.pt"
    if not state.exists() or not (folder / "weights" / "best.safetensors").exists():
        return 0
    return int(load_state(state)["epoch"])


# -- demo -------------------------------------------------------------------------------------
DEMO = {
    "detection": {
        "teacher": "shapes-r34-fcos", "student": "shapes-r18-fcos", "method": "cankd",
        "teacher_epochs": 16, "student_epochs": 8, "lr": 1e-3, "optimizer": "adamw", "amp": "bf16",
    },
    "segmentation": {
        "teacher": "shapes-r18-deeplabv3", "student": "shapes-mbv3-lraspp", "method": "kd",
        "teacher_epochs": 8, "student_epochs": 6, "lr": 1e-3, "optimizer": "adamw", "amp": "bf16",
    },
}


def demo(tasks: list[str], out: Path = Path("runs/demo"), log: Any = print, quick: bool = False,
         fresh_teacher: bool = False) -> dict[str, list[tuple[str, dict]]]:
    """Teacher (cached), student baseline and distilled student on ``shapes``; returns the tables."""
    from .weights import kdcli_home

    tables: dict[str, list[tuple[str, dict]]] = {}
    for task in tasks:
        d = DEMO[task]
        base = dict(optimizer=d["optimizer"], lr=d["lr"], amp=d["amp"], data="shapes", warmup_iters=50,
                    weight_decay=1e-4, schedule="cosine", seed=0, eval_every=2)
        if task == "segmentation":
            base["schedule"] = "poly"
        if quick:
            base.update(max_train_images=16, max_val_images=8, batch_size=4)
        for sub in (f"{task}-baseline", f"{task}-{d['method']}"):
            shutil.rmtree(out / sub, ignore_errors=True)  # a demo rerun replaces its student runs
        t_epochs = 1 if quick else d["teacher_epochs"]
        s_epochs = 1 if quick else d["student_epochs"]
        key = f"{d['teacher']}-e{t_epochs}{'-quick' if quick else ''}"
        t_dir = kdcli_home() / "demo-teachers" / key
        t0 = time.time()
        done = _finished_epochs(t_dir)
        if fresh_teacher or done == 0:
            log(f"[{task}] training the teacher {d['teacher']} ({t_epochs} epochs; cached in {t_dir})")
            shutil.rmtree(t_dir, ignore_errors=True)
            train(RunConfig(model=d["teacher"], out=str(t_dir), epochs=t_epochs, **base), log=log)
        elif done < t_epochs:  # an interrupted teacher run is continued, not mistaken for a cached one
            log(f"[{task}] continuing the interrupted teacher run {t_dir} at epoch {done}/{t_epochs}")
            resume(t_dir, log=log)
        else:
            log(f"[{task}] teacher {d['teacher']} from cache {t_dir}")
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
