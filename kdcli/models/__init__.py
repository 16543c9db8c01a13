"""Models as tap producers: build a zoo spec into a :class:`TapModel`."""

from .base import Batch, TapModel
from .build import build_model, image_size_of
from .taps import ModelOutput, TapInfo

__all__ = ["Batch", "ModelOutput", "TapInfo", "TapModel", "build_model", "image_size_of"]
