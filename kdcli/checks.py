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
# optional features and the packages they need (pyproject's extras and lazily imported modules)
EXTRAS = {"export": ("onnx", "onnxruntime", "onnxscript"), "yaml configs": ("pyyaml",),
          "viz": ("matplotlib",), "reference COCO eval": ("pycocotools",)}
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

    from ._version import __version__
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

    resources = _resources(kdcli_home())
    from .runtime import cpu_has_native_bf16, resolve_amp

    resources["native bf16 on cpu"] = cpu_has_native_bf16()
    picks = [f"cpu: {resolve_amp('auto', torch.device('cpu'))[0]}"]
    if torch.cuda.is_available():
        picks.append(f"cuda: {resolve_amp('auto', torch.device('cuda'))[0]}")
    resources["--amp auto picks"] = ", ".join(picks)
    extras = {f"{extra} ({pkg})": _version(pkg) for extra, pkgs in EXTRAS.items() for pkg in pkgs}

    offline: dict[str, Any] = {k: os.environ.get(k, "(unset)") for k in OFFLINE_VARS}
    offline["hub reachable by kdcli"] = "no (offline mode)" if hf_offline is True else "yes, when the network is"
    return {"versions": versions, "devices": devices, "resources": resources, "cuda": cuda,
            "distributed backends": backends, "cache folders": caches, "optional extras": extras, "offline": offline}


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _resources(home: Any) -> dict[str, Any]:
    """Memory (``/proc/meminfo`` where there is one) and free disk where runs and caches are written."""
    import shutil
    from pathlib import Path

    out: dict[str, Any] = {}
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kb = {k: int(v.split()[0]) * 1024 for k, v in info.items() if k in ("MemTotal", "MemAvailable")}
        out["RAM"] = f"{_gib(kb['MemAvailable'])} available of {_gib(kb['MemTotal'])}"
    except (OSError, KeyError, ValueError):
        try:
            out["RAM"] = _gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            out["RAM"] = "unknown"
    for label, where in (("free disk (here)", Path.cwd()), ("free disk (KDCLI_HOME)", Path(home))):
        p = where
        while not p.exists() and p != p.parent:  # KDCLI_HOME may not exist yet: its nearest parent
            p = p.parent
        out[label] = f"{_gib(shutil.disk_usage(p).free)} ({where})"
    return out


def format_report(sections: dict[str, dict[str, Any]]) -> str:
    width = max(len(k) for s in sections.values() for k in s) + 2
    lines: list[str] = []
    for title, items in sections.items():
        lines.append(f"{title}:")
        lines.extend(f"  {k + ':':<{width}}{v}" for k, v in items.items())
    return "\n".join(lines)
