"""kdcli: knowledge distillation for dense prediction on plain torchvision/timm models.

The Python API (docs/api.md): ``kdcli.train``, ``kdcli.distill``, ``kdcli.evaluate``, ``kdcli.export``
and ``kdcli.push``, loaded on first use so that ``import kdcli`` does not import torch.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["__version__", "distill", "evaluate", "export", "push", "train"]

_API = ("train", "distill", "evaluate", "push")


def _export(run: Any, out: Any = None, formats: Any = None, image_size: int | None = None,
            onnx_exporter: str = "dynamo") -> Any:
    """Export the student of a run folder; returns the export folder (:func:`kdcli.api.export`)."""
    from .api import export

    return export(run, out, formats, image_size, onnx_exporter)


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "export":  # until the submodule kdcli.export is imported (it is callable the same way)
        return _export
    raise AttributeError(f"module 'kdcli' has no attribute '{name}'")
