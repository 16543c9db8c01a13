"""``kdcli bench quality``: every applicable method on the same student, at one equal budget, over seeds.

For each teacher/student pair: the teacher (trained once and cached when it is an untrained zoo entry,
exactly as the demo's teachers, :func:`kdcli.api.cached_teacher`), the student trained alone (the
*baseline*), and the student distilled with every registered method that supports the task — self-KD
methods (PS-KD, USKD) without the teacher; MCMI, a teacher-training objective, is not a student method and
is left out — all with the same recipe, the same budget and the same seeds. Each run is a normal run folder
(``OUT/runs/<pair>/<method>/seed<k>``); a finished run is reused when the suite is run again with the same
options, so an interrupted suite continues where it stopped.
``--jobs N`` runs N of them at once, each a child process with its share of the cores (run times then
include the sharing).

Budget: ``--budget 2e`` (epochs) or ``--budget 300`` (optimizer steps; a budget under one epoch trains one
epoch on the first ``steps × batch`` training images). Validation runs once, after the last epoch: the
score of a run is its final score, never a best-of-epochs pick.

Measured per run: the main metric (mAP and AP50, or mIoU and pixel accuracy) on the validation set, the
run's wall time (model building, training and the final evaluation) and its training-loop time, and the
peak memory: with ``--isolate`` (default) each run is a child process and its own peak RSS is read from
``os.wait4`` (CPU; on CUDA the child's ``torch.cuda.max_memory_allocated``); ``--in-process`` samples the
RSS rise instead (approximate). See :mod:`kdcli.bench._proc`.

Written to ``OUT``: ``quality.csv`` (one row per pair and method: mean ± std over seeds, the paired gain over
the baseline, time, memory, rank), ``runs.csv`` (one row per run), ``quality.md`` (the tables, the command,
versions, machine, wall time and the caveat below) and ``quality.png`` (bars per pair).

"Which method for my pair?" is the same command with ``--teacher T --student S --data D``: short,
equal-budget proxies of every applicable method, ranked. Short proxies can mis-rank: methods with
learnable adapters or masks (FGD's global block, ACAM's masks, MGD's generator) start slowly and are
favoured by longer schedules; ``--reference`` compares this ranking with another suite's (for example a
longer budget) and reports Kendall's τ-b between them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import RECIPES, RunConfig
from ..errors import ConfigError
from ..progress import fmt_time
from .plan import (
    BASELINE,
    METRICS,
    RESULT_NEUTRAL,
    TEACHER_EPOCHS,
    Budget,
    Pair,
    QualityOptions,
    SuiteResult,
    method_names,
    needs_teacher,
    parse_budget,
    plan_budget,
)
from .quality_report import _loadavg, write_outputs
from .ranking import aggregate, compare_rankings, contrasts, correct, read_rows


def recipe(task: str, opts: QualityOptions) -> dict[str, Any]:
    """Run options shared by every student of the suite (and its cached teachers): the demo's recipe."""
    shapes = RECIPES["shapes"]
    return dict(data=opts.data, batch_size=opts.batch_size, lr=opts.lr, optimizer=opts.optimizer, amp=opts.amp,
                weight_decay=shapes["weight_decay"], warmup_iters=shapes["warmup_iters"],
                schedule="cosine" if task == "detection" else "poly",
                image_size=opts.image_size, max_val_images=opts.max_val_images, device=opts.device,
                workers=opts.workers)


# -- teachers ----------------------------------------------------------------------------------------------
def prepare_teacher(pair: Pair, task: str, opts: QualityOptions, log: Any) -> tuple[str, dict[str, Any]]:
    """The teacher reference to distil from and its validation metrics.

    An untrained zoo entry (``weights = none``, the shapes models) is trained once with the suite's recipe
    and cached under ``$KDCLI_HOME/demo-teachers`` (same key as the demo's teachers for the default options);
    anything else (run folder, export, zoo entry with weights, hf-hub) is used as it is and evaluated once."""
    from .. import api
    from ..zoo import resolve_ref

    ref = resolve_ref(pair.teacher)
    if ref.weights is None and ref.spec.weights_kind == "none":
        epochs = pair.teacher_epochs or TEACHER_EPOCHS[task]
        base = {k: v for k, v in recipe(task, opts).items() if k not in ("max_val_images",)}
        base.update(seed=0, eval_every=2, batch_size=opts.batch_size)
        demo = dict(data="shapes", batch_size=8, lr=1e-3, optimizer="adamw", amp="auto", image_size=0)
        key = f"{pair.teacher}-e{epochs}"
        if any(base[k] != v for k, v in demo.items()) or opts.max_train_images:
            base["max_train_images"] = opts.max_train_images
            blob = json.dumps({k: v for k, v in base.items() if k not in ("device", "workers")}, sort_keys=True)
            key += "-" + hashlib.sha256(blob.encode()).hexdigest()[:8]
        t_dir = api.cached_teacher(pair.teacher, epochs, base, log=log, key=key, tag=f"[{pair.name}] ")
        return str(t_dir), json.loads((t_dir / "metrics.json").read_text())
    metrics_file = Path(pair.teacher) / "metrics.json"
    if metrics_file.is_file():
        return pair.teacher, json.loads(metrics_file.read_text())
    log(f"[{pair.name}] evaluating the teacher {pair.teacher} on {opts.data}")
    m = api.evaluate(pair.teacher, data=opts.data, batch_size=opts.batch_size, device=opts.device,
                     max_images=opts.max_val_images, workers=opts.workers)
    m.pop("class_names", None)
    return pair.teacher, m


def train_size(pair: Pair, task: str, opts: QualityOptions) -> int:
    """Number of training images the students see (after ``--max-train-images``)."""
    from ..data import build_dataset, data_hints
    from ..models import image_size_of
    from ..zoo import resolve_ref

    spec = resolve_ref(pair.student).spec
    t_spec = resolve_ref(pair.teacher).spec
    size = opts.image_size or image_size_of(spec)
    ds = build_dataset(opts.data, task, "train", size, train=False, hints=data_hints(spec, t_spec, opts.image_size))
    n = len(ds)
    return min(n, opts.max_train_images) if opts.max_train_images else n


# -- one run -------------------------------------------------------------------------------------------------
def _float_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _train_time(folder: Path) -> float:
    p = folder / "results.csv"
    if not p.is_file():
        return math.nan
    with open(p, newline="") as f:
        return round(sum(float(r.get("train_time_s") or 0) for r in csv.DictReader(f)), 2)


def loss_ratio(folder: Path) -> float:
    """Distillation terms over task terms in the first epoch's mean losses (``results.csv``).

    A ratio far above 1 means the method's gradient dominates the task's from the start: the official
    weights assume the official data, resolution and reductions (a warning sign when a method loses)."""
    p = folder / "results.csv"
    if not p.is_file():
        return math.nan
    with open(p, newline="") as f:
        row = next(csv.DictReader(f), None)
    if row is None:
        return math.nan
    from ..engine.result import loss_columns

    terms = {k: float(v) for k, v in row.items() if k.startswith("loss/") and v not in ("", None)}
    task_cols, methods = loss_columns(terms)
    task = sum(terms[k] for k in task_cols)
    dist = sum(terms[k] for cols in methods.values() for k in cols)
    return dist / task if task > 0 else math.nan


def _child_main(job_path: str) -> int:
    """``python -m kdcli.bench.quality --child JOB``: one run, its result written next to the job file."""
    import torch

    from .. import api

    job = json.loads(Path(job_path).read_text())
    cfg = RunConfig.from_dict(job["config"], job_path)
    from ..runtime import pick_device

    cuda = pick_device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, metrics = api.train(cfg, log=lambda s: print(s, flush=True))
    from ._proc import peak_rss_mb

    result = {"metrics": _float_metrics(metrics), "run_s": round(time.perf_counter() - t0, 2),
              "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
              "rss_peak_mb": peak_rss_mb()}
    Path(job["result"]).write_text(json.dumps(result))
    return 0


def child_env(jobs: int) -> dict[str, str] | None:
    """Environment of a child run when ``jobs`` runs share the machine: the cores split between them
    (OMP_NUM_THREADS, read by torch at start-up); None (inherit) for one job at a time."""
    if jobs <= 1:
        return None
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def method_options(cfg: RunConfig) -> dict[str, Any] | None:
    """Every option of the run's method(s) as the code resolves them now (defaults < preset < ``--set``), in
    JSON form (as a run record keeps them); None without a method."""
    if not cfg.method:
        return None
    from ..methods import get, split_overrides
    from ..zoo import resolve_ref

    try:  # a reuse guard, not a check: a bad name or option fails the run itself, with its own message
        task = resolve_ref(cfg.model).spec.task
        names = cfg.method.split("+")
        per = split_overrides(names, dict(cfg.set))
        resolved = {n: get(n).resolve_hparams(task, per[n]) for n in names}
    except Exception:  # noqa: BLE001
        return None
    return json.loads(json.dumps(resolved, default=str))


def run_one(cfg: RunConfig, isolate: bool, log: Any, jobs: int = 1, stop: threading.Event | None = None,
            ) -> dict[str, Any]:
    """Train one run (``cfg.out``) and measure it; a finished run with the same config is reused."""
    from .. import api
    from ._proc import RssSampler, run_child, tail

    folder = Path(cfg.out)
    result_path = folder.with_name(folder.name + ".result.json")
    options = method_options(cfg)
    if result_path.is_file():
        rec = json.loads(result_path.read_text())
        # what a run keeps on disk and how often it logs do not change its result
        same = {k: v for k, v in rec.get("config", {}).items() if k not in RESULT_NEUTRAL} == \
            {k: v for k, v in cfg.to_dict().items() if k not in RESULT_NEUTRAL}
        # a method default or preset changed since the run (same --set, other options): not the same run;
        # records written before the options were kept have none and are compared by config alone
        same = same and rec.get("method_options", options) == options
        if same and rec.get("status") == "ok":
            return rec
    shutil.rmtree(folder, ignore_errors=True)
    result_path.unlink(missing_ok=True)
    rec: dict[str, Any] = {"config": cfg.to_dict(), "status": "ok", "method_options": options}
    if isolate:
        job = folder.with_name(folder.name + ".job.json")
        child_out = folder.with_name(folder.name + ".child.json")
        job.write_text(json.dumps({"config": cfg.to_dict(), "result": str(child_out)}))
        child_out.unlink(missing_ok=True)
        code, rss = run_child([sys.executable, "-m", "kdcli.bench.quality", "--child", str(job)],
                              folder.with_name(folder.name + ".log"), env=child_env(jobs), stop=stop)
        if code != 0 or not child_out.is_file():
            rec.update(status=f"failed: {tail(folder.with_name(folder.name + '.log')) or f'exit code {code}'}")
        else:
            child = json.loads(child_out.read_text())
            cuda, own = child.get("cuda_peak_mb"), child.get("rss_peak_mb")
            # the child's own high-water mark; wait4's ru_maxrss also counts the parent's RSS at the fork
            peak = cuda if cuda is not None else own if own is not None else rss
            rec.update(metrics=child["metrics"], run_s=child["run_s"], peak_mem_mb=round(peak, 1),
                       mem_kind="cuda max allocated" if cuda is not None else "peak RSS (child process)")
    else:
        import torch

        from ..runtime import pick_device

        cuda = pick_device(cfg.device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            with RssSampler() as rss:
                _, metrics = api.train(cfg, log=lambda s: None)
        except Exception as err:  # noqa: BLE001 - one failing method must not end a long suite; it is reported
            rec.update(status=f"failed: {type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}")
        else:
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak_mb
            rec.update(metrics=_float_metrics(metrics), run_s=round(time.perf_counter() - t0, 2),
                       peak_mem_mb=round(peak, 1),
                       mem_kind="cuda max allocated" if cuda else "RSS rise (in-process, approximate)")
    rec["train_s"] = _train_time(folder)
    rec["loss_ratio"] = loss_ratio(folder)
    result_path.write_text(json.dumps(rec, indent=1))
    return rec


# -- the suite -----------------------------------------------------------------------------------------------
def run_suite(opts: QualityOptions, log: Any = print) -> SuiteResult:
    """Run every pair × method × seed, then write quality.csv / runs.csv / quality.md / quality.png."""
    from ..zoo import resolve_ref

    if opts.seeds < 1:
        raise ConfigError(f"--seeds {opts.seeds}: expected at least 1")
    if opts.jobs < 1 or (opts.jobs > 1 and not opts.isolate):
        raise ConfigError(f"--jobs {opts.jobs}: expected at least 1, and runs in child processes (--isolate)")
    parse_budget(opts.budget)
    t_start = time.time()
    load0 = _loadavg()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    res = SuiteResult()
    stop = threading.Event()  # set on Ctrl-C with --jobs > 1: the worker threads kill their children
    teachers: dict[str, tuple[str, dict[str, Any]]] = {}
    plans: dict[str, tuple[str, list[str], Budget]] = {}
    for pair in opts.pairs:  # validate everything before the first (long) run
        task = resolve_ref(pair.student).spec.task
        if resolve_ref(pair.teacher).spec.task != task:
            raise ConfigError(f"--teacher {pair.teacher} and --student {pair.student}: different tasks")
        plans[pair.name] = (task, method_names(task, opts.methods), Budget(0, 0, 0, ""))
    # suite progress: runs done of all, and the ETA from the mean run time so far (runs at once: --jobs)
    counter = {"done": 0, "run_s": 0.0, "total": sum(opts.seeds * len(p[1]) for p in plans.values())}
    count_lock = threading.Lock()
    for pair in opts.pairs:
        task, names, _ = plans[pair.name]
        teachers[pair.name] = prepare_teacher(pair, task, opts, log)
        budget = plan_budget(opts.budget, train_size(pair, task, opts), opts.batch_size)
        plans[pair.name] = (task, names, budget)
        log(f"[{pair.name}] {len(names) - 1} methods + baseline x {opts.seeds} seed(s), budget {budget.text}")
        work: list[tuple[int, str, RunConfig]] = []
        for seed in range(opts.seeds):
            for name in names:
                folder = out / "runs" / pair.name / name / f"seed{seed}"
                folder.parent.mkdir(parents=True, exist_ok=True)
                work.append((seed, name, RunConfig(
                    model=pair.student, teacher=teachers[pair.name][0] if needs_teacher(name) else None,
                    method=None if name == BASELINE else name, out=str(folder), seed=seed, epochs=budget.epochs,
                    max_train_images=budget.max_train_images or opts.max_train_images, eval_every=0,
                    skip_teacher_check=True, student_weights=opts.student_weights, keep=opts.keep,
                    **recipe(task, opts))))

        def one(item: tuple[int, str, RunConfig], pair: Pair = pair, task: str = task) -> dict[str, Any]:
            seed, name, cfg = item
            t0 = time.time()
            if stop.is_set():
                return {"config": cfg.to_dict(), "status": "failed: not run (the suite was stopped)"}
            try:
                rec = run_one(cfg, opts.isolate, log, opts.jobs, stop)
            except Exception as err:  # noqa: BLE001 - a broken run is reported; the others go on
                rec = {"config": cfg.to_dict(), "status": f"failed: {type(err).__name__}: {err}"}
            main = METRICS[task][0]
            score = rec.get("metrics", {}).get(main)
            with count_lock:
                counter["done"] += 1
                counter["run_s"] += time.time() - t0
                done, total = int(counter["done"]), int(counter["total"])
                eta = counter["run_s"] / done * (total - done) / opts.jobs
            log(f"[{pair.name}] [{done}/{total}] seed {seed} {name}: "
                + (f"{main} {score:.4f}" if score is not None else rec["status"])
                + f" ({time.time() - t0:.0f}s); suite eta {fmt_time(eta)}")
            return rec

        if opts.jobs > 1:  # child processes: the threads only wait for them
            pool = ThreadPoolExecutor(opts.jobs)
            try:
                recs = [f.result() for f in [pool.submit(one, item) for item in work]]
            except BaseException:  # Ctrl-C reaches this thread only: stop the queue and kill the running children
                stop.set()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            recs = [one(item) for item in work]
        res.runs.extend(_run_row(pair, task, name, seed, budget, rec)
                        for (seed, name, _), rec in zip(work, recs, strict=True))
    res.wall_s = round(time.time() - t_start, 1)
    res.rows = aggregate(res.runs, {p: t[1] for p, t in teachers.items()}, plans)
    res.contrasts = contrasts(res.runs, plans)
    correct(res.rows, res.contrasts)
    agreement = compare_rankings(res.rows, read_rows(opts.reference)) if opts.reference else {}
    res.files = write_outputs(out, opts, res, teachers, plans, agreement, (load0, _loadavg()))
    return res


def _run_row(pair: Pair, task: str, name: str, seed: int, budget: Budget, rec: dict[str, Any]) -> dict[str, Any]:
    m = rec.get("metrics", {})
    a, b = METRICS[task]
    return {"pair": pair.name, "task": task, "teacher": pair.teacher, "student": pair.student, "method": name,
            "seed": seed, "status": rec["status"], a: m.get(a, math.nan), b: m.get(b, math.nan),
            "run_s": rec.get("run_s", math.nan), "train_s": rec.get("train_s", math.nan),
            "peak_mem_mb": rec.get("peak_mem_mb", math.nan), "mem_kind": rec.get("mem_kind", ""),
            "loss_ratio": rec.get("loss_ratio", loss_ratio(Path(rec["config"]["out"]))),
            "epochs": budget.epochs, "steps": budget.steps}


def main(argv: list[str] | None = None) -> int:
    """``python -m kdcli.bench.quality --child JOB`` only: the suite itself is ``kdcli bench quality``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--child":
        return _child_main(argv[1])
    print("usage: python -m kdcli.bench.quality --child JOB (the suite: kdcli bench quality)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
