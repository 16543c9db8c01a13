"""Time one distillation step (teacher + student + method, forward + backward + optimizer) per speed feature.

    python benchmarks/speed_features.py --student shapes-r18-fcos --teacher shapes-r34-fcos --method cankd \\
        --size 128 --batch 8 --rounds 5 --features fp32,bf16,fp16,channels_last,channels_last+bf16,accumulate2,compile

Each feature gets its own copy of the models (same initial weights) and the same batch of random
images with boxes. Measurements are interleaved — round r times one step of every feature in turn —
so that load from other processes on a shared machine spreads over all features alike; the table
reports the median over rounds (after ``--warmup`` untimed steps) and the median of the per-round
ratios to fp32 (robust to load that drifts between rounds). ``accumulate2``
makes the same effective batch from two micro-batches of half the size. ``compile`` also reports the
time of its first (compiling) step. ``loss vs fp32`` is the relative difference of the first step's
total loss: what autocast changes in the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch

from kdcli.engine.build import compile_student
from kdcli.engine.step import DistillStep
from kdcli.methods import build
from kdcli.models import build_model
from kdcli.runtime import autocast_ctx
from kdcli.zoo import get_spec

FEATURES: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "channels_last": {"channels_last": True},
    "channels_last+bf16": {"channels_last": True, "amp": "bf16"},
    "accumulate2": {"accumulate": 2},
    "compile": {"compile": True},
}


def _images(student: Any, n: int, size: int, seed: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    if student.task == "detection":
        targets = [{"boxes": torch.tensor([[8.0, 8.0, size / 2, size / 2], [size / 3, size / 4, size - 4, size - 8]]),
                    "labels": torch.tensor([1, 2])} for _ in range(n)]
        return images, targets
    return torch.stack(images), torch.randint(0, 3, (n, size, size), generator=g)


class Setup:
    """Models, optimizer and batches of one feature."""

    def __init__(self, args: argparse.Namespace, opts: dict[str, Any]) -> None:
        self.amp = opts.get("amp", "none")
        self.k = int(opts.get("accumulate", 1))
        self.channels_last = bool(opts.get("channels_last", False))
        torch.manual_seed(0)
        self.student = build_model(get_spec(args.student)).train()
        self.teacher = build_model(get_spec(args.teacher)).eval().requires_grad_(False)
        self.method = build(args.method, self.student.tap_info, self.teacher.tap_info, self.student.task)
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        if opts.get("compile"):
            compile_student(self.student)
        self.step_module = DistillStep(self.student, self.method)
        params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=1e-5, momentum=0.9)
        self.scaler = torch.amp.GradScaler("cpu", enabled=self.amp == "fp16")
        per = args.batch // self.k
        images, targets = _images(self.student, args.batch, args.size, seed=0)  # the same images for all
        self.batches = []
        for i in range(self.k):
            part = slice(i * per, (i + 1) * per)
            b = self.student.preprocess(images[part], targets[part])
            if self.channels_last:
                b.images = b.images.contiguous(memory_format=torch.channels_last)
            self.batches.append(b)

    def step(self) -> float:
        """One optimizer step; returns the total loss (summed over micro-batches, as a float)."""
        dev = torch.device("cpu")
        total_value = 0.0
        for b in self.batches:
            ctx = autocast_ctx(dev, self.amp) if self.amp != "none" else nullcontext()
            with ctx:
                with torch.no_grad():
                    t_out = self.teacher(b, need=set(self.method.needs), losses=False)
                task, distill = self.step_module(b, t_out)
            total = sum(v.float() for v in [*task.values(), *distill.values()]) / self.k
            self.scaler.scale(total).backward()
            total_value += float(total.detach())
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return total_value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="shapes-r18-fcos")
    ap.add_argument("--teacher", default="shapes-r34-fcos")
    ap.add_argument("--method", default="cankd")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--features", default=",".join(FEATURES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.features.split(",") if n.strip()]
    setups = {n: Setup(args, FEATURES[n]) for n in names}
    first_loss: dict[str, float] = {}
    first_time: dict[str, float] = {}
    for n, s in setups.items():  # warm-up (and compilation), also untimed for the median
        t0 = time.perf_counter()
        first_loss[n] = s.step()
        first_time[n] = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            s.step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n, s in setups.items():
            t0 = time.perf_counter()
            s.step()
            times[n].append(time.perf_counter() - t0)
    # per-round ratios: the load of a shared machine drifts between rounds more than within one
    base = times.get("fp32")
    print(f"{args.student} ← {args.teacher} ({args.method}), {args.size} px, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds\n")
    print("| feature | s/step | vs fp32 | loss vs fp32 | first step s |\n|---|---:|---:|---:|---:|")
    for n in names:
        med = statistics.median(times[n])
        ratio = f"{statistics.median(t / b for t, b in zip(times[n], base, strict=True)):.2f}" if base else "—"
        dl = f"{abs(first_loss[n] - first_loss['fp32']) / abs(first_loss['fp32']):.1e}" if "fp32" in first_loss \
            else "—"
        print(f"| {n} | {med:.3f} | {ratio} | {dl} | {first_time[n]:.1f} |")


if __name__ == "__main__":
    main()
