"""``kdcli bench quality --suite evidence``: the seed methods against the plain student in a regime like the
papers', with paired tests and Holm's correction (docs/results/evidence.md).

What makes it different from the default shapes suite (:mod:`kdcli.bench.quality`):

- **pretrained students**: every paper starts its student from an ImageNet backbone. None is reachable
  here, so kdcli makes an honest stand-in once: the student's backbone body trained to classify
  object-centred crops of shapes (circle, square, triangle; drawn by the embedded shapes generator with
  seeds that the shapes train/val sets never use), cached in ``$KDCLI_HOME/standin-backbones``. Each seed's student
  is that body plus a neck/head freshly initialised with the seed (``init`` column).
- **teachers**: the demo's cached teachers (:func:`kdcli.api.cached_teacher`, same key: same teacher),
  trained with the full demo schedule and far above the student at the suite's budget.
- **no map under 4×4**: 128 px inputs; detection methods distil P3–P5 only (``taps=fpn:3``: 16×16,
  8×8, 4×4) instead of P3–P7 (P6 2×2, P7 1×1); the segmentation taps (logits, C5, the segmentation
  feature) are 8×8 or finer. :func:`map_sizes` computes them from each model's strides.
- **the papers' options**: ``--inherit`` for the methods whose detection configs inherit the teacher's
  neck and head (ACAM-KD, MasKD, FGD, MGD); ACAM-KD's segmentation preset is already one mask per class.
- ≥ 5 seeds, the seeds' methods and the ones they compare against, paired tests with Holm's correction
  over every test of the suite (:mod:`kdcli.bench.stats`), method-against-method contrasts.

Outputs in ``OUT``: ``evidence_runs.csv`` (quality_runs.csv's columns plus ``init`` and ``image_size``),
``evidence.csv`` (per method), ``evidence_contrasts.csv`` and ``evidence.md``.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from .plan import BASELINE, METRICS, Budget, Pair, QualityOptions, SuiteResult, plan_budget
from .quality import _run_row, prepare_teacher, recipe, run_one, train_size
from .quality_report import _loadavg, markdown, write_csv
from .ranking import CONTRAST_COLUMNS, QUALITY_COLUMNS, aggregate, contrasts, correct

# the seed methods and the methods their papers compare against (FreeKD: detection only)
METHODS = ("acam", "samkd", "dmkd", "cankd", "maskd", "fgd", "freekd", "cwd", "mgd")
# seeds per task: 5 on detection; 10 on segmentation, where the 5-seed run's paired spreads (±0.006–0.012
# mIoU around gains of ~0.01) could not pass Holm's threshold (docs/results/evidence.md, "Seeds")
SEEDS = {"detection": 5, "segmentation": 10}
IMAGE_SIZE = 128  # the shapes data's size; the zoo's shapes entries preprocess to it
MIN_MAP = 4  # no distilled map smaller than 4×4
# teacher epochs: the demo's (the suite shares its cached teachers)
PAIRS: dict[str, Pair] = {
    "fcos": Pair("fcos", "shapes-r34-fcos", "shapes-r18-fcos", 16),
    "lraspp": Pair("lraspp", "shapes-r18-deeplabv3", "shapes-mbv3-lraspp", 8),
}
BUDGETS = {"detection": "2e", "segmentation": "1e"}
# P3–P5 at 128 px: 16×16, 8×8, 4×4 (FGD's "auto" would take P3–P7)
TAPS = {"detection": "fpn:3", "segmentation": None}
# methods whose official detection configs inherit the teacher's neck and head (docs/methods/*.md)
INHERIT = {"detection": frozenset({"acam", "maskd", "fgd", "mgd"}), "segmentation": frozenset()}
# the control for those: the plain student that inherits the teacher's neck and head, no distillation loss;
# each inheriting method is also tested against it (does the loss help beyond the inherited start?)
INHERIT_ONLY = "inherit"
# measured seconds per run per epoch on the 2-core Intel Xeon this suite last ran on (bf16 autocast with AMX;
# model building + training + evaluation; docs/results/evidence_runs.csv): the estimate the suite prints. An
# AVX2-only CPU without native bf16 (float32) took about twice as long per run; the fallback is the pair's mean
RUN_S_PER_EPOCH: dict[str, dict[str, float]] = {
    "fcos": {"baseline": 15, "acam": 18.5, "samkd": 19, "dmkd": 18.5, "cankd": 18, "maskd": 18, "fgd": 18,
             "freekd": 18, "cwd": 17.5, "mgd": 18},
    "lraspp": {"baseline": 15, "acam": 19, "samkd": 19.5, "dmkd": 41.5, "cankd": 21.5, "maskd": 19, "cwd": 18.5,
               "mgd": 32},
}
# one-off costs from an empty cache (seconds, same machine): the teachers at the demo schedule (the two took
# about 12 min together) and the stand-in pretraining (400 steps: R18 89 s, MobileNetV3 80 s)
TEACHER_S = {"fcos": 16 * 34, "lraspp": 8 * 22}
STANDIN_S = {"shapes-r18-fcos": 90, "shapes-mbv3-lraspp": 80}
# the stand-in pretraining: a pool of object-centred crops at 64 px (convolution weights do not depend on the
# input size; 64 px is 4x cheaper per step than 128), about 12 passes over it. 400 steps at 3e-3: the
# MobileNetV3 body reached 0.60 held-out accuracy after 120 steps at 1e-3, 0.81 after 240 at 3e-3, 0.91 after
# 400 (R18: 0.94 after 120)
STANDIN_STEPS = 400
STANDIN_LR = 3e-3
STANDIN_BATCH = 32
STANDIN_POOL = 1024
STANDIN_HELDOUT = 256
STANDIN_SIZE = 64
STANDIN_CONTEXT = 1.4  # crop side over the shape's box side: some background around it, as in a photograph


@dataclass
class EvidenceOptions:
    out: Path = Path("runs/bench-evidence")
    data: str = "shapes"  # the suite is defined on shapes; another data set only for smoke tests
    pairs: tuple[str, ...] = tuple(PAIRS)
    methods: tuple[str, ...] = METHODS
    seeds: int = 0  # 0: each task's SEEDS; n: n seeds everywhere
    budgets: dict[str, str] = field(default_factory=lambda: dict(BUDGETS))
    teacher_epochs: int = 0  # 0: the pair's (the demo's)
    standin_steps: int = STANDIN_STEPS
    max_train_images: int = 0
    max_val_images: int = 0
    device: str = "auto"
    workers: int = 2
    jobs: int = 1
    isolate: bool = True
    command: str = ""


@dataclass(frozen=True)
class RunPlan:
    pair: str
    task: str
    method: str
    seed: int
    set: dict[str, Any]
    inherit: bool
    label: str = ""  # an ablation variant's name (folder and CSV ``method``); empty: the method's

    @property
    def name(self) -> str:
        return self.label or self.method


# -- the plan --------------------------------------------------------------------------------------------
def method_list(task: str, methods: tuple[str, ...]) -> list[str]:
    """Baseline first, then the methods of ``methods`` that have a preset for ``task``."""
    from ..methods import get

    names = [BASELINE] + [m for m in methods if task in get(m).tasks and task in get(m).presets]
    return names + ([INHERIT_ONLY] if INHERIT[task] & set(names) else [])


def evidence_contrasts(task_methods: list[str]) -> tuple[tuple[str, str], ...]:
    """The seeds' contrasts, plus each inheriting method against the inherit-only control."""
    from .ranking import CONTRASTS

    extra = tuple((m, INHERIT_ONLY) for m in task_methods if INHERIT_ONLY in task_methods
                  and any(m in v for v in INHERIT.values()))
    return CONTRASTS + extra


def overrides(task: str, method: str) -> dict[str, Any]:
    """``--set`` of a method in the suite: the taps that keep every map at least 4×4."""
    return {} if method in (BASELINE, INHERIT_ONLY) or TAPS[task] is None else {"taps": TAPS[task]}


def seeds_for(opts: EvidenceOptions, task: str) -> int:
    """How many seeds (0, 1, …) the suite runs on ``task``."""
    return opts.seeds or SEEDS[task]


def plan(opts: EvidenceOptions) -> list[RunPlan]:
    from ..zoo import resolve_ref

    out = []
    for name in opts.pairs:
        task = resolve_ref(PAIRS[name].student).spec.task
        for seed in range(seeds_for(opts, task)):
            for m in method_list(task, opts.methods):
                out.append(RunPlan(name, task, m, seed, overrides(task, m), m in INHERIT[task] or m == INHERIT_ONLY))
    return out


@functools.lru_cache(maxsize=8)
def _tap_info(model: str) -> dict[str, Any]:
    from ..models import build_model
    from ..zoo import resolve_ref

    return build_model(resolve_ref(model).spec).tap_info


def map_sizes(pair: Pair, method: str, image_size: int = IMAGE_SIZE) -> dict[str, tuple[int, int]]:
    """Side of every map ``method`` distils on ``pair`` at ``image_size`` (student and teacher), from the
    models' strides (one dry run each): {"student:p3": (16, 16), ...}."""
    from ..methods import get
    from ..methods.base import select_taps
    from ..zoo import resolve_ref

    s_spec = resolve_ref(pair.student).spec
    s_info, t_info = _tap_info(pair.student), _tap_info(pair.teacher)
    cls = get(method)
    hp = {**cls.presets[s_spec.task], **overrides(s_spec.task, method)}
    spec = hp["taps"]
    if spec == "auto":  # FGD's official levels
        from ..methods.fgd import auto_taps

        spec = auto_taps(s_info)
    taps = select_taps(spec, s_info, t_info, method)
    out = {}
    for who, info in (("student", s_info), ("teacher", t_info)):
        for tap in taps:
            side = math.ceil(image_size / info[tap].stride)
            out[f"{who}:{tap}"] = (side, side)
    return out


def estimate_s(opts: EvidenceOptions) -> dict[str, float]:
    """The suite's expected time from an empty cache (seconds), from :data:`RUN_S_PER_EPOCH`."""
    from .plan import parse_budget

    runs = 0.0
    for p in plan(opts):
        table = RUN_S_PER_EPOCH[p.pair]
        # the inherit-only control trains like the baseline
        per = table.get(BASELINE if p.method == INHERIT_ONLY else p.method, sum(table.values()) / len(table))
        kind, n = parse_budget(opts.budgets[p.task])
        runs += per * (n if kind == "epochs" else max(1, n // 50))
    teachers = sum(TEACHER_S[n] for n in opts.pairs)
    standins = sum(STANDIN_S[PAIRS[n].student] for n in opts.pairs)
    return {"runs": runs, "teachers": teachers, "standins": standins, "total": runs + teachers + standins}


# -- the stand-in for ImageNet ---------------------------------------------------------------------------------
def _body_features(body: Any, x: Any) -> Any:
    y = body(x)
    if isinstance(y, dict):
        y = list(y.values())[-1]
    elif isinstance(y, (list, tuple)):
        y = y[-1]
    return y


def crop_box(mask: Any, context: float = STANDIN_CONTEXT) -> tuple[int, int, int, int]:
    """A square (left, top, right, bottom) centred on the box of ``mask``'s pixels, ``context`` times its
    longer side plus 4 px (PIL pads what falls outside the image with black)."""
    import numpy as np

    rows, cols = np.nonzero(mask)
    cy, cx = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
    half = (max(rows.max() - rows.min(), cols.max() - cols.min()) + 1) * context / 2 + 2
    left, top = int(round(cx - half)), int(round(cy - half))
    side = int(round(2 * half))
    return left, top, left + side, top + side


def shapes_crops(rng: Any, n: int, size: int, mean: list[float], std: list[float]) -> tuple[Any, Any]:
    """``n`` object-centred crops of shapes images and their class (0..2), like ImageNet's object-centred
    photographs: each visible shape of a 128 px image, boxed around its visible pixels with
    :data:`STANDIN_CONTEXT` of context, resized to ``size`` (occluded shapes stay partly hidden)."""
    import numpy as np
    import torch
    from PIL import Image

    from ..data.shapes import _render

    render = IMAGE_SIZE
    xs: list[Any] = []
    ys: list[int] = []
    while len(xs) < n:
        rgb, inst, kept = _render(rng, render, min_area=max(16, render * render // 400))
        img = Image.fromarray(rgb)
        for k, cls in enumerate(kept):
            xs.append(np.asarray(img.crop(crop_box(inst == k + 1)).resize((size, size), Image.Resampling.BILINEAR)))
            ys.append(cls)
    x = torch.from_numpy(np.stack(xs[:n])).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s, torch.tensor(ys[:n])


def _recalibrate_bn(body: Any, x: Any, chunk: int = 64) -> None:
    """BatchNorm running statistics as a plain average over the pool: a few hundred steps leave them near
    their initial values (MobileNetV3's momentum is 0.01), and evaluating with them predicts one class."""
    import torch

    bns = [m for m in body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    body.train()
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            _body_features(body, x[i:i + chunk])
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
    body.eval()


def standin_backbone(student: str, steps: int = STANDIN_STEPS, size: int = STANDIN_SIZE, log: Any = print) -> Path:
    """The student's backbone body pretrained to classify object-centred crops of shapes (circle, square,
    triangle), made once and cached (``$KDCLI_HOME/standin-backbones/<student>-shapescrops-s<size>-n<steps>``
    ``.safetensors`` and its ``.json`` with the held-out accuracy). A pool of :data:`STANDIN_POOL` crops from
    generator seed 10⁶, which the shapes data sets (seed 0) never use, shuffled each pass; the held-out crops
    come from seed 10⁶ + 1."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from ..data.shapes import CLASSES
    from ..models import build_model
    from ..models.build import backbone_body
    from ..weights import kdcli_home
    from ..zoo import resolve_ref

    path = kdcli_home() / "standin-backbones" / f"{student}-shapescrops-s{size}-n{steps}.safetensors"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        log(f"stand-in backbone for {student} from cache {path}")
        return path
    spec = resolve_ref(student).spec
    mean, std = list(spec.preprocess["mean"]), list(spec.preprocess["std"])
    torch.manual_seed(0)
    body = backbone_body(build_model(spec).net)
    with torch.no_grad():
        channels = _body_features(body.eval(), torch.zeros(1, 3, size, size)).shape[1]
    head = torch.nn.Linear(channels, len(CLASSES))
    params = [*body.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=STANDIN_LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=STANDIN_LR, total_steps=max(1, steps), pct_start=0.1)
    log(f"pretraining the stand-in backbone of {student}: shapes crop classification, {steps} steps "
        f"of batch {STANDIN_BATCH} (cached in {path})")
    t0 = time.time()
    pool_x, pool_y = shapes_crops(np.random.default_rng(10**6), min(STANDIN_POOL, steps * STANDIN_BATCH), size,
                                  mean, std)
    order = torch.Generator().manual_seed(0)
    perm, cursor = torch.randperm(len(pool_x), generator=order), 0
    body.train()
    for _ in range(steps):
        if cursor + STANDIN_BATCH > len(pool_x):  # a new pass over the pool, reshuffled
            perm, cursor = torch.randperm(len(pool_x), generator=order), 0
        idx = perm[cursor:cursor + STANDIN_BATCH]
        cursor += STANDIN_BATCH
        logits = head(_body_features(body, pool_x[idx]).mean(dim=(2, 3)))
        loss = torch.nn.functional.cross_entropy(logits, pool_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    _recalibrate_bn(body, pool_x)
    with torch.no_grad():  # held-out crops: generator seeds after the training ones
        x, y = shapes_crops(np.random.default_rng(10**6 + 1), STANDIN_HELDOUT, size, mean, std)
        acc = float((head(_body_features(body, x).mean(dim=(2, 3))).argmax(dim=1) == y).float().mean())
    # what always answering the most frequent class scores on the same crops: the floor to beat
    majority = float(torch.bincount(y, minlength=len(CLASSES)).max()) / len(y)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in body.state_dict().items()}, str(path))
    meta.write_text(json.dumps({"student": student, "task": "shapes crop classification", "steps": steps,
                                "batch": STANDIN_BATCH, "size": size, "lr": STANDIN_LR,
                                "heldout_accuracy": round(acc, 4), "heldout_majority_accuracy": round(majority, 4),
                                "heldout_crops": len(y), "seconds": round(time.time() - t0, 1)}))
    log(f"stand-in backbone of {student}: held-out accuracy {acc:.3f} (most frequent class: {majority:.3f}; "
        f"{time.time() - t0:.0f}s)")
    if acc < majority + 0.2:
        log(f"warning: the stand-in backbone of {student} is barely above always answering the most frequent "
            f"class ({acc:.3f} vs {majority:.3f}): it is close to an untrained body, not a pretrained one")
    return path


def student_init(student: str, backbone: Path, seed: int, out: Path) -> Path:
    """Full student weights for one seed: the stand-in body, the neck and head initialised with ``seed``."""
    import torch
    from safetensors.torch import save_file

    from ..checkpoint_files import load_strict, read_state_dict
    from ..models import build_model
    from ..models.build import backbone_body
    from ..zoo import resolve_ref

    path = out / f"{backbone.stem}-seed{seed}.safetensors"
    if path.is_file():
        return path
    torch.manual_seed(seed)
    model = build_model(resolve_ref(student).spec)
    load_strict(backbone_body(model.net), read_state_dict(backbone), str(backbone))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.net.state_dict().items()}, str(path))
    return path


# -- the suite ---------------------------------------------------------------------------------------------------
def run_evidence(opts: EvidenceOptions, log: Any = print) -> SuiteResult:
    """Stand-ins, teachers, every run of :func:`plan`; writes the files of the module docstring."""
    from ..zoo import resolve_ref

    bad = [n for n in opts.pairs if n not in PAIRS]
    if bad or not opts.pairs:
        raise ConfigError(f"evidence suite: unknown pair {', '.join(bad)}; expected some of {', '.join(PAIRS)}")
    if opts.seeds < 0:
        raise ConfigError(f"evidence suite: seeds {opts.seeds}: expected 1 or more (0: each task's default)")
    est = estimate_s(opts)
    log(f"evidence suite: {len(plan(opts))} runs; expected {est['total'] / 60:.0f} min from an empty cache "
        f"(runs {est['runs'] / 60:.0f}, teachers {est['teachers'] / 60:.0f}, stand-ins {est['standins'] / 60:.0f}) "
        "on a 2-core CPU")
    t_start = time.time()
    load0 = _loadavg()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [replace(PAIRS[n], teacher_epochs=opts.teacher_epochs or PAIRS[n].teacher_epochs) for n in opts.pairs]
    # the demo's recipe, so that the teachers are the demo's cached ones
    tasks = {resolve_ref(p.student).spec.task for p in pairs}
    # the report's "seeds" line: the most any pair runs (each table's seeds column says its own)
    qopts = QualityOptions(pairs, data=opts.data, seeds=max(seeds_for(opts, t) for t in tasks), out=out,
                           max_train_images=opts.max_train_images,
                           max_val_images=opts.max_val_images, device=opts.device, workers=opts.workers,
                           isolate=opts.isolate, jobs=opts.jobs, command=opts.command,
                           budget=",".join(f"{k} {v}" for k, v in opts.budgets.items()))
    res = SuiteResult()
    teachers: dict[str, tuple[str, dict[str, Any]]] = {}
    plans: dict[str, tuple[str, list[str], Budget]] = {}
    runs = plan(opts)
    for pair in pairs:
        task = resolve_ref(pair.student).spec.task
        backbone = standin_backbone(pair.student, opts.standin_steps, log=log)
        teachers[pair.name] = prepare_teacher(pair, task, qopts, log)
        budget = plan_budget(opts.budgets[task], train_size(pair, task, qopts), qopts.batch_size)
        names = method_list(task, opts.methods)
        plans[pair.name] = (task, names, budget)
        log(f"[{pair.name}] {len(names) - 1} methods + baseline x {seeds_for(opts, task)} seeds, budget {budget.text}")
        for p in (r for r in runs if r.pair == pair.name):
            res.runs.append(train_planned(p, pair, backbone, teachers[pair.name][0], budget, qopts, opts, log))
    res.wall_s = round(time.time() - t_start, 1)
    res.rows = aggregate(res.runs, {p: t[1] for p, t in teachers.items()}, plans)
    res.contrasts = [c for name, (_t, names, _b) in plans.items()
                     for c in contrasts(res.runs, {name: plans[name]}, evidence_contrasts(names))]
    correct(res.rows, res.contrasts)
    res.files = [write_csv(out / "evidence_runs.csv", res.runs, RUN_COLUMNS),
                 write_csv(out / "evidence.csv", res.rows, list(QUALITY_COLUMNS)),
                 write_csv(out / "evidence_contrasts.csv", res.contrasts, list(CONTRAST_COLUMNS))]
    md = out / "evidence.md"
    body = markdown(qopts, res, teachers, plans, {}, (load0, _loadavg()))
    md.write_text(header(opts, est) + body.split("\n", 1)[1])
    res.files.append(md)
    return res


def train_planned(p: RunPlan, pair: Pair, backbone: Path, teacher: str, budget: Budget, qopts: QualityOptions,
                  opts: EvidenceOptions, log: Any) -> dict[str, Any]:
    """Train (or reuse) one planned run in ``OUT/runs/<pair>/<label>/seed<k>`` and return its CSV row."""
    from ..methods import get

    out = Path(opts.out)
    folder = out / "runs" / pair.name / p.name / f"seed{p.seed}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    init = student_init(pair.student, backbone, p.seed, out / "inits")
    # the inherit-only control reads the teacher's neck and head; self-distillation (PS-KD) has no teacher
    uses_teacher = p.method == INHERIT_ONLY or (p.method != BASELINE and get(p.method).needs_teacher)
    cfg = RunConfig(model=pair.student, teacher=teacher if uses_teacher else None,
                    method=None if p.method in (BASELINE, INHERIT_ONLY) else p.method, set=dict(p.set),
                    inherit=p.inherit,
                    out=str(folder), seed=p.seed, epochs=budget.epochs,
                    max_train_images=budget.max_train_images or opts.max_train_images, eval_every=0,
                    skip_teacher_check=True, student_weights=str(init), **recipe(p.task, qopts))
    t0 = time.time()
    try:
        rec = run_one(cfg, opts.isolate, log, opts.jobs)
    except Exception as err:  # noqa: BLE001 - a broken run is reported; the others go on
        rec = {"config": cfg.to_dict(), "status": f"failed: {type(err).__name__}: {err}"}
    row = _run_row(pair, p.task, p.name, p.seed, budget, rec)
    row["init"] = f"stand-in {backbone.stem}" + (" + inherit" if p.inherit else "")
    row["image_size"] = IMAGE_SIZE
    row["taps"] = p.set.get("taps", "preset")
    a = METRICS[p.task][0]
    log(f"[{pair.name}] seed {p.seed} {p.name}: "
        + (f"{a} {row[a]:.4f}" if row["status"] == "ok" else row["status"]) + f" ({time.time() - t0:.0f}s)")
    return row


RUN_COLUMNS = ["pair", "task", "teacher", "student", "method", "seed", "status", "mAP", "AP50", "run_s", "train_s",
               "peak_mem_mb", "mem_kind", "loss_ratio", "epochs", "steps", "mIoU", "pixel_acc", "init", "image_size",
               "taps"]


def header(opts: EvidenceOptions, est: dict[str, float]) -> str:
    return "\n".join([
        "# Evidence suite (`kdcli bench quality --suite evidence`)", "",
        f"- students start from a stand-in pretrained backbone (shapes crop classification, "
        f"{opts.standin_steps} steps; no ImageNet weights here), neck/head initialised per seed",
        f"- inputs {IMAGE_SIZE} px; detection methods distil {TAPS['detection']} (P3–P5: 16×16, 8×8, 4×4); "
        "segmentation methods their presets' taps (8×8 or finer)",
        f"- `--inherit` for {', '.join(sorted(INHERIT['detection']))} on detection (their official configs)",
        f"- seeds: {', '.join(f'{t} 0–{seeds_for(opts, t) - 1}' for t in opts.budgets)}, paired across methods",
        f"- budgets: {', '.join(f'{k} {v}' for k, v in opts.budgets.items())}; expected "
        f"{est['total'] / 60:.0f} min from an empty cache on a 2-core CPU",
        "",
    ])
