r"""HARD's augmentor: a learnable, bounded affine + colour transform applied consistently to a batch.

Used by ``--augment hard`` (HARD, Nix, Burg & Sinz, arXiv 2305.14890; no official code was found,
so this design is **ours**: kdcli's design, HARD-Affine only: docs/methods/hard.md).
The objective that trains it (gradient ascent on teacher–student disagreement with a teacher-stability
penalty) lives in :mod:`kdcli.augment.hard`; this module holds the transform maths. The engine's two
hooks (attach the augmentor, augment a training batch) are in :mod:`kdcli.engine.augment`.

Parameters
----------
Each augmented image gets eight numbers, squashed from an unbounded raw vector ``u`` by
``value = bound · tanh(u)`` (so any ``u`` gives an in-bounds transform, :func:`squash`):

==========  ============================================================================
rotate      degrees, about the image centre
scale       log of the isotropic scale (``exp(value)``)
shift_x/y   translation as a fraction of the image width / height
shear       horizontal shear ``x ← x + shear · y`` (before rotation)
brightness  ``x ← x · (1 + b)``                     (on the un-normalised [0, 1] image)
contrast    ``x ← mean + (x − mean) · (1 + c)``     (mean: the image's grey level)
saturation  ``x ← grey + (x − grey) · (1 + s)``     (grey: the pixel's luminance)
==========  ============================================================================

Geometry
--------
All coordinates are continuous pixel coordinates of the padded batch tensor (``u ∈ [0, W]``,
torchvision's box convention); image ``i`` occupies ``[0, w_i] × [0, h_i]``. The forward map of an
image is ``u' = A u + b`` with ``A = R(rotate) · Shear · exp(scale)`` and
``b = c − A c + (shift_x · w_i, shift_y · h_i)``, ``c`` the image centre. It is written this way
(not ``c + A (u − c)``) so that the identity parameters give ``A = I``, ``b = 0`` *exactly* and boxes
come back bit for bit.

- **images**: the colour ops, then ``grid_sample`` (bilinear, zero padding = the mean colour in the
  normalised space, like torchvision's batch padding) with the inverse map; pixels outside the
  image's own region are set to the padding value before and after the warp.
- **boxes**: the four corners go through ``A u + b``; the axis-aligned hull is clipped to the image;
  a box is dropped when its clipped area is below ``min_visible`` of its hull's area or it is
  thinner than 1 px. Every per-box tensor of the target (labels, masks, areas...) is filtered alike.
- **label maps / instance masks**: the same inverse map with ``nearest`` sampling; label pixels that
  come from outside the image become the ignore index (255), mask pixels become 0.

Everything is vectorised over the batch (boxes of all images at once; one ``grid_sample`` for the
images and one for the label maps); instance masks, whose sizes differ per image, take one
``grid_sample`` per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..models.base import Batch

PARAMS = ("rotate", "scale", "shift_x", "shift_y", "shear", "brightness", "contrast", "saturation")
IGNORE_INDEX = 255
# ITU-R BT.601 luma weights (torchvision's rgb_to_grayscale)
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Bounds:
    """Largest magnitude of each parameter (``value = bound · tanh(u)``)."""

    rotate: float = 15.0  # degrees
    scale: float = 0.2  # log-scale: scale ∈ [e^-0.2, e^0.2] ≈ [0.82, 1.22]
    shift: float = 0.1  # fraction of the image side
    shear: float = 0.1
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def vector(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        b = (self.rotate, self.scale, self.shift, self.shift, self.shear, self.brightness, self.contrast,
             self.saturation)
        return torch.tensor(b, device=device, dtype=dtype)

    def check(self) -> None:
        for name in ("rotate", "scale", "shift", "shear", "brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"--set hard.{name}: the bound must be a finite number >= 0 (got {v})")
        if self.rotate > 180 or self.shift > 1 or self.brightness >= 1 or self.contrast >= 1 or self.saturation >= 1:
            raise ConfigError("--set hard.*: bounds out of range (rotate <= 180, shift <= 1, "
                              "brightness/contrast/saturation < 1)")


def squash(raw: Tensor, bounds: Bounds) -> Tensor:
    """``(N, 8)`` raw parameters → bounded values (tanh; identity for raw 0)."""
    return bounds.vector(raw.device, raw.dtype) * torch.tanh(raw)


def affine_matrices(values: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Forward pixel maps ``u' = A u + b`` of each image: ``A (N, 2, 2)``, ``b (N, 2)``.

    ``sizes``: ``(N, 2)`` image heights and widths (each image's own region, not the padded tensor).
    """
    rad = values[:, 0] * (math.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    s = torch.exp(values[:, 1])
    sh = values[:, 4]
    zero, one = torch.zeros_like(s), torch.ones_like(s)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear = torch.stack([torch.stack([one, sh], -1), torch.stack([zero, one], -1)], -2)
    a = rot @ shear * s[:, None, None]
    h, w = sizes[:, 0].to(values), sizes[:, 1].to(values)
    c = torch.stack([w / 2, h / 2], -1)
    shift = torch.stack([values[:, 2] * w, values[:, 3] * h], -1)
    b = c - (a @ c[:, :, None])[:, :, 0] + shift
    return a, b


def sampling_theta(a: Tensor, b: Tensor, frame_hw: tuple[int, int]) -> Tensor:
    """``(N, 2, 3)`` ``affine_grid`` matrices (``align_corners=False``) of the inverse map in a frame of
    ``frame_hw`` pixels whose origin is the images' top-left corner.

    Continuous pixel ``u`` ↔ normalised ``n = 2u/W − 1`` (``u = D n + e``). An output location takes
    the input at ``A⁻¹(u' − b)``, i.e. ``n_in = D⁻¹A⁻¹D n_out + D⁻¹(A⁻¹(e − b) − e)``.
    """
    fh, fw = frame_hw
    d = a.new_tensor([fw / 2, fh / 2])
    e = d
    a_inv = torch.linalg.inv(a)
    lin = a_inv * d[None, None, :] / d[None, :, None]  # D⁻¹ A⁻¹ D
    off = ((a_inv @ (e - b)[:, :, None])[:, :, 0] - e) / d
    return torch.cat([lin, off[:, :, None]], -1)


def warp(x: Tensor, theta: Tensor, mode: str = "bilinear") -> Tensor:
    """Resample ``(N, C, H, W)`` maps with ``theta`` (zero padding outside the source)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def region_mask(image_sizes: list[tuple[int, int]], shape: tuple[int, int], device: torch.device) -> Tensor:
    """``(N, 1, H, W)`` 1 inside each image's own region of the padded tensor, 0 in the padding."""
    h, w = shape
    sizes = torch.as_tensor(image_sizes, device=device)
    rows = torch.arange(h, device=device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(w, device=device)[None, None, :] < sizes[:, 1, None, None]
    return (rows & cols)[:, None].float()


def colour(x01: Tensor, values: Tensor) -> Tensor:
    """Brightness, contrast, saturation (in that order) on ``(N, 3, H, W)`` images in [0, 1]."""
    bright, contrast, sat = (values[:, i, None, None, None] for i in (5, 6, 7))
    luma = x01.new_tensor(_LUMA).view(1, 3, 1, 1)
    x = x01 * (1 + bright)
    grey_mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = grey_mean + (x - grey_mean) * (1 + contrast)
    grey = (x * luma).sum(1, keepdim=True)
    x = grey + (x - grey) * (1 + sat)
    return x.clamp(0, 1)


def transform_images(images: Tensor, values: Tensor, theta: Tensor, mean: tuple[float, ...],
                     std: tuple[float, ...], region: Tensor) -> Tensor:
    """Colour then geometry on normalised ``(N, 3, H, W)`` images; padding stays 0 (mean colour)."""
    m = images.new_tensor(mean).view(1, -1, 1, 1)
    s = images.new_tensor(std).view(1, -1, 1, 1)
    x = (colour(images * s + m, values) - m) / s * region
    return warp(x, theta) * region


def transform_boxes(boxes: Tensor, image_index: Tensor, a: Tensor, b: Tensor, sizes: Tensor,
                    min_visible: float) -> tuple[Tensor, Tensor]:
    """``(K, 4)`` xyxy boxes of images ``image_index`` → transformed, clipped boxes and a keep mask."""
    if boxes.numel() == 0:
        return boxes, torch.zeros(0, dtype=torch.bool, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(-1)
    corners = torch.stack([torch.stack([x1, y1], -1), torch.stack([x2, y1], -1),
                           torch.stack([x1, y2], -1), torch.stack([x2, y2], -1)], 1)  # (K, 4, 2)
    ak, bk = a[image_index].to(boxes.dtype), b[image_index].to(boxes.dtype)
    moved = (ak[:, None] @ corners[..., None])[..., 0] + bk[:, None]
    hull = torch.cat([moved.amin(1), moved.amax(1)], -1)
    hk, wk = sizes[image_index, 0].to(boxes.dtype), sizes[image_index, 1].to(boxes.dtype)
    lo = torch.zeros_like(hull[:, :2])
    hi = torch.stack([wk, hk], -1)
    clipped = torch.cat([torch.maximum(hull[:, :2], lo), torch.minimum(hull[:, 2:], hi)], -1)
    wh = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0)
    area = wh[:, 0] * wh[:, 1]
    hull_area = (hull[:, 2:] - hull[:, :2]).prod(-1)
    keep = (wh >= 1).all(-1) & (area >= min_visible * hull_area)
    return clipped, keep


def transform_labels(labels: Tensor, theta: Tensor, region: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(N, H, W)`` int label maps, nearest; pixels from outside the source become ``ignore_index``."""
    shifted = (labels.float() + 1)[:, None]  # 0 marks "outside" after zero-padded sampling
    out = warp(shifted, theta, mode="nearest")[:, 0]
    out = torch.where((out > 0) & (region[:, 0] > 0), out - 1, float(ignore_index))
    return out.round().to(labels.dtype)


@dataclass
class Augmented:
    """An augmented batch's pieces: the images, the targets and the sampling matrices used."""

    images: Tensor
    targets: Any
    theta: Tensor  # (N, 2, 3) in the padded tensor's normalised frame (for warping dense outputs)
    region: Tensor  # (N, 1, H, W)


def apply(batch: Batch, values: Tensor, min_visible: float = 0.3) -> Augmented:
    """Transform a preprocessed :class:`~kdcli.models.base.Batch` with per-image ``values`` ``(N, 8)``.

    Runs with autocast disabled: under bf16 autocast the 2×2 products would be rounded to 8 mantissa
    bits (≈3 px on an 800 px box)."""
    with torch.autocast(device_type=batch.images.device.type, enabled=False):
        return _apply(batch, values.float(), min_visible)


def _apply(batch: Batch, values: Tensor, min_visible: float) -> Augmented:
    images = batch.images
    n, _, hh, ww = images.shape
    device = images.device
    sizes = torch.as_tensor(batch.image_sizes, device=device)
    a, b = affine_matrices(values.float(), sizes)
    theta = sampling_theta(a, b, (hh, ww))
    region = region_mask(batch.image_sizes, (hh, ww), device)
    out_images = transform_images(images, values.to(images.dtype), theta, batch.mean, batch.std,
                                  region.to(images.dtype))
    targets = batch.targets
    if isinstance(targets, Tensor):
        targets = transform_labels(targets, theta.detach(), region)
    elif isinstance(targets, list):
        targets = _transform_detection(targets, a.detach(), b.detach(), sizes, min_visible)
    return Augmented(out_images, targets, theta, region)


def _transform_detection(targets: list[dict[str, Tensor]], a: Tensor, b: Tensor, sizes: Tensor,
                         min_visible: float) -> list[dict[str, Tensor]]:
    if any("keypoints" in t for t in targets):
        raise ConfigError("--augment hard: keypoint targets are not supported")
    counts = [len(t["boxes"]) for t in targets]
    device = sizes.device
    all_boxes = torch.cat([t["boxes"] for t in targets]) if targets else torch.zeros(0, 4, device=device)
    index = torch.repeat_interleave(torch.arange(len(targets), device=device),
                                    torch.as_tensor(counts, device=device))
    boxes, keep = transform_boxes(all_boxes, index, a, b, sizes, min_visible)
    out = []
    for i, (t, bx, kp) in enumerate(zip(targets, boxes.split(counts), keep.split(counts), strict=True)):
        k = counts[i]
        new: dict[str, Tensor] = {}
        for key, v in t.items():
            if key == "boxes":
                new[key] = bx[kp]
            elif key == "masks" and isinstance(v, Tensor) and v.dim() == 3 and k:
                theta = sampling_theta(a[i:i + 1].expand(k, 2, 2), b[i:i + 1].expand(k, 2),
                                       (int(v.shape[-2]), int(v.shape[-1])))
                new[key] = warp(v[:, None].float(), theta, mode="nearest")[:, 0].round().to(v.dtype)[kp]
            elif isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == k:
                new[key] = v[kp]
            else:
                new[key] = v
        out.append(new)
    return out


def mix(batch: Batch, aug: Augmented, chosen: Tensor) -> Batch:
    """A new batch whose ``chosen`` (N,) bool samples are the augmented ones; the rest stay bit for bit."""
    images = torch.where(chosen[:, None, None, None], aug.images, batch.images)
    targets = batch.targets
    if isinstance(targets, Tensor):
        targets = torch.where(chosen[:, None, None], aug.targets, targets)
    elif isinstance(targets, list):
        flags = chosen.tolist()
        targets = [ta if f else tc for f, ta, tc in zip(flags, aug.targets, targets, strict=True)]
    meta = dict(batch.meta)
    meta["augmented"] = chosen
    return replace(batch, images=images, targets=targets, meta=meta)


__all__ = [
    "Augmented",
    "Bounds",
    "PARAMS",
    "affine_matrices",
    "apply",
    "colour",
    "mix",
    "region_mask",
    "sampling_theta",
    "squash",
    "transform_boxes",
    "transform_images",
    "transform_labels",
    "warp",
]
