"""``kdcli bench speed``: the cost of each method's training step against the floor.

The floor is what any distillation step pays: the frozen teacher's inference (under ``torch.no_grad()``, not
``torch.inference_mode()``, whose tensors cannot be saved for backward: every feature loss saves the teacher's
maps for its gradient) plus a plain training step of the student (forward, task losses, backward, SGD step).
A method's step adds its own forward, its learnable parts and their backward. Per method:

- time: floor steps (A) and method steps (B) alternate A B B A A B … for ``--steps`` pairs after
  ``--warmup`` (default 2) untimed pairs, so both see the same machine load; the ratio is median(B) / median(A),
  with the 25th–75th percentile of the per-pair ratios as the noise. ``--clock cpu`` times with the process's CPU time
  (``time.process_time``), steadier than the wall clock on a machine shared with other jobs (use it with
  ``--threads 1``); CUDA is timed on the wall clock with ``torch.cuda.synchronize``.
- memory: the peak memory of two training steps (``SpeedOptions.memory_steps``, after one unmeasured step)
  over the memory held just before them; the ratio is the method's over the floor's. CUDA:
  ``torch.cuda.max_memory_allocated`` (reset before each measurement). CPU: tensors are invisible to
  ``tracemalloc`` and an RSS rise depends on how the allocator caches pages, so the tensor allocations
  and frees recorded by ``torch.profiler``
  (``profile_memory=True``) are summed in time order (:func:`kdcli.bench._proc.tensor_peak_mb`): tensor
  memory only, like CUDA's figure.

``--channels-last`` puts models, methods and inputs in NHWC for floor and method alike (as training with
``--channels-last`` does). ``--compile`` applies ``torch.compile`` to the student's and the teacher's
backbone, neck and head (:func:`kdcli.engine.build.compile_student`) for floor and method alike; the methods'
own modules stay eager, as in training with ``--compile``. Keep ``--warmup`` ≥ 1 with it: the first steps
compile.

Models are built untrained (speed does not depend on the weights: no download) and fed one random batch
(one box per image, or an all-background mask) of ``--size`` (``H`` or ``HxW``, e.g. ``800x1333``): a
detector's resize is set to that size (its zoo ``min_size``/``max_size`` would otherwise resize every input
to 800 px), then its transform pads to a multiple of 32 as in training; the table gives the input the
models saw. Noise: when the q25–q75 spread of the pair ratios is wider than the gap it measures
(|ratio − 1|), or the ratio is below the floor (a method step does strictly more work), the row is flagged
and a warning says to take more steps. Self-KD methods (no teacher model) and teacher-training objectives are
not timed. Devices: ``--device all`` (default) times the CPU and, when available, CUDA.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError


@dataclass
class SpeedOptions:
    teacher: str = "shapes-r34-fcos"
    student: str = "shapes-r18-fcos"
    size: int | str | tuple[int, int] = 128  # H (square) or "HxW" / (H, W): parse_size
    batch: int = 8
    steps: int = 10
    warmup: int = 2  # untimed pairs before the timed ones (1 is enough for the long steps of real sizes on a CPU)
    channels_last: bool = False  # NHWC models and inputs, for floor and methods alike (as --channels-last trains)
    compile: bool = False  # torch.compile the student's and teacher's parts (as --compile compiles the student's)
    amp: str = "auto"  # bf16 where the hardware has native bf16 (kdcli/runtime.py)
    methods: str = "all"
    device: str = "all"  # all | cpu | cuda
    clock: str = "wall"  # wall | cpu
    threads: int = 0
    memory: bool = True
    memory_steps: int = 2
    sets: dict[str, str] = field(default_factory=dict)  # method options: method.key=value (key=value: one method)
    out: Path | None = None
    command: str = ""


@dataclass
class SpeedResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def parse_size(size: int | str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``--size``: ``800`` → (800, 800); ``800x1333`` (or ``800X1333``, ``800,1333``) → (800, 1333)."""
    if isinstance(size, (tuple, list)):
        parts = [str(v) for v in size]
    else:
        parts = str(size).strip().lower().replace(",", "x").split("x")
    try:
        hw = [int(v) for v in parts]
    except ValueError:
        hw = []
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 32:
        raise ConfigError(f"--size {size}: expected a side or HxW (e.g. 800x1333), each >= 32")
    return hw[0], hw[1]


def size_text(size: int | str | tuple[int, int]) -> str:
    h, w = parse_size(size)
    return f"{h}x{w}"


def fixed_size_spec(spec: Any, size: tuple[int, int]) -> Any:
    """The spec with a detector's resize set to ``size`` (H, W): the transform's scale is then exactly 1."""
    if spec.task != "detection":  # segmentation models take the input as it is
        return spec
    pp = {**spec.preprocess, "min_size": min(size), "max_size": max(size)}
    return replace(spec, preprocess=pp)


def make_batch(student: Any, n: int, size: int | str | tuple[int, int], device: Any) -> Any:
    """A preprocessed random batch of H×W images: one box per image (detection) or an all-background mask."""
    import torch

    h, w = parse_size(size)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for _ in range(n)]
    if student.task == "detection":
        targets = [{"boxes": torch.tensor([[8.0, 8.0, w / 2, h / 2]]), "labels": torch.tensor([1])}
                   for _ in range(n)]
        batch = student.preprocess(images, targets)
    else:
        batch = student.preprocess(torch.stack(images), torch.zeros(n, h, w, dtype=torch.long))
    return batch.to(device)


class Stepper:
    """One training step: teacher under no_grad, student forward + task losses, optional method, SGD step."""

    def __init__(self, student: Any, teacher: Any, method: Any, batch: Any, amp: str, clock: str = "wall") -> None:
        import torch

        self.student, self.teacher, self.method, self.batch, self.amp = student, teacher, method, batch, amp
        self.device = batch.images.device
        self.cuda = self.device.type == "cuda"
        self.clock = time.process_time if clock == "cpu" and not self.cuda else time.perf_counter
        params = list(student.parameters()) + (list(method.parameters()) if method is not None else [])
        self.opt = torch.optim.SGD(params, lr=1e-4)
        self.need = set(method.needs) if method is not None else set()

    def __call__(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = self.clock()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            with torch.no_grad():
                t_out = self.teacher(self.batch, need=self.need, losses=False)
            out = self.student(self.batch)
            loss = sum(out.losses.values())
            if self.method is not None:
                loss = loss + sum(self.method(out, t_out, self.batch.targets).values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return self.clock() - t0


def interleaved(floor: Stepper, step: Stepper, pairs: int, warmup: int = 2) -> dict[str, float]:
    """Alternate floor (A) and method (B) steps A B B A A B … after ``warmup`` untimed pairs; medians and the
    spread of per-pair ratios."""
    for _ in range(warmup):
        floor()
        step()
    tf: list[float] = []
    tm: list[float] = []
    for i in range(pairs):
        if i % 2:
            m, f = step(), floor()
        else:
            f, m = floor(), step()
        tf.append(f)
        tm.append(m)
    ratios = sorted(m / f for m, f in zip(tm, tf, strict=True) if f > 0)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"floor_s": statistics.median(tf), "method_s": statistics.median(tm),
            "ratio": statistics.median(tm) / statistics.median(tf), "q25": q[0], "q75": q[2]}


BELOW_FLOOR = 0.95  # a method step does the floor's work and more: a ratio under this is noise


def noise_warning(row: dict[str, Any]) -> str | None:
    """Why a row's ratio cannot be trusted, or None: its q25–q75 spread is wider than the gap it measures
    (|ratio − 1|), or the ratio is clearly below the floor."""
    ratio, q25, q75 = row["ratio"], row["q25"], row["q75"]
    spread, gap = q75 - q25, abs(ratio - 1.0)
    if spread > gap:
        why = f"pair ratios q25–q75 {q25:.2f}–{q75:.2f} (spread {spread:.2f}) are wider than the gap {gap:.2f}"
    elif ratio < BELOW_FLOOR:
        why = f"x{ratio:.2f} is below the floor, which every method step contains"
    else:
        return None
    return (f"{row['method']} on {row['device']}: {why}; the ratio is noise at this step count "
            "(more --steps; on CPU --clock cpu --threads 1)")


def speed_methods(task: str, methods: str = "all") -> list[str]:
    """Methods timed for ``task``: those that distil from a teacher model (module docstring)."""
    from ..methods import available, get

    registry = available()
    names = list(registry) if methods.strip() == "all" else [n.strip() for n in methods.split(",") if n.strip()]
    out = []
    for n in names:
        cls = get(n)
        if cls.needs_teacher and task in cls.tasks and task in cls.presets:
            out.append(n)
    if not out:
        raise ConfigError(f"--methods {methods}: no method with a teacher supports {task}")
    return out


def build_models(opts: SpeedOptions, device: Any) -> tuple[Any, Any]:
    import torch

    from ..models import build_model
    from ..zoo import resolve_ref

    torch.manual_seed(0)
    s_spec, t_spec = resolve_ref(opts.student).spec, resolve_ref(opts.teacher).spec
    if s_spec.task != t_spec.task:
        raise ConfigError(f"--teacher {opts.teacher} and --student {opts.student}: different tasks")
    hw = parse_size(opts.size)  # random weights, and the input at the size asked for (module docstring)
    s_spec, t_spec = fixed_size_spec(s_spec, hw), fixed_size_spec(t_spec, hw)
    student = build_model(s_spec).to(device).train()
    teacher = build_model(t_spec).to(device).eval().requires_grad_(False)
    if opts.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    if opts.compile:
        from ..engine.build import compile_student

        # the teacher too: the floor is the best the hardware does (the methods' own modules stay eager, as
        # in training); the warm-up pairs absorb the compilation
        compile_student(student)
        compile_student(teacher)
    return student, teacher


# -- memory ------------------------------------------------------------------------------------------
def step_memory(opts: SpeedOptions, method_name: str | None, device: Any,
                models: tuple[Any, Any] | None = None, overrides: dict[str, str] | None = None) -> float:
    """Peak MB of ``opts.memory_steps`` training steps above the memory held before them.

    One unmeasured step first (lazy state, kernel caches), then its gradients are dropped so that the measured
    steps allocate theirs (the peak includes the gradients). CUDA: ``max_memory_allocated``;
    CPU: the tensor allocations recorded by ``torch.profiler`` (:func:`kdcli.bench._proc.tensor_peak_mb`)."""
    import torch

    from ..methods import build
    from ._proc import tensor_peak_mb

    student, teacher = models or build_models(opts, device)
    method = None
    if method_name:
        method = build(method_name, student.tap_info, teacher.tap_info, student.task, overrides).to(device)
        if opts.channels_last:
            method.to(memory_format=torch.channels_last)
    batch = make_batch(student, opts.batch, opts.size, device)
    if opts.channels_last:
        batch.images = batch.images.contiguous(memory_format=torch.channels_last)
    step = Stepper(student, teacher, method, batch, opts.amp)
    step()
    # no gradient left from the warm-up: the measured steps allocate (and free) every tensor they use, so
    # the profiler sees both ends of each (a tensor made before it starts is freed unseen)
    step.opt.zero_grad(set_to_none=True)
    gc.collect()

    def steps() -> None:
        for _ in range(opts.memory_steps):
            step()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        steps()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return tensor_peak_mb(steps)


# -- the benchmark ---------------------------------------------------------------------------------------
def devices(name: str) -> list[Any]:
    import torch

    if name == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if name == "cpu":
        return [torch.device("cpu")]
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available here")
        return [torch.device(name)]
    raise ConfigError(f"--device {name}: expected all, cpu or cuda")


def method_overrides(names: list[str], sets: dict[str, str]) -> dict[str, dict[str, str]]:
    """``--set samkd.generator_precision=float32`` → {"samkd": {...}}; an unprefixed key needs one method."""
    from ..methods import available, split_overrides

    for key in sets:
        head, dot, _ = key.partition(".")
        if dot and head in available() and head not in names:
            raise ConfigError(f"--set {key}: method '{head}' is not timed here (timed: {', '.join(names)})")
    return split_overrides(names, sets)


def run_speed(opts: SpeedOptions, log: Any = print) -> SpeedResult:
    """Time (and measure the memory of) every method's step against the floor on each device."""
    import torch

    from ..methods import build
    from ..runtime import flush_denormals, resolve_amp

    hw = parse_size(opts.size)
    if opts.steps < 1 or opts.batch < 1 or opts.warmup < 0:
        raise ConfigError("--steps and --batch must be >= 1, --warmup >= 0")
    if opts.amp not in ("none", "bf16", "auto") or opts.clock not in ("wall", "cpu"):
        raise ConfigError(f"--amp {opts.amp} / --clock {opts.clock}: expected none|bf16|auto and wall|cpu")
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    res = SpeedResult()
    all_opts = opts
    for dev in devices(all_opts.device):
        # auto: bf16 only where the hardware has native bf16 kernels (kdcli/runtime.py); this bench has no fp16
        amp, warning = resolve_amp(all_opts.amp, dev)
        flush_denormals(dev)  # as the trainer does (kdcli/runtime.py)
        opts = replace(all_opts, amp=amp if amp == "bf16" else "none")
        if warning:
            log(f"warning: {warning}")
        student, teacher = build_models(opts, dev)
        names = speed_methods(student.task, opts.methods)
        per = method_overrides(names, opts.sets)
        batch = make_batch(student, opts.batch, opts.size, dev)
        if opts.channels_last:
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
        shape = f"{batch.images.shape[-2]}x{batch.images.shape[-1]}"
        if shape != f"{hw[0]}x{hw[1]}":
            log(f"[{dev.type}] input {shape}: --size {hw[0]}x{hw[1]} padded by the model's transform")
        floor = Stepper(student, teacher, None, batch, opts.amp, opts.clock)
        try:  # e.g. DeepLabV3's image-pooling BatchNorm cannot train on one image
            floor()
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"--batch {opts.batch} --size {size_text(opts.size)}: the plain step of "
                              f"{opts.student} fails ({str(err).splitlines()[0]})") from None
        floor_mem = step_memory(opts, None, dev, (student, teacher)) if opts.memory else math.nan
        log(f"[{dev.type}] floor step memory {floor_mem:.0f} MB; timing {len(names)} methods")
        for name in names:
            row: dict[str, Any] = {"device": dev.type, "method": name, "amp": opts.amp,
                                   "teacher": opts.teacher, "student": opts.student, "size": shape}
            try:
                method = build(name, student.tap_info, teacher.tap_info, student.task, per[name]).to(dev)
                if opts.channels_last:
                    method.to(memory_format=torch.channels_last)
                row.update(interleaved(floor, Stepper(student, teacher, method, batch, opts.amp, opts.clock),
                                       opts.steps, opts.warmup))
                if opts.memory:
                    mem = step_memory(opts, name, dev, (student, teacher), per[name])
                    row.update(floor_mem_mb=floor_mem, method_mem_mb=mem,
                               mem_ratio=mem / floor_mem if floor_mem > 0 else math.nan)
                row["status"] = "ok"
                warning = noise_warning(row)
                row["noisy"] = warning is not None
                if warning:
                    log(f"warning: {warning}")
            except Exception as err:  # noqa: BLE001 - report the method, time the others
                row["status"] = f"failed: {type(err).__name__}: {err}"
            res.rows.append(row)
            log(f"[{dev.type}] {name}: " + (f"x{row['ratio']:.2f} time" if "ratio" in row else row["status"])
                + (f", x{row['mem_ratio']:.2f} memory" if "mem_ratio" in row else ""))
        del student, teacher, floor
    if opts.out:
        res.files = write_outputs(Path(opts.out), opts, res)
    return res


# the first twelve as in earlier versions (results stay comparable); the pair and the input size after them
COLUMNS = ["device", "method", "amp", "floor_s", "method_s", "ratio", "q25", "q75", "floor_mem_mb", "method_mem_mb",
           "mem_ratio", "status", "teacher", "student", "size", "noisy"]


def precision(amp: str) -> str:
    return "bf16 autocast" if amp == "bf16" else "float32"



def markdown(opts: SpeedOptions, rows: list[dict[str, Any]]) -> str:
    from ..engine.record import versions
    from .quality_report import machine

    v = versions()
    lines = ["# Step time and memory per method (`kdcli bench speed`)", ""]
    if opts.command:
        lines += ["```", opts.command, "```", ""]
    lines += [f"- versions: kdcli {v['kdcli']}, torch {v['torch']}, torchvision {v['torchvision']}",
              f"- machine: {machine()}",
              f"- pair {opts.teacher} → {opts.student} (random weights), batch {opts.batch}, --size "
              f"{size_text(opts.size)} (input after the model's padding: the table), amp {opts.amp} "
              f"(precision per device: the table), {opts.steps} interleaved pairs after {opts.warmup} warm-up "
              f"pairs, clock {opts.clock}, threads {opts.threads or 'default'}, "
              f"{'channels-last' if opts.channels_last else 'contiguous (NCHW)'}, "
              f"torch.compile {'on (student and teacher)' if opts.compile else 'off'}",
              "- floor = teacher inference + plain student step; ratio = median(method) / median(floor); "
              "memory = tensor memory of the steps above what was held before them (CPU: torch.profiler "
              "memory events; CUDA: max allocated)", "",
              "| pair | input | device | precision | method | floor s | method s | time × floor "
              "| pair ratios q25–q75 | memory × floor |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    pair = f"{opts.teacher} → {opts.student}"
    noisy = False
    for r in rows:
        head = f"| {pair} | {r.get('size', '')} | {r['device']} | {precision(r.get('amp', ''))} | {r['method']} |"
        if r.get("status") != "ok":
            lines.append(f"{head} | | {r.get('status')} | | |")
            continue
        mem = f"{r['mem_ratio']:.2f}" if not math.isnan(r.get("mem_ratio", math.nan)) else ""
        flag = " ⚠" if r.get("noisy") else ""
        noisy = noisy or bool(flag)
        lines.append(f"{head} {r['floor_s']:.3f} | {r['method_s']:.3f} | {r['ratio']:.2f}{flag} | "
                     f"{r['q25']:.2f}–{r['q75']:.2f} | {mem} |")
    if noisy:
        lines += ["", "⚠ the q25–q75 spread of the pair ratios is wider than the gap to the floor (or the ratio is "
                  "below the floor): noise, not a measurement; take more --steps."]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, opts: SpeedOptions, res: SpeedResult) -> list[Path]:
    from .quality_report import write_csv

    out.mkdir(parents=True, exist_ok=True)
    md = out / "speed.md"
    md.write_text(markdown(opts, res.rows))
    return [write_csv(out / "speed.csv", res.rows, list(COLUMNS)), md]
