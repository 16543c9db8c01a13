"""Does data loading keep up with training? Images/s of the loader alone versus a training step.

    python benchmarks/loader.py --task segmentation --workers 0 2 --batches 20
    python benchmarks/loader.py --task detection --data coco:/data/coco --workers 8 --device cuda

Three numbers per worker count, on the training split of ``--data`` (default: the embedded shapes
set) with the training transforms, through the same ``build_run`` as ``kdcli train``:

- ``loader``: iterating the DataLoader alone (decode + augment in worker processes, collate,
  pinned memory when on GPU), after the first batch (worker start-up) is discarded;
- ``step``: forward + backward + optimizer step on batches already in memory (no loading);
- ``loop``: the two together, as training runs them.

The loader keeps up when ``loader`` >= ``step`` and ``loop`` ~= ``step``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from kdcli.config import RunConfig
from kdcli.engine.trainer import _to_device, build_run, train_step

MODELS = {"detection": "shapes-r18-fcos", "segmentation": "shapes-mbv3-lraspp"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(loader, batches: int, device: torch.device) -> float:
    it = iter(loader)
    next(it)  # worker start-up and the first decode are not throughput
    n, t0 = 0, time.perf_counter()
    for images, targets in itertools.islice(it, batches):
        images, targets = _to_device(images, targets, device)  # the host->device copy belongs to loading
        n += len(images)
    _sync(device)
    return n / (time.perf_counter() - t0)


def step_rate(run, batches: list, opt: torch.optim.Optimizer) -> float:
    def one(images, targets) -> None:
        total, _ = train_step(run, images, targets)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    one(*batches[0])  # warm-up (cuDNN autotune, allocator)
    _sync(run.device)
    n, t0 = 0, time.perf_counter()
    for images, targets in batches[1:]:
        one(images, targets)
        n += len(images)
    _sync(run.device)
    return n / (time.perf_counter() - t0)


def loop_rate(run, batches: int, opt: torch.optim.Optimizer) -> float:
    it = iter(run.train_loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for images, targets in itertools.islice(it, batches):
        total, _ = train_step(run, images, targets)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        n += len(images)
    _sync(run.device)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(MODELS), default="segmentation")
    ap.add_argument("--model", default=None, help="zoo name (default: the shapes demo student)")
    ap.add_argument("--data", default="shapes")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    ap.add_argument("--image-size", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="none")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for workers in args.workers:
        cfg = RunConfig(model=args.model or MODELS[args.task], data=args.data, batch_size=args.batch_size,
                        workers=workers, image_size=args.image_size, device=args.device, amp=args.amp,
                        out="/tmp/kdcli-loader-bench")
        run = build_run(cfg, log=lambda s: None)
        run.student.train()
        opt = torch.optim.SGD([p for p in run.student.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
        loader = loader_rate(run.train_loader, args.batches, run.device)
        held = list(itertools.islice(iter(run.train_loader), min(args.batches, 10) + 1))
        step = step_rate(run, held, opt)
        loop = loop_rate(run, args.batches, opt)
        rows.append((workers, loader, step, loop))
        del run
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    print(f"\n{args.task}, {args.model or MODELS[args.task]}, --data {args.data}, batch {args.batch_size}, "
          f"device {dev}, amp {args.amp}, torch threads {torch.get_num_threads()}\n")
    print("| workers | loader alone (img/s) | train step (img/s) | loop (img/s) | loader / step |")
    print("|---:|---:|---:|---:|---:|")
    for workers, loader, step, loop in rows:
        print(f"| {workers} | {loader:.1f} | {step:.1f} | {loop:.1f} | {loader / step:.1f}x |")


if __name__ == "__main__":
    main()
