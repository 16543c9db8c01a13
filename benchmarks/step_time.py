"""Time one distillation step per method against the floor (teacher inference + plain student step).

    python benchmarks/step_time.py --teacher shapes-r34-fcos --student shapes-r18-fcos --size 128

Models are built untrained (timing does not depend on the weights); the batch is random.
Prints a Markdown table: method, seconds per step (median), ratio to the floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def time_step(student, teacher, method, batch, steps: int, amp: str) -> float:
    params = list(student.parameters()) + (list(method.parameters()) if method is not None else [])
    opt = torch.optim.SGD(params, lr=1e-4)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with ctx:
            out = student(batch)
            loss = sum(out.losses.values())
            with torch.no_grad():
                t_out = teacher(batch, need=set(method.needs) if method is not None else set(), losses=False)
            if method is not None:
                loss = loss + sum(method(out, t_out, batch.targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # warm-up steps are not counted
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="shapes-r34-fcos")
    ap.add_argument("--student", default="shapes-r18-fcos")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    ap.add_argument("--methods", default="all")
    args = ap.parse_args()
    torch.manual_seed(0)
    student = build_model(get_spec(args.student)).train()
    teacher = build_model(get_spec(args.teacher)).eval().requires_grad_(False)
    batch = _batch(student, args.batch, args.size)
    floor = time_step(student, teacher, None, batch, args.steps, args.amp)
    names = list(available()) if args.methods == "all" else args.methods.split(",")
    print(f"| method | s/step | vs floor |\n|---|---:|---:|\n| floor | {floor:.3f} | 1.00 |")
    for name in names:
        cls = available()[name]
        if student.task not in cls.tasks or not cls.needs_teacher:
            continue
        method = build(name, student.tap_info, teacher.tap_info, student.task)
        t = time_step(student, teacher, method, batch, args.steps, args.amp)
        print(f"| {name} | {t:.3f} | {t / floor:.2f} |")


if __name__ == "__main__":
    main()
