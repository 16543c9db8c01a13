"""``kdcli checks``: what this installation runs on, to paste into a bug report.

Versions, devices, CUDA/cuDNN, the distributed backends this torch build has, the cache folders
weights are read from, and whether the Hub is switched off. Reads only; touches no network and
no credentials.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
from typing import Any

from kdcli.weights import hub_offline

PACKAGES = ("torch", "torchvision", "timm", "huggingface_hub", "faster-coco-eval", "safetensors", "numpy")
OFFLINE_VARS = ("KDCLI_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, dict[str, Any]]:
    """Everything ``kdcli checks`` prints, as sections of name → value."""
    import torch
    import torch.distributed as dist

    from . import __version__
    from .weights import kdcli_home

    versions = {"kdcli": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    versions.update({pkg: _version(pkg) for pkg in PACKAGES})

    devices: dict[str, Any] = {"cpu cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
                               "cuda available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices[f"cuda:{i}"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}"
        devices["bf16 on cuda"] = torch.cuda.is_bf16_supported()
    mps = getattr(torch.backends, "mps", None)
    devices["mps available"] = bool(mps is not None and mps.is_available())
    devices["cpu capability"] = torch.backends.cpu.get_cpu_capability()

    cuda = {
        "torch built with cuda": torch.version.cuda or "no",
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "not available",
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
    }

    backends: dict[str, Any] = {"torch.distributed": dist.is_available()}
    if dist.is_available():
        backends.update({"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(),
                         "mpi": dist.is_mpi_available()})
        backends["torchrun env"] = " ".join(f"{k}={os.environ[k]}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
                                            if k in os.environ) or "(not under torchrun)"

    caches = {"KDCLI_HOME": str(kdcli_home()), "torch hub": torch.hub.get_dir()}
    try:
        from huggingface_hub import constants

        caches["huggingface hub"] = str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - a runtime dependency
        caches["huggingface hub"] = "huggingface_hub not installed"
    # the same rule `kdcli zoo fetch` applies (environment now or huggingface_hub's import-time flag)
    hf_offline = hub_offline()

    offline: dict[str, Any] = {k: os.environ.get(k, "(unset)") for k in OFFLINE_VARS}
    offline["hub reachable by kdcli"] = "no (offline mode)" if hf_offline is True else "yes, when the network is"
    return {"versions": versions, "devices": devices, "cuda": cuda, "distributed backends": backends,
            "cache folders": caches, "offline": offline}


def format_report(sections: dict[str, dict[str, Any]]) -> str:
    width = max(len(k) for s in sections.values() for k in s) + 2
    lines: list[str] = []
    for title, items in sections.items():
        lines.append(f"{title}:")
        lines.extend(f"  {k + ':':<{width}}{v}" for k, v in items.items())
    return "\n".join(lines)
