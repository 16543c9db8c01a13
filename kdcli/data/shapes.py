"""Embedded synthetic data set ``shapes``: circles, squares and triangles on cluttered backgrounds.

It is written in the real on-disk layouts (COCO instances json + Cityscapes-style label tree) so the
same loaders that read real data are exercised by the demo and the tests. Everything is derived from
one seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..progress import Progress

VERSION_TAG = "shapes-v1"
CLASSES = ("circle", "square", "triangle")
# Non-contiguous on purpose (like real COCO ids) so the id <-> label mapping code is exercised.
CATEGORY_IDS = (1, 3, 7)
SPLITS = ("train", "val")
CITY = "shapes"


def version_string(n_train: int, n_val: int, size: int, seed: int) -> str:
    return f"{VERSION_TAG} size={size} n_train={n_train} n_val={n_val} seed={seed}"


def default_root(size: int) -> Path:
    home = Path(os.environ.get("KDCLI_HOME", "~/.cache/kdcli")).expanduser()
    return home / "data" / f"{VERSION_TAG}-{size}"


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth two-colour gradient plus a few thin lines: enough clutter that colour alone is no cue."""
    c0, c1 = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    rgb = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line((x0, y0, x1, y1), fill=colour, width=1)
    return img


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """Binary mask (bool HxW) of one shape of class index ``cls`` at a random place, size and angle."""
    scale = size / 128
    extent = float(rng.uniform(12, 60)) * scale  # side / diameter in pixels
    half = extent / 2
    cx = float(rng.uniform(half, size - half))
    cy = float(rng.uniform(half, size - half))
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if cls == 0:  # circle
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=1)
    else:
        # Regular polygon inscribed in the same circle as the circle class, at a random rotation.
        n = 4 if cls == 1 else 3
        radius = half
        rot = float(rng.uniform(0, 2 * math.pi))
        angles = [rot + 2 * math.pi * k / n for k in range(n)]
        pts = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]
        draw.polygon(pts, fill=1)
    return np.asarray(canvas, dtype=bool)


def _rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE (column-major run lengths, starting with a run of zeros): exact, and
    read back by faster-coco-eval's ``annToMask`` without any polygon approximation."""
    flat = mask.T.ravel().astype(np.int8)  # Fortran order, as COCO expects
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _render(rng: np.random.Generator, size: int, min_area: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One image: returns (rgb uint8 HxWx3, instance-id map int HxW with 0 = background, class per instance).

    Later shapes occlude earlier ones; visibility is decided on the final instance map, and instances
    left with fewer than ``min_area`` visible pixels are erased back to background so the image, the
    boxes and the label map always agree.
    """
    bg = np.asarray(_background(rng, size), dtype=np.float32)
    inst = np.zeros((size, size), dtype=np.int32)
    classes: list[int] = []
    colours: list[np.ndarray] = []
    for k in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(0, len(CLASSES)))
        inst[_shape_mask(rng, cls, size)] = k + 1
        classes.append(cls)
        colours.append(rng.uniform(0, 255, 3).astype(np.float32))
    kept: list[int] = []
    out = np.zeros_like(inst)
    rgb = bg.copy()
    for k, cls in enumerate(classes):
        visible = inst == k + 1
        if int(visible.sum()) < min_area:
            continue
        kept.append(cls)
        out[visible] = len(kept)
        rgb[visible] = colours[k]
    rgb += rng.normal(0.0, 8.0, rgb.shape).astype(np.float32)  # sensor noise over everything
    return rgb.clip(0, 255).astype(np.uint8), out, kept


def _write_split(out: Path, split: str, first_id: int, n: int, size: int, seed: int, ann_id: int,
                 progress: Progress) -> int:
    coco_img_dir = out / "coco" / f"{split}2017"
    left_dir = out / "cityscapes" / "leftImg8bit" / split / CITY
    gt_dir = out / "cityscapes" / "gtFine" / split / CITY
    for d in (coco_img_dir, left_dir, gt_dir):
        d.mkdir(parents=True, exist_ok=True)
    min_area = max(8, round(30 * (size / 128) ** 2))
    images, annotations = [], []
    for i in range(n):
        image_id = first_id + i
        # One generator per image: any image can be regenerated alone and splits are independent.
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        rgb, inst, classes = _render(rng, size, min_area)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(rgb).save(coco_img_dir / file_name, quality=95)
        stem = f"{CITY}_{image_id:06d}_000019"
        Image.fromarray(rgb).save(left_dir / f"{stem}_leftImg8bit.png")
        semantic = np.zeros((size, size), dtype=np.uint8)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for k, cls in enumerate(classes):
            mask = inst == k + 1
            semantic[mask] = cls + 1
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
            annotations.append({
                "id": ann_id,
                "image_id": image_id,
                "category_id": CATEGORY_IDS[cls],
                "bbox": bbox,
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": _rle(mask),
            })
            ann_id += 1
        Image.fromarray(semantic, "L").save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
        progress.advance()
    doc = {
        "info": {"description": "kdcli synthetic shapes", "version": VERSION_TAG, "year": 2024},
        "licenses": [{"id": 1, "name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": name, "supercategory": "shape"}
            for cid, name in zip(CATEGORY_IDS, CLASSES, strict=True)
        ],
    }
    ann_dir = out / "coco" / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"instances_{split}2017.json").write_text(json.dumps(doc, separators=(",", ":")))
    return ann_id


def write_shapes(out: Path, n_train: int = 400, n_val: int = 100, size: int = 128, seed: int = 0,
                 progress: bool = True) -> Path:
    """Write the data set under ``out`` (COCO tree in ``out/coco``, Cityscapes tree in ``out/cityscapes``).

    ``progress``: a bar on a terminal, else a line on stderr every 10 % and every 30 s (500 images at
    128 px take about half a minute on a small CPU)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with Progress(f"generating shapes data ({size} px)", n_train + n_val, enabled=progress) as bar:
        # Image ids are unique across splits, as in real COCO; annotation ids too.
        ann_id = _write_split(out, "train", 1, n_train, size, seed, 1, bar)
        _write_split(out, "val", n_train + 1, n_val, size, seed, ann_id, bar)
    (out / "VERSION").write_text(version_string(n_train, n_val, size, seed) + "\n")
    return out


def ensure_shapes(root: Path | None = None, **kw: int) -> Path:
    """Return a folder holding the data set, writing it first if absent or written with other arguments.

    The default folder is ``$KDCLI_HOME/data/shapes-v1-<size>`` (``KDCLI_HOME`` defaults to
    ``~/.cache/kdcli``). The data is written to a sibling temp folder then moved into place, so an
    interrupted write never leaves a half data set behind.
    """
    args = {"n_train": 400, "n_val": 100, "size": 128, "seed": 0, **kw}
    root = Path(root) if root is not None else default_root(args["size"])
    want = version_string(**args)

    def current() -> bool:
        try:
            return (root / "VERSION").read_text().strip() == want
        except OSError:
            return False

    if current():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write_shapes(tmp, n_train=args["n_train"], n_val=args["n_val"], size=args["size"], seed=args["seed"])
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it is a shared cache, not a secret
        if root.exists():  # stale version: move aside first, os.replace cannot overwrite a full folder
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not current():  # another process may have won the race with the same data
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
