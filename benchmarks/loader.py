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

At real sizes without a COCO copy, ``--make-coco N`` writes N random 640×480 JPEGs (COCO's typical size)
and an ``instances_train2017.json`` into a temporary folder and uses it as ``--data``:

    python benchmarks/loader.py --task detection --model r50-retina --make-coco 20 --loader-only

``--loader-only`` skips the step and loop columns (a CPU step of the real pair takes seconds). ``+ resize``
adds the model's own resize + pad (``preprocess``: 800×1333 for the COCO detectors), which training runs on
the device after the copy. ``--gpu-decode`` (CUDA only) also times the GPU path: workers only read the JPEG
bytes, :func:`torchvision.io.decode_jpeg` decodes the batch on the GPU, then the same resize + pad there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from kdcli.config import RunConfig
from kdcli.engine.build import build_run
from kdcli.engine.step import to_device, train_step

MODELS = {"detection": "shapes-r18-fcos", "segmentation": "shapes-mbv3-lraspp"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(loader, batches: int, device: torch.device) -> float:
    it = iter(loader)
    next(it)  # worker start-up and the first decode are not throughput
    n, t0 = 0, time.perf_counter()
    for images, targets in itertools.islice(it, batches):
        images, targets = to_device(images, targets, device)  # the host->device copy belongs to loading
        n += len(images)
    _sync(device)
    return n / (time.perf_counter() - t0)


def make_coco(root: Path, n: int, size: tuple[int, int] = (480, 640), seed: int = 0) -> Path:
    """N random JPEGs of H×W = ``size`` (quality 90) and one box each, in the COCO layout kdcli reads."""
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    h, w = size
    images, anns = [], []
    for i in range(1, n + 1):
        # smooth noise (a JPEG of white noise decodes slower than a photo): 8×8-pixel blocks of random colour
        img = torch.randint(0, 256, (3, h // 8, w // 8), generator=g, dtype=torch.uint8)
        img = img.repeat_interleave(8, 1).repeat_interleave(8, 2)
        name = f"{i:012d}.jpg"
        (root / "train2017" / name).write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [w / 4, h / 4, w / 3, h / 3],
                     "area": w * h / 9, "iscrowd": 0})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    (root / "val2017").symlink_to(root / "train2017")
    return root


def preprocess_rate(run, batches: int) -> float:
    """The loader, the copy and the model's resize + pad (``preprocess``) on the run's device."""
    it = iter(run.train_loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for images, targets in itertools.islice(it, batches):
        images, targets = to_device(images, targets, run.device)
        run.student.preprocess(images, targets)
        n += len(images)
    _sync(run.device)
    return n / (time.perf_counter() - t0)


def gpu_decode_rate(run, batches: int) -> float:
    """Workers read JPEG bytes only; the batch is decoded (``torchvision.io.decode_jpeg``), resized and padded
    on the GPU. Needs CUDA (not measurable on a CPU-only machine)."""
    from torch.utils.data import DataLoader
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    ds = run.train_loader.dataset
    ds = getattr(ds, "dataset", ds)  # a Subset of --max-train-images
    paths = [ds.image_path(i) for i in range(len(ds))]
    loader = DataLoader(paths, batch_size=run.train_loader.batch_size, shuffle=True, drop_last=True,
                        num_workers=run.train_loader.num_workers, collate_fn=lambda b: [read_file(str(p)) for p in b])
    it = itertools.cycle(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for data in itertools.islice(it, batches):
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=run.device)
        run.student.preprocess([im.float() / 255 for im in images])
        n += len(images)
    _sync(run.device)
    return n / (time.perf_counter() - t0)


def step_rate(run, batches: list, opt: torch.optim.Optimizer) -> float:
    def one(images, targets) -> None:
        total = train_step(run, images, targets).total
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
        total = train_step(run, images, targets).total
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
    ap.add_argument("--make-coco", type=int, default=0, metavar="N",
                    help="write N random 640x480 COCO-format JPEGs to a temporary folder and use them as --data")
    ap.add_argument("--loader-only", action="store_true", help="no train step / loop columns")
    ap.add_argument("--gpu-decode", action="store_true", help="also decode the JPEGs on the GPU (CUDA only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.make_coco:
        tmp = tempfile.TemporaryDirectory(prefix="kdcli-loader-coco-")
        args.data = "coco:" + str(make_coco(Path(tmp.name), args.make_coco))
    rows = []
    for workers in args.workers:
        cfg = RunConfig(model=args.model or MODELS[args.task], data=args.data, batch_size=args.batch_size,
                        workers=workers, image_size=args.image_size, device=args.device, amp=args.amp,
                        # random weights: rates do not depend on them, and a fresh machine has no ImageNet file
                        student_weights="none", out="/tmp/kdcli-loader-bench")
        run = build_run(cfg, log=lambda s: None)
        run.student.train()
        opt = torch.optim.SGD([p for p in run.student.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
        loader = loader_rate(run.train_loader, args.batches, run.device)
        resized = preprocess_rate(run, args.batches)
        gpu = gpu_decode_rate(run, args.batches) if args.gpu_decode and run.device.type == "cuda" else None
        step = loop = None
        if not args.loader_only:
            held = list(itertools.islice(iter(run.train_loader), min(args.batches, 10) + 1))
            step = step_rate(run, held, opt)
            loop = loop_rate(run, args.batches, opt)
        rows.append((workers, loader, resized, gpu, step, loop))
        del run
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    data = f"{args.make_coco} random 640x480 COCO JPEGs" if tmp else args.data
    print(f"\n{args.task}, {args.model or MODELS[args.task]}, --data {data}, "
          f"batch {args.batch_size}, device {dev}, amp {args.amp}, torch threads {torch.get_num_threads()}\n")
    print("| workers | loader alone (img/s) | + resize, pad (img/s) | GPU decode + resize (img/s) "
          "| train step (img/s) | loop (img/s) | loader / step |")
    print("|---:|---:|---:|---:|---:|---:|---:|")

    def f(v: float | None) -> str:
        return "" if v is None else f"{v:.1f}"

    for workers, loader, resized, gpu, step, loop in rows:
        ratio = f"{loader / step:.1f}x" if step else ""
        print(f"| {workers} | {loader:.1f} | {resized:.1f} | {f(gpu)} | {f(step)} | {f(loop)} | {ratio} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
