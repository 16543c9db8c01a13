"""Time one distillation step per method against the floor (teacher inference + plain student step).

    python benchmarks/step_time.py --teacher shapes-r34-fcos --student shapes-r18-fcos --size 128

Models are built untrained (timing does not depend on the weights); the batch is random.

Two modes:

- ``--mode interleave`` (default): for each method, floor steps and method steps alternate in the
  order A B B A A B ... (``--steps`` pairs after two warm-up pairs), so that the two steps of a
  pair see the same machine load; "vs floor" is the median over the pairs of method / floor, and
  its 25th–75th percentiles show how noisy the machine was. Use this on a shared machine.
- ``--mode sequential``: the floor is timed once, then each method in turn (the first version of
  this script); only meaningful on an idle machine.

``--clock cpu`` times each step with the process's CPU time (``time.process_time``: all its threads)
instead of the wall clock. On a machine shared with other jobs the wall clock also counts the time
the process waited for a core; the CPU time does not, so with ``--threads 1`` it measures the work of
a step and is far steadier under contention (it still feels shared caches and memory bandwidth).

Prints a Markdown table. ``--threads`` sets ``torch.set_num_threads`` (0 = leave PyTorch's default).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from kdcli.methods import available, build
from kdcli.models import build_model
from kdcli.zoo import get_spec


def _batch(student, n: int, size: int):
    images = [torch.rand(3, size, size) for _ in range(n)]
    if student.task == "detection":
        targets = [{"boxes": torch.tensor([[8.0, 8.0, size / 2, size / 2]]), "labels": torch.tensor([1])}
                   for _ in range(n)]
        return student.preprocess(images, targets)
    return student.preprocess(torch.stack(images), torch.zeros(n, size, size, dtype=torch.long))


class Stepper:
    """One training step (student forward/backward/SGD step, teacher under no_grad, optional method)."""

    def __init__(self, student, teacher, method, batch, amp: str, clock: str = "wall") -> None:
        self.student, self.teacher, self.method, self.batch, self.amp = student, teacher, method, batch, amp
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        params = list(student.parameters()) + (list(method.parameters()) if method is not None else [])
        self.opt = torch.optim.SGD(params, lr=1e-4)
        self.need = set(method.needs) if method is not None else set()

    def __call__(self) -> float:
        ctx: Any = (torch.autocast("cpu", dtype=torch.bfloat16) if self.amp == "bf16"
                    else torch.autocast("cpu", enabled=False))
        t0 = self.clock()
        with ctx:
            out = self.student(self.batch)
            loss = sum(out.losses.values())
            with torch.no_grad():
                t_out = self.teacher(self.batch, need=self.need, losses=False)
            if self.method is not None:
                loss = loss + sum(self.method(out, t_out, self.batch.targets).values())
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return self.clock() - t0


def time_step(student, teacher, method, batch, steps: int, amp: str, clock: str = "wall") -> float:
    """Median seconds per step of ``steps`` steps after 2 warm-up steps (sequential mode)."""
    step = Stepper(student, teacher, method, batch, amp, clock)
    for _ in range(2):
        step()
    return statistics.median(step() for _ in range(steps))


def interleaved(floor: Stepper, step: Stepper, pairs: int) -> dict[str, float]:
    """Alternate floor and method steps (A B B A ...); medians and the spread of the per-pair ratios."""
    for _ in range(2):
        floor(), step()
    tf, tm = [], []
    for i in range(pairs):
        if i % 2:
            m, f = step(), floor()
        else:
            f, m = floor(), step()
        tf.append(f)
        tm.append(m)
    # each method step is compared with the floor step next to it (same machine load), then the median
    ratios = sorted(m / f for m, f in zip(tm, tf, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"floor": statistics.median(tf), "method": statistics.median(tm),
            "ratio": statistics.median(ratios), "q25": q[0], "q75": q[2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="shapes-r34-fcos")
    ap.add_argument("--student", default="shapes-r18-fcos")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15, help="timed steps (interleave: floor/method pairs)")
    ap.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    ap.add_argument("--methods", default="all")
    ap.add_argument("--mode", default="interleave", choices=["interleave", "sequential"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student = build_model(get_spec(args.student)).train()
    teacher = build_model(get_spec(args.teacher)).eval().requires_grad_(False)
    batch = _batch(student, args.batch, args.size)
    names = list(available()) if args.methods == "all" else args.methods.split(",")
    methods = {}
    for name in names:
        cls = available()[name]
        if student.task in cls.tasks and cls.needs_teacher and student.task in cls.presets:
            methods[name] = build(name, student.tap_info, teacher.tap_info, student.task)
    if args.mode == "sequential":
        floor = time_step(student, teacher, None, batch, args.steps, args.amp, args.clock)
        print(f"| method | s/step | vs floor |\n|---|---:|---:|\n| floor | {floor:.3f} | 1.00 |")
        for name, method in methods.items():
            t = time_step(student, teacher, method, batch, args.steps, args.amp, args.clock)
            print(f"| {name} | {t:.3f} | {t / floor:.2f} |")
        return
    floor_step = Stepper(student, teacher, None, batch, args.amp, args.clock)
    print("| method | floor s/step | method s/step | vs floor (median of pairs) | q25–q75 |")
    print("|---|---:|---:|---:|---:|")
    for name, method in methods.items():
        try:
            r = interleaved(floor_step, Stepper(student, teacher, method, batch, args.amp, args.clock), args.steps)
        except Exception as err:  # one broken method must not hide the others' numbers
            print(f"| {name} | – | – | – | failed: {type(err).__name__}: {err} |", flush=True)
            continue
        print(f"| {name} | {r['floor']:.3f} | {r['method']:.3f} | {r['ratio']:.2f} | {r['q25']:.2f}–{r['q75']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
