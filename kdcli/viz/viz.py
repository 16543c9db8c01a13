"""``kdcli viz RUN --image IMG``: predictions side by side and the method's internals as heatmaps.

What it draws, into ``--out`` (default ``RUN/viz``):

- ``predictions.png``: the teacher's and the student's predictions on the image, side by side (boxes with
  class and score above ``--score``, or the segmentation masks in class colours); a self-KD run (no
  teacher model) shows the student alone;
- ``internals/<method>.<tap>.<map>.png``: every map of :meth:`~kdcli.methods.base.Method.internals` —
  spatial maps as heatmaps over the image (several maps of one tap, e.g. ACAM's M masks, as a grid),
  channel weightings as bar charts (one per image) or a masks × channels matrix. ``*query_attention`` maps
  (ACAM's STCA-FF, CanKD's non-local attention) are the attention row of the ``--point`` (a cross marks it);
- ``viz.json``: the files, the point and the notes below.

Weights: the student from ``weights/best.safetensors`` (``--weights last``: the last checkpoint); the
method's learnable parts (adapters, attention, mask units) always from the last checkpoint, the only one
that holds them. Maps cover the model's padded input; the padding is cropped and the map resized
(bilinear) to the original image.

Ground truth: methods that need boxes (FGD's foreground masks) or labels get the **teacher's predictions
above ``--score``** as pseudo ground truth (the student's for a self-KD run): a single image comes without
annotations. ``viz.json`` says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, KdcliError

DPI = 100
CELL = 3.0  # inches per map in a grid
SINGLE = (5.0, 5.0)  # inches of one heatmap / one prediction panel
PALETTE = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
], dtype=np.float32) / 255.0


@dataclass
class VizResult:
    folder: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    point: tuple[float, float] | None = None  # (x, y) in image pixels


@dataclass
class Loaded:
    """A run's student, teacher (None for self-KD) and method (None for a plain training run)."""

    task: str
    classes: list[str]
    student: Any
    teacher: Any
    method: Any
    method_name: str
    notes: list[str] = field(default_factory=list)


def load_run(run: Path, device: Any, weights: str = "best") -> Loaded:
    """Rebuild the models and the method of a run folder (``weights``: best | last for the student)."""
    from ..config import RunConfig
    from ..engine.checkpoint import load_checkpoint
    from ..methods import build as build_method
    from ..models import build_model
    from ..zoo import load_model_config, resolve_ref

    run = Path(run)
    if not (run / "config.json").is_file() or not (run / "model.json").is_file():
        raise ConfigError(f"kdcli viz {run}: not a run folder (needs config.json and model.json)")
    if weights not in ("best", "last"):
        raise ConfigError(f"--weights {weights}: expected best or last")
    record = json.loads((run / "config.json").read_text())
    cfg = RunConfig.from_dict(record["config"], str(run / "config.json"))
    spec = load_model_config(run / "model.json")
    notes: list[str] = []
    ckpt = None
    if (run / "weights").is_dir() and any((run / "weights").glob("last*")):
        ckpt = load_checkpoint(run / "weights")
    best = run / "weights" / "best.safetensors"
    if weights == "best" and best.is_file():
        student = build_model(spec, best)
    elif ckpt is not None:
        student = build_model(spec)
        student.net.load_state_dict({k[4:]: v for k, v in ckpt.tensors.items() if k.startswith("net.")})
        notes.append(f"student weights: last checkpoint ({ckpt.slot}, epoch {ckpt.state.get('epoch')})")
    else:
        raise ConfigError(f"kdcli viz {run}: no weights/best.safetensors or last checkpoint to load")
    student = student.to(device).eval()
    teacher = None
    if cfg.teacher:
        try:
            tref = resolve_ref(cfg.teacher, role="teacher")
        except KdcliError as err:
            raise KdcliError(f"kdcli viz {run}: the run's teacher {cfg.teacher} cannot be loaded ({err})") from None
        teacher = build_model(tref.spec, tref.weights if tref.weights is not None else "zoo").to(device).eval()
    method = None
    if cfg.method:
        t_info = teacher.tap_info if teacher is not None else student.tap_info
        method = build_method(cfg.method, student.tap_info, t_info, spec.task, dict(cfg.set)).to(device)
        if ckpt is not None:
            state: dict[str, Any] = {k[7:]: v for k, v in ckpt.tensors.items() if k.startswith("method.")}
            state.update(ckpt.state.get("method_extra", {}))
            missing, _unexpected = method.load_state_dict(state, strict=False)
            if missing:
                notes.append(f"method: {len(missing)} tensors not in the checkpoint kept their initial values")
        else:
            notes.append("method: no checkpoint, its learnable parts are at their initial values")
        method.eval()
    return Loaded(spec.task, list(spec.classes), student, teacher, method, cfg.method or "", notes)


def read_image(path: Path) -> Any:
    """(3, H, W) float tensor in [0, 1] from an image file."""
    import torch
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--image {path}: no such file")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(f"--image {path}: not a readable image ({err})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _targets_from(task: str, out: Any, score: float) -> Any:
    if task == "detection":
        det = out.extras["detections"][0]
        keep = det["scores"] >= score
        return [{"boxes": det["boxes"][keep], "labels": det["labels"][keep]}]
    return out.extras["pred"]


def _default_point(task: str, ref_out: Any, size: tuple[int, int], score: float) -> tuple[float, float]:
    """(x, y): the centre of the most confident box, or the median foreground pixel, or the image centre."""
    h, w = size
    if task == "detection":
        det = ref_out.extras["detections"][0]
        if len(det["scores"]) and float(det["scores"].max()) >= score:
            b = det["boxes"][int(det["scores"].argmax())].tolist()
            return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        return w / 2, h / 2
    pred = ref_out.extras["pred"][0]
    ys, xs = (pred > 0).nonzero(as_tuple=True)
    if len(ys):
        i = len(ys) // 2
        return float(xs[i]) * w / pred.shape[1], float(ys[i]) * h / pred.shape[0]
    return w / 2, h / 2


def visualise(run: str | Path, image: str | Path, out: str | Path | None = None,
              point: tuple[float, float] | None = None, taps: list[str] | None = None, device: str = "auto",
              score: float = 0.3, weights: str = "best") -> VizResult:
    """Draw ``predictions.png`` and the internals of ``run``'s method on ``image`` (module docstring)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    from ..models import image_size_of
    from ..runtime import pick_device

    run = Path(run)
    dev = pick_device(device)
    loaded = load_run(run, dev, weights)
    folder = Path(out) if out else run / "viz"
    folder.mkdir(parents=True, exist_ok=True)
    res = VizResult(folder, notes=list(loaded.notes))
    img = read_image(Path(image))
    h0, w0 = int(img.shape[1]), int(img.shape[2])
    student, teacher = loaded.student, loaded.teacher
    with torch.no_grad():
        if loaded.task == "detection":
            batch = student.preprocess([img.to(dev)])
        else:
            x = TF.resize(img, [image_size_of(student.spec)], antialias=True)
            batch = student.preprocess(x[None].to(dev))
        s_out = student(batch, need=None, losses=False, predict=True)
        t_out = teacher(batch, need=None, losses=False, predict=True) if teacher is not None else None
    ref_out = t_out if t_out is not None else s_out
    res.files.append(draw_predictions(folder / "predictions.png", img, loaded, s_out, t_out, score))
    if point is None:
        point = _default_point(loaded.task, ref_out, (h0, w0), score)
    if not (0 <= point[0] < w0 and 0 <= point[1] < h0):
        raise ConfigError(f"--point {point[0]:g},{point[1]:g}: outside the {w0}x{h0} image")
    res.point = (float(point[0]), float(point[1]))
    if loaded.method is None:
        res.notes.append("no distillation method in this run: predictions only")
        return _finish(res)
    # the shared input is padded: fractions of the padded tensor locate the point on every tap
    hp, wp = int(batch.images.shape[-2]), int(batch.images.shape[-1])
    rh, rw = batch.image_sizes[0]
    query = (point[1] / h0 * rh / hp, point[0] / w0 * rw / wp)
    targets = _targets_from(loaded.task, ref_out, score)
    if loaded.task == "detection":
        targets = student.preprocess([img.to(dev)], [{k: v.to(dev) for k, v in targets[0].items()}]).targets
    res.notes.append(f"ground truth for the method: {'teacher' if t_out is not None else 'student'} predictions"
                     + (f" with score >= {score}" if loaded.task == "detection" else ""))
    with torch.no_grad():
        maps = loaded.method.internals(s_out, t_out if t_out is not None else s_out, targets, query=query)
    if not maps:
        res.notes.append(f"method '{loaded.method_name}' exposes no internals")
    crop = (rh / hp, rw / wp)
    for name, value in maps.items():
        tap = name.split(".")[1] if "." in name else ""
        if taps and tap not in taps:
            continue
        v = value.detach().float().cpu()[0]
        path = folder / "internals" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        marker = res.point if name.endswith("query_attention") else None
        if v.dim() == 2 and not name.endswith("channel_mask"):
            res.files.append(draw_heatmaps(path, img, v[None], crop, name, marker))
        elif v.dim() == 3:
            res.files.append(draw_heatmaps(path, img, v, crop, name, marker))
        elif v.dim() in (1, 2):
            res.files.append(draw_channels(path, v if v.dim() == 2 else v[None], name))
    return _finish(res)


def _finish(res: VizResult) -> VizResult:
    record = {"files": [str(p.relative_to(res.folder)) for p in res.files], "point_xy": res.point,
              "notes": res.notes}
    (res.folder / "viz.json").write_text(json.dumps(record, indent=2) + "\n")
    return res


# -- drawing ------------------------------------------------------------------------------------
def _figure(w_in: float, h_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w_in, h_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _image(img: Any) -> np.ndarray:
    return img.permute(1, 2, 0).clamp(0, 1).cpu().numpy()


def to_image_grid(maps: Any, crop: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """Maps (K, h, w) over the padded input → (K, H, W) over the original image: crop the padding, resize."""
    import torch.nn.functional as F

    k, h, w = maps.shape
    hv, wv = max(1, round(h * crop[0])), max(1, round(w * crop[1]))
    x = maps[:, :hv, :wv].float()[:, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def draw_heatmaps(path: Path, img: Any, maps: Any, crop: tuple[float, float], title: str,
                  point: tuple[float, float] | None = None) -> Path:
    """One heatmap over the image per map, in a grid of up to 4 columns (one map: a single panel)."""
    k = maps.shape[0]
    size = (int(img.shape[1]), int(img.shape[2]))
    grid = to_image_grid(maps, crop, size)
    base = _image(img)
    cols = min(k, 4)
    rows = math.ceil(k / cols)
    fig = _figure(*(SINGLE if k == 1 else (CELL * cols, CELL * rows + 0.4)))
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    # one colour scale for all K maps: masks on [0, 1], signed maps (CanKD's dot-product attention) around 0
    lo, hi = float(grid.min()), float(grid.max())
    if title.endswith("mask") and lo >= 0 and hi <= 1:
        cmap, lo, hi = "jet", 0.0, 1.0
    elif lo < 0 < hi:
        cmap, hi = "coolwarm", max(-lo, hi)
        lo = -hi
    else:
        cmap = "jet"
    im = None
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= k:
            continue
        ax.imshow(base)
        im = ax.imshow(grid[i], cmap=cmap, alpha=0.5, vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
        if point is not None:
            ax.plot([point[0]], [point[1]], marker="x", color="white", markersize=10, mew=2.5)
            ax.plot([point[0]], [point[1]], marker="x", color="black", markersize=8, mew=1.2)
        if k > 1:
            ax.set_title(f"{i}: mean {float(maps[i].mean()):.3f}", fontsize=8)
    fig.colorbar(im, ax=list(axes), fraction=0.046 if k == 1 else 0.02, pad=0.04)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def draw_channels(path: Path, vec: Any, title: str) -> Path:
    """Channel weightings: a bar chart for one vector (C,), a masks × channels matrix for (K, C)."""
    v = vec.numpy()
    fig = _figure(8.0, 3.0)
    ax = fig.subplots(1, 1)
    if v.shape[0] == 1:
        ax.bar(np.arange(v.shape[1]), v[0], width=1.0, color="tab:blue")
        ax.set_xlabel("channel")
        ax.set_xlim(-0.5, v.shape[1] - 0.5)
    else:
        im = ax.imshow(v, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("channel")
        ax.set_ylabel("mask")
        fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def draw_predictions(path: Path, img: Any, loaded: Loaded, s_out: Any, t_out: Any, score: float) -> Path:
    """Teacher | student predictions (boxes or masks) on the image."""
    panels = [("teacher", t_out)] if t_out is not None else []
    panels.append(("student", s_out))
    fig = _figure(SINGLE[0] * len(panels), SINGLE[1])
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    base = _image(img)
    for ax, (who, out) in zip(axes, panels, strict=True):
        ax.imshow(base)
        ax.axis("off")
        if loaded.task == "detection":
            n = _draw_boxes(ax, out.extras["detections"][0], loaded.classes, score)
            ax.set_title(f"{who}: {n} boxes with score >= {score}", fontsize=10)
        else:
            _draw_mask(ax, out.extras["pred"][0], (base.shape[0], base.shape[1]), loaded.classes)
            ax.set_title(who, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def detection_label_name(label: int, classes: list[str]) -> str:
    """The class name of a detector's label: labels start at 1 (0 is background) and a detection
    model's class list holds the foreground classes, so label ``k`` is ``classes[k - 1]`` (for
    ``coco``, torchvision's category-id slots 1..90)."""
    return classes[label - 1] if 1 <= label <= len(classes) else str(label)


def _draw_boxes(ax: Any, det: dict[str, Any], classes: list[str], score: float, limit: int = 50) -> int:
    from matplotlib.patches import Rectangle

    keep = (det["scores"] >= score).nonzero().flatten()[:limit].tolist()
    for i in keep:
        x0, y0, x1, y1 = det["boxes"][i].tolist()
        label = int(det["labels"][i])
        colour = PALETTE[1 + (label % (len(PALETTE) - 1))]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.8))
        name = detection_label_name(label, classes)
        ax.text(x0, y0, f"{name} {float(det['scores'][i]):.2f}", fontsize=7, color="white", va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    return len(keep)


def _draw_mask(ax: Any, pred: Any, size: tuple[int, int], classes: list[str]) -> None:
    import torch.nn.functional as F
    from matplotlib.patches import Patch

    lab = F.interpolate(pred[None, None].float().cpu(), size=size, mode="nearest")[0, 0].long().numpy()
    rgba = np.zeros((*lab.shape, 4), dtype=np.float32)
    rgba[..., :3] = PALETTE[lab % len(PALETTE)]
    rgba[..., 3] = np.where(lab > 0, 0.55, 0.0)  # class 0 (background) stays clear
    ax.imshow(rgba)
    present = sorted(set(np.unique(lab).tolist()) - {0})
    if present:
        ax.legend(handles=[Patch(color=PALETTE[c % len(PALETTE)], label=classes[c] if c < len(classes) else str(c))
                           for c in present], fontsize=7, loc="lower right")


def parse_point(text: str | None) -> tuple[float, float] | None:
    """``--point X,Y`` in image pixels."""
    if not text:
        return None
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--point {text}: expected X,Y in image pixels, e.g. 64,40") from None
    return x, y
