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
import platform
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from ..progress import fmt_time
from .stats import ALPHA, holm, paired_test, verdict

BASELINE = "baseline"
RESULT_NEUTRAL = ("keep", "log_every")  # run options that never change a run's metrics (reruns reuse it)


@dataclass(frozen=True)
class Pair:
    """A teacher/student pair of the suite; ``teacher_epochs`` trains an untrained zoo teacher (0: default)."""

    name: str
    teacher: str
    student: str
    teacher_epochs: int = 0


# the shapes suite: detection (FCOS, RetinaNet) and segmentation (DeepLabV3, LRASPP) students; the
# segmentation teacher is the demo's DeepLabV3-R18 trained longer, for both segmentation students
SHAPES_PAIRS: dict[str, Pair] = {
    "fcos": Pair("fcos", "shapes-r34-fcos", "shapes-r18-fcos"),
    "retina": Pair("retina", "shapes-r34-retina", "shapes-r18-retina"),
    "deeplabv3": Pair("deeplabv3", "shapes-r18-deeplabv3", "shapes-r18-deeplabv3"),
    "lraspp": Pair("lraspp", "shapes-r18-deeplabv3", "shapes-mbv3-lraspp"),
}
# epochs of a teacher trained by the suite: the demo's (so that both use the same cached teachers)
TEACHER_EPOCHS = {"detection": 16, "segmentation": 8}
METRICS = {"detection": ("mAP", "AP50"), "segmentation": ("mIoU", "pixel_acc")}
CAVEAT = (
    "Short equal-budget proxies can mis-rank methods. Measured on the shapes FCOS pair against its 8-epoch "
    "budget: a 1-epoch proxy ranked with Kendall tau 0.05 (no information), a 2-epoch proxy with tau 0.45 "
    "(4 of the top 5 kept); on the LR-ASPP pair a 1-epoch proxy with tau 0.10 (docs/results/quality.md). "
    "Methods with learnable adapters, generators or masks "
    "(FGD's global block, MGD's generator, ACAM's and MasKD's masks) start slowly and gain more from longer "
    "schedules than logit methods do, and differences within one or two standard deviations are noise. "
    "Use the proxy to shortlist; confirm the top few at the full budget before choosing."
)


@dataclass
class QualityOptions:
    pairs: list[Pair]
    data: str = "shapes"
    methods: str = "all"
    budget: str = "2e"
    seeds: int = 3
    out: Path = Path("runs/bench-quality")
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adamw"
    amp: str = "auto"  # bf16 where the hardware has native bf16 (kdcli/runtime.py)
    image_size: int = 0
    max_train_images: int = 0
    max_val_images: int = 0
    device: str = "auto"
    workers: int = 2
    student_weights: str | None = None
    isolate: bool = True
    jobs: int = 1  # runs at once, each a child process with (usable cores // jobs) threads
    reference: Path | None = None
    command: str = ""
    keep: str = "best"  # what each finished run keeps (engine/keep.py): a suite is many runs


@dataclass
class Budget:
    epochs: int
    steps: int  # optimizer steps per run
    max_train_images: int  # 0: all
    text: str


@dataclass
class SuiteResult:
    rows: list[dict[str, Any]] = field(default_factory=list)  # quality.csv
    runs: list[dict[str, Any]] = field(default_factory=list)  # runs.csv
    contrasts: list[dict[str, Any]] = field(default_factory=list)  # contrasts.csv
    files: list[Path] = field(default_factory=list)
    wall_s: float = 0.0


# -- options ----------------------------------------------------------------------------------------------
def parse_budget(text: str) -> tuple[str, int]:
    """``"2e"``/``"2ep"``/``"2epochs"`` → ("epochs", 2); ``"300"``/``"300steps"`` → ("steps", 300)."""
    t = text.strip().lower()
    for suffix, kind in (("epochs", "epochs"), ("epoch", "epochs"), ("ep", "epochs"), ("e", "epochs"),
                         ("steps", "steps"), ("step", "steps"), ("s", "steps"), ("", "steps")):
        if t.endswith(suffix) and t[: len(t) - len(suffix)].isdigit():
            n = int(t[: len(t) - len(suffix)])
            if n < 1:
                break
            return kind, n
    raise ConfigError(f"--budget {text}: expected epochs as 2e or optimizer steps as 300")


def pairs_from(names: str) -> list[Pair]:
    """``--pairs fcos,lraspp`` (or ``all``) → the shapes suite's pairs."""
    keys = list(SHAPES_PAIRS) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    bad = [k for k in keys if k not in SHAPES_PAIRS]
    if bad or not keys:
        raise ConfigError(f"--pairs {names}: expected all or some of {', '.join(SHAPES_PAIRS)}")
    return [SHAPES_PAIRS[k] for k in keys]


def method_names(task: str, methods: str = "all") -> list[str]:
    """The student methods of the suite for ``task``, baseline first (module docstring)."""
    from ..methods import available, get

    registry = available()
    if methods.strip() == "all":
        names = list(registry)
    else:
        names = [n.strip() for n in methods.split(",") if n.strip()]
        for n in names:
            if n != BASELINE:
                get(n)  # unknown names fail here, with the list of valid ones
    out = [BASELINE]
    for n in names:
        if n == BASELINE:
            continue
        cls = registry[n]
        if task not in cls.tasks or task not in cls.presets:
            continue
        if not cls.needs_teacher and cls.teacher_note:
            continue  # a teacher-training objective (MCMI), not a way to train the student
        out.append(n)
    if methods.strip() != "all" and len(out) == 1 and names:
        raise ConfigError(f"--methods {methods}: none of them supports {task}")
    return out


def needs_teacher(method: str) -> bool:
    from ..methods import get

    return method != BASELINE and get(method).needs_teacher


def plan_budget(budget: str, n_train: int, batch_size: int) -> Budget:
    """Epochs (and a training subset for budgets under one epoch) for a budget on ``n_train`` images."""
    kind, n = parse_budget(budget)
    per_epoch = max(1, n_train // batch_size if n_train > batch_size else 1)
    if kind == "epochs":
        return Budget(n, n * per_epoch, 0, f"{n} epoch{'s' if n > 1 else ''} = {n * per_epoch} steps")
    if n < per_epoch:
        return Budget(1, n, n * batch_size, f"{n} steps (1 epoch on {n * batch_size} of {n_train} images)")
    epochs = max(1, round(n / per_epoch))
    return Budget(epochs, epochs * per_epoch, 0, f"{epochs * per_epoch} steps ({epochs} epochs; asked {n})")


def recipe(task: str, opts: QualityOptions) -> dict[str, Any]:
    """Run options shared by every student of the suite (and its cached teachers): the demo's recipe."""
    return dict(data=opts.data, batch_size=opts.batch_size, lr=opts.lr, optimizer=opts.optimizer, amp=opts.amp,
                weight_decay=1e-4, warmup_iters=50, schedule="cosine" if task == "detection" else "poly",
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


def run_one(cfg: RunConfig, isolate: bool, log: Any, jobs: int = 1, stop: threading.Event | None = None,
            ) -> dict[str, Any]:
    """Train one run (``cfg.out``) and measure it; a finished run with the same config is reused."""
    from .. import api
    from ._proc import RssSampler, run_child, tail

    folder = Path(cfg.out)
    result_path = folder.with_name(folder.name + ".result.json")
    if result_path.is_file():
        rec = json.loads(result_path.read_text())
        # what a run keeps on disk and how often it logs do not change its result
        same = {k: v for k, v in rec.get("config", {}).items() if k not in RESULT_NEUTRAL} == \
            {k: v for k, v in cfg.to_dict().items() if k not in RESULT_NEUTRAL}
        if same and rec.get("status") == "ok":
            return rec
    shutil.rmtree(folder, ignore_errors=True)
    result_path.unlink(missing_ok=True)
    rec: dict[str, Any] = {"config": cfg.to_dict(), "status": "ok"}
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def aggregate(runs: list[dict[str, Any]], teacher_metrics: dict[str, dict[str, Any]],
              plans: dict[str, tuple[str, list[str], Budget]]) -> list[dict[str, Any]]:
    """One row per pair and method: mean ± std over seeds, paired gain over the baseline with its one-sided
    paired t-test, rank. The verdicts come from :func:`correct`, once every test of the suite is known."""
    rows: list[dict[str, Any]] = []
    for pair_name, (task, names, budget) in plans.items():
        a, b = METRICS[task]
        pruns = [r for r in runs if r["pair"] == pair_name]
        base = {r["seed"]: r[a] for r in pruns if r["method"] == BASELINE}
        prow: list[dict[str, Any]] = []
        for name in names:
            mine = [r for r in pruns if r["method"] == name]
            if not mine:
                continue
            ok = [r for r in mine if r["status"] == "ok"]
            ma, sa = _mean_std([r[a] for r in ok])
            mb, sb = _mean_std([r[b] for r in ok])
            gains = [r[a] - base[r["seed"]] for r in ok if r["seed"] in base and not math.isnan(base[r["seed"]])]
            g, gs = _mean_std(gains) if name != BASELINE else (0.0, 0.0)
            test = paired_test(gains)
            first = mine[0]
            prow.append({
                "pair": pair_name, "task": task, "teacher": first["teacher"], "student": first["student"],
                "method": name, "seeds": len(ok), "failed": len(mine) - len(ok), "metric": a,
                "mean": ma, "std": sa, f"{b}_mean": mb, f"{b}_std": sb, "gain": g, "gain_std": gs,
                "t": test.t, "df": test.df, "p": test.p, "_test": test,
                "run_s": _mean_std([r["run_s"] for r in ok])[0], "train_s": _mean_std([r["train_s"] for r in ok])[0],
                "peak_mem_mb": _mean_std([r["peak_mem_mb"] for r in ok])[0],
                "loss_ratio": _mean_std([r["loss_ratio"] for r in ok])[0],
                "mem_kind": first["mem_kind"], "epochs": budget.epochs, "steps": budget.steps,
                "teacher_score": float(teacher_metrics.get(pair_name, {}).get(a, math.nan)),
            })
        scored = [r["mean"] for r in prow if not math.isnan(r["mean"])]
        for r in prow:  # competition ranking: equal scores share a rank (1, 2, 2, 4)
            r["rank"] = "" if math.isnan(r["mean"]) else 1 + sum(m > r["mean"] for m in scored)
        rows.extend(sorted(prow, key=lambda r: (r["rank"] == "", r["rank"] or 0, r["method"] != BASELINE)))
    return rows


# The seeds' claims that the suite tests head to head (paired by seed, same pair): ACAM-KD against the
# methods its paper compares with, CanKD against CWD/MGD, SAMKD against MGD/FreeKD/DMKD.
CONTRASTS: tuple[tuple[str, str], ...] = (
    ("acam", "maskd"), ("acam", "fgd"), ("acam", "freekd"),
    ("cankd", "cwd"), ("cankd", "mgd"),
    ("samkd", "mgd"), ("samkd", "freekd"), ("samkd", "dmkd"),
)


def contrasts(runs: list[dict[str, Any]], plans: dict[str, tuple[str, list[str], Budget]]) -> list[dict[str, Any]]:
    """Method-against-method paired tests (same pair, same seed) for the :data:`CONTRASTS` both present."""
    out: list[dict[str, Any]] = []
    for pair_name, (task, _names, _budget) in plans.items():
        a = METRICS[task][0]
        score = {(r["method"], r["seed"]): r[a] for r in runs if r["pair"] == pair_name and r["status"] == "ok"}
        for x, y in CONTRASTS:
            diffs = [score[(x, s)] - score[(y, s)] for (m, s) in score if m == x and (y, s) in score]
            if not diffs:
                continue
            t = paired_test(diffs)
            out.append({"pair": pair_name, "task": task, "method": x, "versus": y, "metric": a, "seeds": t.n,
                        "diff": t.mean, "diff_std": t.sd, "t": t.t, "df": t.df, "p": t.p, "_test": t})
    return out


def correct(rows: list[dict[str, Any]], versus: list[dict[str, Any]]) -> None:
    """Holm's correction over every test of the suite (each method against the baseline on each pair, and the
    contrasts); fills ``p_holm`` and ``verdict`` in place."""
    tests = [r for r in rows if r["method"] != BASELINE] + versus
    adjusted = holm([r["p"] for r in tests])
    for r, ph in zip(tests, adjusted, strict=True):
        r["p_holm"] = ph
        r["verdict"] = verdict(r.pop("_test"), ph)
    for r in rows:
        if r["method"] == BASELINE:
            r.pop("_test", None)
            r["p_holm"], r["verdict"] = math.nan, "—"


# -- rankings --------------------------------------------------------------------------------------------
def kendall_tau(a: dict[str, float], b: dict[str, float]) -> tuple[float, int]:
    """Kendall's τ-b between two sets of scores over their common methods; (nan, n) when undefined.

    τ-b counts ties (equal scores, e.g. several methods at mAP 0 after a very short proxy) as neither
    concordant nor discordant and corrects for them, so a ranking that is mostly ties does not look like
    an agreement."""
    common = [k for k in a if k in b and not (math.isnan(a[k]) or math.isnan(b[k]))]
    n = len(common)
    conc = disc = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da = a[common[i]] - a[common[j]]
            db = b[common[i]] - b[common[j]]
            if da == 0:
                ties_a += 1
            if db == 0:
                ties_b += 1
            if da and db:
                conc += (da > 0) == (db > 0)
                disc += (da > 0) != (db > 0)
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - ties_a) * (pairs - ties_b))
    return ((conc - disc) / denom if denom else math.nan), n


def read_rows(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--reference {p}: no such file (expected a quality.csv of another suite)")
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def _scores(rows: list[dict[str, Any]], pair: str) -> dict[str, float]:
    out = {}
    for r in rows:
        if r["pair"] == pair and r.get("mean") not in ("", None):
            out[r["method"]] = float(r["mean"])
    return out


def compare_rankings(rows: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Per pair: Kendall's τ-b between this suite's scores and the reference suite's."""
    return {p: kendall_tau(_scores(rows, p), _scores(ref, p)) for p in dict.fromkeys(r["pair"] for r in rows)}


# -- outputs ---------------------------------------------------------------------------------------------------
QUALITY_COLUMNS = ["pair", "task", "teacher", "student", "method", "rank", "seeds", "failed", "metric", "mean", "std",
                   "gain", "gain_std", "t", "df", "p", "p_holm", "verdict", "run_s", "train_s", "peak_mem_mb",
                   "mem_kind", "loss_ratio", "epochs", "steps", "teacher_score"]


CONTRAST_COLUMNS = ["pair", "task", "method", "versus", "metric", "seeds", "diff", "diff_std", "t", "df", "p",
                    "p_holm", "verdict"]


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    keys = columns or list(dict.fromkeys(k for r in rows for k in r))
    keys += [k for k in dict.fromkeys(k for r in rows for k in r) if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, ""), 5) for k in keys})
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - the description is informative only
        pass
    return text


def _loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return math.nan


def markdown(opts: QualityOptions, res: SuiteResult, teachers: dict[str, tuple[str, dict[str, Any]]],
             plans: dict[str, tuple[str, list[str], Budget]], agreement: dict[str, tuple[float, int]],
             load: tuple[float, float]) -> str:
    from ..engine.record import versions

    v = versions()
    lines = ["# Quality benchmark (`kdcli bench quality`)", ""]
    if opts.command:
        lines += ["```", opts.command, "```", ""]
    lines += [
        f"- versions: kdcli {v['kdcli']}, torch {v['torch']}, torchvision {v['torchvision']}, timm {v['timm']}, "
        f"Python {v['python']}",
        f"- machine: {machine()}; load average {load[0]} at the start, {load[1]} at the end",
        f"- data: `{opts.data}`; seeds {', '.join(map(str, range(opts.seeds)))}; batch {opts.batch_size}, "
        f"{opts.optimizer} lr {opts.lr:g}, amp {opts.amp}, image size {opts.image_size or 'the model default'}",
        f"- wall time: {res.wall_s / 60:.1f} min for this invocation (teachers from cache or trained); the runs "
        f"themselves took {sum(r['run_s'] for r in res.runs if not math.isnan(r['run_s'])) / 60:.1f} min in all "
        "(runs reused from an earlier invocation count with their original time)"
        + (f"; {opts.jobs} runs at a time, so each run's times include sharing the machine with the others"
           if opts.jobs > 1 else ""),
        "- every method: same student, same recipe, same budget and seeds; validation once after the last epoch; "
        "gain = mean over seeds of (method − baseline of the same seed) ± std (± only with 2+ seeds); "
        f"*beats baseline*: a one-sided paired t-test (same seed; n − 1 degrees of freedom) of gain > 0, \"yes\" "
        f"when its p-value after Holm's correction over every test of this suite (each method on each pair and the "
        f"method-against-method contrasts) is at most {ALPHA}; *p (Holm)*: that corrected p-value; one seed is "
        "never a test; *distill/task loss*: the distillation terms over the "
        "task terms in the first epoch's mean losses (≫ 1: the method's official weight dominates the task here)",
        "",
    ]
    for pair in opts.pairs:
        task, names, budget = plans[pair.name]
        a, b = METRICS[task]
        t_ref, t_metrics = teachers[pair.name]
        rows = [r for r in res.rows if r["pair"] == pair.name]
        lines += [f"## {pair.name}: {pair.teacher} → {pair.student} ({task})", "",
                  f"Teacher {a} {_fmt(float(t_metrics.get(a, math.nan)))} (`{t_ref}`). Budget: {budget.text} of "
                  f"batch {opts.batch_size}; {len(names) - 1} methods.", ""]
        lines += [f"| rank | method | {a} | {b} | gain {a} | p (Holm) | beats baseline | distill/task loss "
                  "| run s | train s | peak MB |", "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in rows:
            pm = r["seeds"] > 1  # a spread needs two seeds
            ms = (f"{_fmt(r['mean'])} ± {_fmt(r['std'])}" if pm else _fmt(r["mean"])) if r["seeds"] else "failed"
            mb = (f"{_fmt(r[f'{b}_mean'])} ± {_fmt(r[f'{b}_std'])}" if pm else _fmt(r[f"{b}_mean"])) \
                if r["seeds"] else ""
            gain = "—"
            if r["method"] != BASELINE and not math.isnan(r["gain"]):
                gain = f"{r['gain']:+.4f} ± {_fmt(r['gain_std'])}" if pm else f"{r['gain']:+.4f}"
            name = f"**{r['method']}**" if r["method"] == BASELINE else r["method"]
            if r["failed"]:
                name += f" ({r['failed']} failed)"
            ratio = "—" if r["method"] == BASELINE else _fmt(r["loss_ratio"], 2)
            lines.append(f"| {r['rank']} | {name} | {ms} | {mb} | {gain} | {_fmt(r.get('p_holm', math.nan), 3)} "
                         f"| {r['verdict']} | {ratio} "
                         f"| {_fmt(r['run_s'], 1)} | {_fmt(r['train_s'], 1)} | {_fmt(r['peak_mem_mb'], 0)} |")
        losers = [r["method"] for r in rows if r["method"] != BASELINE and r["seeds"]
                  and not str(r["verdict"]).startswith("yes")]
        if losers:
            lines += ["", f"Not beating the baseline here: {', '.join(losers)}."]
        failed = [r["method"] for r in rows if not r["seeds"]]
        if failed:
            lines += ["", f"Failed in every seed (see the list below): {', '.join(failed)}."]
        if pair.name in agreement:
            tau, n = agreement[pair.name]
            tau_text = "undefined (the scores tie)" if math.isnan(tau) else f"{tau:.2f}"
            lines += ["", f"Ranking agreement with the reference suite (`{opts.reference}`): Kendall τ-b = "
                          f"{tau_text} over {n} common methods (ties count as neither agreement nor "
                          "disagreement)."]
        versus = [c for c in res.contrasts if c["pair"] == pair.name]
        if versus:
            lines += ["", f"Method against method (paired by seed, one-sided: the first beats the second in {a}):",
                      "", "| method | versus | seeds | mean difference | t | p | p (Holm) | first beats second |",
                      "|---|---|---:|---:|---:|---:|---:|---|"]
            lines += [f"| {c['method']} | {c['versus']} | {c['seeds']} | {c['diff']:+.4f} | {_fmt(c['t'], 2)} "
                      f"| {_fmt(c['p'], 3)} | {_fmt(c['p_holm'], 3)} | {c['verdict']} |" for c in versus]
        mem = rows[0]["mem_kind"] if rows else ""
        lines += ["", f"Memory: {mem}.", ""]
    for r in res.runs:
        if r["status"] != "ok":
            lines.append(f"- failed: {r['pair']} {r['method']} seed {r['seed']}: {r['status']}")
    lines += ["", "**Caveat.** " + CAVEAT, ""]
    return "\n".join(lines)


def bar_figure_size(n_pairs: int, n_methods: int) -> tuple[float, float]:
    """Inches of ``quality.png``: 6 wide per pair, 0.3 per method bar plus margins."""
    return 6.0 * n_pairs, 1.6 + 0.3 * n_methods


def bar_plot(path: Path, rows: list[dict[str, Any]], pairs: list[Pair], dpi: int = 100) -> Path:
    """Horizontal bars of the main metric per method (± std), baseline (dashed) and teacher (dotted) lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per = {p.name: [r for r in rows if r["pair"] == p.name and not math.isnan(r["mean"])] for p in pairs}
    n_methods = max([len(v) for v in per.values()] + [1])
    fig = Figure(figsize=bar_figure_size(len(pairs), n_methods), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, pair in zip(axes, pairs, strict=True):
        data = sorted(per[pair.name], key=lambda r: r["mean"])
        names = [r["method"] for r in data]
        base = next((r["mean"] for r in data if r["method"] == BASELINE), math.nan)
        colours = ["0.55" if n == BASELINE else "tab:green" if r["mean"] > base else "tab:red" if r["mean"] < base
                   else "0.8" for n, r in zip(names, data, strict=True)]  # above / below / equal to the baseline
        ax.barh(range(len(data)), [r["mean"] for r in data], xerr=[r["std"] for r in data], color=colours,
                capsize=2)
        ax.set_yticks(range(len(data)))
        ax.set_yticklabels(names, fontsize=8)
        if not math.isnan(base):
            ax.axvline(base, color="0.3", linestyle="--", linewidth=1, label="baseline")
        teacher = data[0]["teacher_score"] if data else math.nan
        if not math.isnan(teacher):
            ax.axvline(teacher, color="k", linestyle=":", linewidth=1, label="teacher")
        metric = data[0]["metric"] if data else ""
        ax.set_xlabel(f"{metric} (mean ± std over seeds)")
        ax.set_title(f"{pair.name}: {pair.teacher} → {pair.student}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    return path


def write_outputs(out: Path, opts: QualityOptions, res: SuiteResult, teachers: dict[str, tuple[str, dict[str, Any]]],
                  plans: dict[str, tuple[str, list[str], Budget]], agreement: dict[str, tuple[float, int]],
                  load: tuple[float, float]) -> list[Path]:
    files = [write_csv(out / "quality.csv", res.rows, list(QUALITY_COLUMNS)),
             write_csv(out / "runs.csv", res.runs),
             write_csv(out / "contrasts.csv", res.contrasts, list(CONTRAST_COLUMNS))]
    md = out / "quality.md"
    md.write_text(markdown(opts, res, teachers, plans, agreement, load))
    files.append(md)
    files.append(bar_plot(out / "quality.png", res.rows, opts.pairs))
    (out / "options.json").write_text(json.dumps({**asdict(opts), "pairs": [asdict(p) for p in opts.pairs]},
                                                 indent=1, default=str))
    return files


def main(argv: list[str] | None = None) -> int:
    """``python -m kdcli.bench.quality --child JOB`` only: the suite itself is ``kdcli bench quality``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--child":
        return _child_main(argv[1])
    print("usage: python -m kdcli.bench.quality --child JOB (the suite: kdcli bench quality)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
