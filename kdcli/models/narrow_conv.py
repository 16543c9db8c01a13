"""Strided convolutions that stay right under CPU bf16 autocast on maps one or two pixels wide.

Measured with torch 2.14.1 on an Intel CPU with AMX (the project's machine of 2026-12-02, session 4): oneDNN's
bf16 convolution with stride 2 returns wrong values, often inf or NaN and different from call to call, when
its input is at most 2 wide and at least 9 high. This held for 3×3 and 7×7 kernels, every channel count and
batch size tried, and with or without dilation. Float32, stride 1 and inputs at least 3 wide were right.
Tall images reach such maps in the deep stages: a 1056×32 input gets them in layer4, P6 and P7, and then the
FCOS/RetinaNet losses came out NaN in 8 of 12 identical runs.

:func:`guard_strided_convs` gives every strided ``nn.Conv2d`` of a model a forward that runs such a call in
float32 with autocast off. Those maps are tiny, so the cost is negligible, and every other call is unchanged.
The autocast check comes first, so export and tracing (no autocast) never evaluate the shape test.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NARROW = 2  # widths up to this are computed wrongly by the bf16 strided kernel (see the module docstring)


class NarrowSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that runs in float32 on a narrow map under CPU autocast."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled("cpu") and x.device.type == "cpu" and x.shape[-1] <= NARROW:
            with torch.autocast("cpu", enabled=False):
                return self._conv_forward(x.float(), self.weight.float(),
                                          None if self.bias is None else self.bias.float())
        return super().forward(x)


def guard_strided_convs(net: nn.Module) -> int:
    """Turn every plain strided ``nn.Conv2d`` (kernel > 1) of ``net`` into a :class:`NarrowSafeConv2d`, in place;
    returns how many. Subclasses (timm's padding-same convolutions, say) are left as they are."""
    count = 0
    for module in net.modules():
        if type(module) is nn.Conv2d and max(module.stride) > 1 and max(module.kernel_size) > 1:
            module.__class__ = NarrowSafeConv2d
            count += 1
    return count
