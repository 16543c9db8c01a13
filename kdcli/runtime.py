"""Run-time settings below every other layer: the autocast precision (``--amp none | bf16 | fp16 | auto``),
the autocast context, seeding and CPU flush-to-zero.

bf16 autocast only pays on hardware with native bf16 kernels. On a CPU without AVX-512 BF16 or AMX,
oneDNN has no bf16 convolution and PyTorch falls back to im2col + emulated bf16 GEMM: measured on
this project's AVX2-only machine, a detector step is several times *slower* than float32 (on the
AVX-512 BF16 machine of docs/results it was 2x faster). ``auto`` therefore asks the hardware:

- CUDA: bf16 when the device supports it, else fp16 (with the GradScaler);
- CPU: bf16 when oneDNN has native bf16 kernels here, else none (float32).

An explicit ``bf16`` on a CPU without them, or ``fp16`` on any CPU, is honoured (the user asked for it)
with a warning.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from .errors import ConfigError

CHOICES = ("none", "bf16", "fp16", "auto")


def cpu_has_native_bf16() -> bool:
    """oneDNN bf16 kernels on this CPU (AVX-512 BF16 or AMX); False when PyTorch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device) -> tuple[str, str | None]:
    """(precision to use, a one-line warning or None) for ``--amp amp`` on ``device``."""
    if amp not in CHOICES:
        raise ConfigError(f"--amp {amp}: expected {', '.join(CHOICES)}")
    if device.type == "cuda":
        if amp == "auto":
            return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None
        return amp, None
    native = cpu_has_native_bf16()
    if amp == "auto":
        return ("bf16" if native else "none"), None
    if amp == "bf16" and not native:
        return amp, ("--amp bf16: this CPU has no native bf16 kernels (AVX-512 BF16 / AMX), so autocast falls "
                     "back to slow emulated ones, usually slower than float32; --amp auto or none avoids it")
    if amp == "fp16":
        return amp, ("--amp fp16 on a CPU runs emulated half-precision kernels, much slower than float32; "
                     "use --amp auto or none")
    return amp, None


def flush_denormals(device: torch.device) -> bool:
    """On a CPU, flush subnormal floats to zero (``torch.set_flush_denormal``; process-wide); returns whether set.

    Subnormals (|x| < 1.2e-38, float32 and bf16 alike) carry no useful signal in training, but each arithmetic
    operation on one can take a hundred cycles. Softmax exponentials of wide-ranged logits produce them: ACAM's
    attention on real features did, and with them its backward pass took 48 ms per step instead of 15 ms
    (bench pair, bf16, one thread, Intel CPU with AMX; the step went from 1.14× to 1.09× the floor). CUDA
    already flushes them in its fast paths; nothing is changed there.
    """
    return device.type == "cpu" and bool(torch.set_flush_denormal(True))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device of ``--device name``: ``auto`` is ``cuda:<local rank>`` if CUDA is available, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use cpu)")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_ctx(device: torch.device, amp: str) -> AbstractContextManager:
    """The autocast context of a resolved ``amp`` (``auto`` is resolved by :func:`resolve_amp` first)."""
    if amp == "none":
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ConfigError(f"--amp {amp}: expected none, bf16, fp16 or auto")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
