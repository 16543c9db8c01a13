r"""Ground-truth boxes → foreground / background masks on one FPN level, for a whole batch at once.

This is FGD's box → level mapping (Yang et al., CVPR 2022; official code yzd-v/FGD
``mmdet/distillation/losses/fgd.py``, ``FeatureLoss.forward``), reproduced exactly (docs/methods/fgd.md,
"Box → level masks"). For image ``i`` and a level of H×W cells:

1. **Scale** each box ``(x1, y1, x2, y2)`` (resized-input pixels) to the level grid::

       x ← x / ref_w · W        y ← y / ref_h · H

   in the boxes' own dtype and in this order (divide, then multiply), as the official code does.
   ``ref`` depends on ``scaling`` (:data:`SCALINGS`):

   - ``"img_shape"`` (**default, official**): ``ref`` = the image's resized, *unpadded* size
     (mmdet ``img_metas['img_shape']``; kdcli ``extras["image_sizes"]``) against the *padded*
     level size H×W. This is an FGD quirk: on a padded batch it stretches the boxes of every
     image smaller than the padded input towards the bottom-right. It is the default because
     the published FGD numbers and hyper-parameters were obtained with it, and kdcli is checked
     for numerical parity with the official code.
   - ``"input"``: ``ref`` = the padded input shape (kdcli ``extras["input_shape"]``), the frame
     the boxes and the feature map really share. With torchvision's padding to a multiple of 32
     this is exactly ``x / stride`` on P2–P5; on P6/P7 (whose sizes are rounded up) it spreads
     the small mismatch evenly over the map.
   - ``"stride"``: ``x ← x / stride`` with the level's nominal stride (the geometrically
     consistent alternative): cell ``j`` covers input pixels ``[j·stride, (j+1)·stride)``.

2. **Round outwards**: ``wmin = ⌊x1⌋``, ``wmax = ⌈x2⌉``, ``hmin = ⌊y1⌋``, ``hmax = ⌈y2⌉`` (as
   int32, like the official ``.int()``). The box then covers rows ``hmin..hmax`` and columns
   ``wmin..wmax`` *inclusive*, i.e. one more cell per axis than its extent when ``x2`` is an
   integer (a box from 2.0 to 4.0 covers columns 2, 3 and 4) — official behaviour, kept.
3. **Weight** ``a = 1 / (hmax + 1 − hmin) / (wmax + 1 − wmin)``: one over the number of cells of
   the rounded box, computed *before* clipping to the map (a box sticking out of the map keeps
   its full cell count). As in the official code the two divisions are made on int32 tensors, so
   ``a`` is computed in torch's default float dtype (float32) and then cast to the mask dtype.
4. **Fill** ``M_fg[hmin:hmax+1, wmin:wmax+1] = max(M_fg, a)``: where boxes overlap the larger
   weight (the smaller box) wins; pixels in no box stay 0. The slice follows Python slicing
   semantics in the default mode (``negative="wrap"``: a negative start counts from the end,
   then both ends clamp to [0, size]) — only boxes with negative coordinates can tell, which
   clipped ground truth never has; ``negative="clamp"`` clamps negative indices to 0 instead
   (used with the non-official scalings).
5. **Background** ``M_bg = 1[M_fg == 0]`` (precisely ``1[not M_fg > 0]``), divided by its sum
   over the map when that sum is positive (each image's background weights sum to 1; an image
   whose boxes cover everything has an all-zero ``M_bg``).

The official code loops over images and boxes. Here step 1's division by the image size is one
small op per image (with Python numbers, the official operation bit for bit, see
:func:`normalise_boxes`), made once per batch; everything after it is vectorised over the whole
batch: each box gets its row and column intervals as (K, H) and (K, W) indicators, and the
per-pixel maximum is taken with one ``scatter_reduce_(…, "amax")`` into the (N, H, W) mask. Peak
memory is K·H·W mask-dtype values (K = boxes in the batch), about 27 MB in float32 for 400 boxes
on a 100×168 P3 map. No gradient flows through the masks. (The first public version of the
official code indexed ``M_fg[wmin:wmax+1, hmin:hmax+1]``, rows and columns swapped; the later
version, and this module, index rows with ``h``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

SCALINGS = ("img_shape", "input", "stride")
NEGATIVE = ("wrap", "clamp")


def normalise_boxes(
    boxes: Sequence[Tensor],
    *,
    scaling: str = "img_shape",
    image_sizes: Sequence[tuple[int, int]] | None = None,
    input_shape: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The level-independent half of step 1 for a batch: ``(u (K, 4), image_index (K,) int64)``.

    ``boxes[i]`` is image ``i``'s (K_i, 4) xyxy in input pixels. ``u`` is ``x / ref_w``,
    ``y / ref_h`` (``"img_shape"``, ``"input"``) or the boxes unchanged (``"stride"``: divided
    per level by :func:`level_boxes`), concatenated over the batch in the first box tensor's
    dtype and device.

    With ``"img_shape"`` each image's boxes are divided by its own size given as Python numbers,
    exactly the official operation: on CUDA, ``tensor / python_number`` is evaluated as a
    multiplication by the reciprocal, which can differ by one ulp from a tensor-by-tensor
    division and so flip a ⌈·⌉ for boxes touching the image border. This is one small op per
    image (not per box); the mask itself is built for the whole batch at once.
    """
    if scaling not in SCALINGS:
        raise ConfigError(f"box_scaling '{scaling}' is not one of {', '.join(SCALINGS)}")
    n = len(boxes)
    first = boxes[0] if n else torch.zeros(0, 4)
    boxes = [b.reshape(-1, 4).to(device=first.device, dtype=first.dtype) for b in boxes]
    counts = torch.tensor([b.shape[0] for b in boxes], dtype=torch.long, device=first.device)
    index = torch.repeat_interleave(torch.arange(n, device=first.device), counts)
    if not n:
        return first.new_zeros(0, 4), index
    if scaling == "img_shape":
        if image_sizes is None or len(image_sizes) != n:
            raise ConfigError(
                f"box_scaling 'img_shape' needs one image size per image ({n} images, "
                f"{'no' if image_sizes is None else len(image_sizes)} sizes)"
            )
        u = torch.cat([_divide(b, int(hw[0]), int(hw[1])) for b, hw in zip(boxes, image_sizes, strict=True)])
    elif scaling == "input":
        if input_shape is None:
            raise ConfigError("box_scaling 'input' needs the padded input shape")
        u = _divide(torch.cat(boxes), int(input_shape[0]), int(input_shape[1]))
    else:
        u = torch.cat(boxes)
    return u, index


def _divide(b: Tensor, h: int, w: int) -> Tensor:
    """Columns x1, y1, x2, y2 divided by Python numbers w, h, w, h."""
    return torch.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h], dim=1)


def level_boxes(u: Tensor, size: tuple[int, int], *, scaling: str = "img_shape", stride: float | None = None) -> Tensor:
    """The per-level half of step 1: ``u · (W, H, W, H)`` (or ``u / stride`` for ``"stride"``)."""
    if scaling == "stride":
        if not stride or stride <= 0:
            raise ConfigError("box_scaling 'stride' needs the level's stride (> 0)")
        return u / stride
    h, w = int(size[0]), int(size[1])
    return torch.stack([u[:, 0] * w, u[:, 1] * h, u[:, 2] * w, u[:, 3] * h], dim=1)


def _slice_bounds(start: Tensor, stop: Tensor, length: int, negative: str) -> tuple[Tensor, Tensor]:
    """``[start:stop]`` of a length-``length`` axis as clamped ``[lo, hi)`` bounds, per box."""
    if negative == "wrap":  # Python slicing: negative indices count from the end
        start = torch.where(start < 0, start + length, start)
        stop = torch.where(stop < 0, stop + length, stop)
    return start.clamp(0, length), stop.clamp(0, length)


def foreground_mask(
    boxes: Tensor,
    image_index: Tensor,
    num_images: int,
    size: tuple[int, int],
    *,
    dtype: torch.dtype = torch.float32,
    negative: str = "wrap",
) -> Tensor:
    """FGD's ``M_fg`` (N, H, W) from level-frame boxes (K, 4) and their image index (steps 2–4)."""
    if negative not in NEGATIVE:
        raise ConfigError(f"negative '{negative}' is not one of {', '.join(NEGATIVE)}")
    h, w = int(size[0]), int(size[1])
    fg = torch.zeros(num_images, h, w, dtype=dtype, device=boxes.device)
    if boxes.shape[0] == 0:
        return fg
    wmin = torch.floor(boxes[:, 0]).int()
    hmin = torch.floor(boxes[:, 1]).int()
    wmax = torch.ceil(boxes[:, 2]).int()
    hmax = torch.ceil(boxes[:, 3]).int()
    # int32 / int32 → torch's default float dtype, as in the official code; then the mask dtype
    area = (1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)).to(dtype)
    r0, r1 = _slice_bounds(hmin, hmax + 1, h, negative)
    c0, c1 = _slice_bounds(wmin, wmax + 1, w, negative)
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    rows = (ys >= r0[:, None]) & (ys < r1[:, None])  # (K, H)
    cols = (xs >= c0[:, None]) & (xs < c1[:, None])  # (K, W)
    inside = rows[:, :, None] & cols[:, None, :]  # (K, H, W)
    values = torch.where(inside, area[:, None, None], torch.zeros((), dtype=dtype, device=boxes.device))
    # max over the boxes of each image, starting from 0 (official: torch.maximum(current, a));
    # the image index is broadcast over the pixels as an expanded view (no copy)
    index = image_index.to(boxes.device).view(-1, 1).expand(-1, h * w)
    fg.view(num_images, h * w).scatter_reduce_(0, index, values.view(-1, h * w), "amax", include_self=True)
    return fg


def background_mask(fg: Tensor) -> Tensor:
    """FGD's ``M_bg`` (N, H, W): 1 where ``fg`` is not positive, normalised per image (step 5)."""
    bg = (~(fg > 0)).to(fg.dtype)
    total = bg.sum(dim=(1, 2), keepdim=True)
    # the sum counts cells (an integer ≥ 1 when positive): dividing by max(sum, 1) leaves an
    # all-zero background untouched, like the official "divide only if the sum is non-zero"
    return bg / total.clamp_min(1)


def fgd_masks(
    boxes: Sequence[Tensor],
    size: tuple[int, int],
    *,
    scaling: str = "img_shape",
    image_sizes: Sequence[tuple[int, int]] | None = None,
    input_shape: tuple[int, int] | None = None,
    stride: float | None = None,
    negative: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``(M_fg, M_bg)``, each (N, H, W) on the boxes' device, of a batch on a level of ``size`` = (H, W).

    ``boxes[i]`` is image ``i``'s (K_i, 4) xyxy in input pixels (possibly K_i = 0). ``negative``
    defaults to ``"wrap"`` (official slicing) with ``scaling="img_shape"`` and to ``"clamp"``
    otherwise. Several levels of one batch: call :func:`normalise_boxes` once and
    :func:`level_masks` per level (what the ``fgd`` method does).
    """
    u, index = normalise_boxes(boxes, scaling=scaling, image_sizes=image_sizes, input_shape=input_shape)
    return level_masks(u, index, len(boxes), size, scaling=scaling, stride=stride, negative=negative, dtype=dtype)


def level_masks(
    u: Tensor,
    image_index: Tensor,
    num_images: int,
    size: tuple[int, int],
    *,
    scaling: str = "img_shape",
    stride: float | None = None,
    negative: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``(M_fg, M_bg)`` of one level from :func:`normalise_boxes`' output."""
    if negative is None:
        negative = "wrap" if scaling == "img_shape" else "clamp"
    boxes = level_boxes(u, size, scaling=scaling, stride=stride)
    fg = foreground_mask(boxes, image_index, num_images, size, dtype=dtype, negative=negative)
    return fg, background_mask(fg)


__all__ = [
    "NEGATIVE",
    "SCALINGS",
    "background_mask",
    "fgd_masks",
    "foreground_mask",
    "level_boxes",
    "level_masks",
    "normalise_boxes",
]
