"""Pieces shared by several methods: channel adapters, spatial matching, float32 regions.

Heterogeneous teacher/student pairs are handled the same way everywhere:

- channel counts differ → a 1×1 conv adapter maps the student's channels to the teacher's
  (:func:`build_adapter`; each method says whether it always applies one);
- spatial sizes differ → the student map is resized to the teacher's H×W with bilinear,
  ``align_corners=False`` interpolation (:func:`match_spatial`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

ADAPTER_INITS = ("default", "kaiming")


def build_adapter(
    in_channels: int,
    out_channels: int,
    *,
    bias: bool = True,
    norm: bool = False,
    act: bool = False,
    init: str = "default",
) -> nn.Module:
    """A 1×1 conv student→teacher channel adapter, optionally followed by BN and ReLU.

    ``init``:
      - ``"default"``: PyTorch's Conv2d init (what CIRKD's FitNet adapter uses);
      - ``"kaiming"``: Kaiming-normal, fan_out, ReLU gain, bias 0 (mmcv ``ConvModule``'s init,
        used by mmrazor's ``ConvModuleConnector``).

    Without norm and act the conv itself is returned (not a Sequential) so that its parameters
    are named ``weight``/``bias`` like the official connectors' convs.
    """
    if init not in ADAPTER_INITS:
        raise ConfigError(f"adapter init '{init}' is not one of {', '.join(ADAPTER_INITS)}")
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)
    if init == "kaiming":
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    if not norm and not act:
        return conv
    layers: list[nn.Module] = [conv]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    if act:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


def match_spatial(s: Tensor, t: Tensor) -> Tensor:
    """Resize the student map ``s`` (N, C, h, w) to the teacher's H×W when they differ."""
    if s.shape[-2:] == t.shape[-2:]:
        return s
    return F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of an (N, C, h, w) map to ``size`` (no-op when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@contextlib.contextmanager
def float32_region(x: Tensor) -> Iterator[None]:
    """Disable autocast on ``x``'s device: code inside runs in the dtype of its inputs.

    Casting inputs with ``.float()`` is not enough on its own: under autocast a conv or matmul
    would cast them straight back to fp16/bf16. Learnable loss modules therefore run inside this
    region on float32 inputs, so the whole loss is computed in float32.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype in force on ``x``'s device (bf16/fp16), or None when autocast is off."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32: fp16/bf16 become float32; float32 and float64 are kept.

    (Keeping float64 lets the tests check exact values; training tensors end up float32.)
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def zero_loss(like: Tensor) -> Tensor:
    """A zero scalar still attached to ``like``'s graph (keeps DDP and ``backward`` happy)."""
    return like.sum() * 0.0


def instance_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """InstanceNorm2d(affine=False, track_running_stats=False) of an (N, C, H, W) map.

    Written out (biased variance over H×W) rather than with ``F.instance_norm`` because the
    latter refuses 1×1 maps in training mode; here a 1×1 map normalises to 0.
    """
    var, mean = torch.var_mean(x, dim=(-2, -1), keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps)


__all__ = [
    "ADAPTER_INITS",
    "autocast_dtype",
    "build_adapter",
    "float32_region",
    "instance_norm",
    "match_spatial",
    "resize_to",
    "upcast",
    "zero_loss",
]


def check_pair(name: str, tap: str, fs: Tensor, ft: Tensor) -> None:
    """Feature methods need two (N, C, H, W) maps of one batch; anything else is named, not traced."""
    if fs.dim() != 4 or ft.dim() != 4 or fs.shape[0] != ft.shape[0]:
        from ..errors import MethodError

        raise MethodError(
            f"method '{name}': tap '{tap}' needs two (N, C, H, W) maps of the same batch; got student "
            f"{tuple(fs.shape)}, teacher {tuple(ft.shape)}"
        )
