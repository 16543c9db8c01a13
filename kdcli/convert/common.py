"""Shared pieces of the checkpoint converters: a key mapper that knows which source keys it used,
ResNet/FPN key maps, class-slot remapping, and reading the checkpoint's own config text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ZooError

# a logit that no sigmoid/softmax lets through: the classifier rows of class slots the source
# model does not have (torchvision's background slot, COCO's "N/A" ids)
EMPTY_SLOT_BIAS = -20.0


@dataclass
class KeyMap:
    """Source state dict → target state dict, recording which source key fed each target key.

    ``take`` marks a source key as used; whatever is never taken (or ignored) is reported by
    :meth:`check_all_used`, so a partially understood checkpoint is refused, not half loaded."""

    src: dict[str, Tensor]
    where: str
    out: dict[str, Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # target key → source key
    used: set[str] = field(default_factory=set)

    def has(self, key: str) -> bool:
        return key in self.src

    def take(self, key: str) -> Tensor:
        if key not in self.src:
            raise ZooError(f"{self.where}: missing key {key} (is --arch right for this checkpoint?)")
        self.used.add(key)
        return self.src[key]

    def ignore(self, key: str) -> None:
        if key in self.src:
            self.used.add(key)

    def put(self, dst: str, value: Tensor, src: str) -> None:
        self.out[dst] = value.detach().clone().contiguous()
        self.origin[dst] = src

    def copy(self, src: str, dst: str) -> None:
        self.put(dst, self.take(src), src)

    def copy_prefix(self, src_prefix: str, dst_prefix: str, rename: Any = None) -> int:
        """Every source key under ``src_prefix`` → ``dst_prefix`` + rest (``rename(rest)`` if given).
        BatchNorm's ``num_batches_tracked`` counters are taken and dropped."""
        n = 0
        for key in [k for k in self.src if k.startswith(src_prefix)]:
            rest = key[len(src_prefix):]
            if rest.endswith("num_batches_tracked"):
                self.ignore(key)
                continue
            self.copy(key, dst_prefix + (rename(rest) if rename else rest))
            n += 1
        return n

    def conv(self, src: str, dst: str, bias: bool = True) -> None:
        self.copy(f"{src}.weight", f"{dst}.weight")
        if bias:
            self.copy(f"{src}.bias", f"{dst}.bias")

    def norm(self, src: str, dst: str) -> None:
        for p in ("weight", "bias", "running_mean", "running_var"):
            if self.has(f"{src}.{p}") or p in ("weight", "bias"):
                self.copy(f"{src}.{p}", f"{dst}.{p}")
        self.ignore(f"{src}.num_batches_tracked")

    def check_all_used(self, arch: str) -> None:
        left = [k for k in self.src if k not in self.used]
        if left:
            shown = ", ".join(left[:8]) + (f", … (+{len(left) - 8} more)" if len(left) > 8 else "")
            raise ZooError(f"{self.where}: {len(left)} key(s) the --arch {arch} converter does not map: {shown}; "
                           "kdcli refuses a partial import")

    def check_fits(self, model_state: dict[str, Tensor], arch: str) -> None:
        """Target keys the model lacks are source keys kdcli could not place (refused like unmapped
        ones); model keys left empty, or of another shape, mean the checkpoint is not this architecture."""
        extra = [self.origin[k] for k in self.out if k not in model_state]
        if extra:
            shown = ", ".join(extra[:8]) + (f", … (+{len(extra) - 8} more)" if len(extra) > 8 else "")
            raise ZooError(f"{self.where}: {len(extra)} key(s) the --arch {arch} converter does not map: {shown}; "
                           "kdcli refuses a partial import")
        missing = [k for k in model_state if k not in self.out and not k.endswith("num_batches_tracked")]
        if missing:
            raise ZooError(f"{self.where}: the checkpoint has nothing for {len(missing)} parameter(s) of the "
                           f"{arch} model (e.g. {missing[0]}); is --arch right?")
        shape = [k for k in self.out if tuple(self.out[k].shape) != tuple(model_state[k].shape)]
        if shape:
            k = shape[0]
            raise ZooError(f"{self.where}: {self.origin[k]} has shape {tuple(self.out[k].shape)}, the model's "
                           f"{k} {tuple(model_state[k].shape)}")


# -- ResNet -----------------------------------------------------------------------------------------
_RESNET_DEPTH = {("basic", 2): 18, ("basic", 6): 34, ("bottleneck", 6): 50, ("bottleneck", 23): 101,
                 ("bottleneck", 36): 152}


def resnet_depth(src: dict[str, Tensor], prefix: str = "backbone.") -> int:
    """ResNet depth from the number of blocks in stage 3 and the block type."""
    blocks = {int(m.group(1)) for k in src if (m := re.match(re.escape(prefix) + r"layer3\.(\d+)\.", k))}
    kind = "bottleneck" if any(k.startswith(f"{prefix}layer1.0.conv3.") for k in src) else "basic"
    depth = _RESNET_DEPTH.get((kind, len(blocks)))
    if depth is None:
        raise ZooError(f"backbone: a ResNet with {len(blocks)} {kind} blocks in stage 3 is not a "
                       "ResNet-18/34/50/101/152")
    return depth


def deep_stem(src: dict[str, Tensor], prefix: str = "backbone.") -> bool:
    """mmseg/mmdet ResNetV1c/V1d: a 3-conv ``stem`` instead of ``conv1``/``bn1``."""
    return f"{prefix}stem.0.weight" in src


def map_resnet(m: KeyMap, src_prefix: str, dst_prefix: str) -> None:
    """mmcv/mmdet/mmseg ResNet keys equal torchvision's and timm's (conv1, bn1, layerX.Y.convN/bnN,
    downsample.0/1); a deep stem (``stem.0/1/3/4/6/7``) becomes timm's ``conv1.0/1/3/4/6`` + ``bn1``."""
    stem = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
            "stem.6.": "conv1.6.", "stem.7.": "bn1."}

    def rename(rest: str) -> str:
        for a, b in stem.items():
            if rest.startswith(a):
                return b + rest[len(a):]
        return rest

    m.copy_prefix(src_prefix, dst_prefix, rename)


def bgr_first_conv(m: KeyMap, key: str) -> None:
    """A BGR-input first conv made to take RGB: its input channels reversed."""
    m.out[key] = m.out[key].flip(1).contiguous()


# -- classes ----------------------------------------------------------------------------------------
def slot_rows(weight: Tensor, bias: Tensor, groups: int, src_classes: int, slots: list[int], num_slots: int,
              fill_bias: float = EMPTY_SLOT_BIAS) -> tuple[Tensor, Tensor]:
    """A classifier laid out as ``groups`` blocks of ``src_classes`` outputs (anchors x classes,
    anchor-major as in mmdet and torchvision) → ``groups`` blocks of ``num_slots``, source class c
    going to slot ``slots[c]``. Unused slots get zero weights and a bias no score passes."""
    if weight.shape[0] != groups * src_classes:
        raise ZooError(f"classifier with {weight.shape[0]} outputs is not {groups} x {src_classes}")
    rest = weight.shape[1:]
    w = weight.new_zeros((groups, num_slots, *rest))
    b = bias.new_full((groups, num_slots), fill_bias)
    idx = torch.as_tensor(slots)
    w[:, idx] = weight.view(groups, src_classes, *rest)
    b[:, idx] = bias.view(groups, src_classes)
    return w.reshape(groups * num_slots, *rest), b.reshape(groups * num_slots)


# -- the checkpoint's own config ---------------------------------------------------------------------
def config_text(meta: dict[str, Any]) -> str:
    """The training config that mmdet (``meta['config']``) and mmengine (``meta['cfg']``) store."""
    for key in ("config", "cfg"):
        v = meta.get(key)
        if isinstance(v, str):
            return v
    return ""


def cfg_flag(text: str, name: str) -> bool | None:
    """``name=True/False`` in a config text (the last one wins, as later dicts override), else None."""
    found = re.findall(rf"(?<![\w])['\"]?{re.escape(name)}['\"]?\s*[=:]\s*(True|False|'[^']*'|\"[^\"]*\")", text)
    if not found:
        return None
    v = found[-1].strip("'\"")
    return {"True": True, "False": False}.get(v, bool(v))


def cfg_str(text: str, name: str) -> str | None:
    found = re.findall(rf"(?<![\w])['\"]?{re.escape(name)}['\"]?\s*[=:]\s*['\"]([^'\"]*)['\"]", text)
    return found[-1] if found else None


def cfg_floats(text: str, name: str) -> list[float] | None:
    found = re.findall(rf"(?<![\w])['\"]?{re.escape(name)}['\"]?\s*[=:]\s*[\[(]([^\])]*)[\])]", text)
    if not found:
        return None
    try:
        return [float(x) for x in found[-1].split(",") if x.strip()]
    except ValueError:
        return None


def checkpoint_classes(meta: dict[str, Any]) -> list[str] | None:
    """Class names stored by mmdet/mmseg 2.x (``meta['CLASSES']``) or mmengine (``dataset_meta``)."""
    dataset_meta = meta.get("dataset_meta")
    holders: list[dict[str, Any]] = [meta, dataset_meta if isinstance(dataset_meta, dict) else {}]
    for holder in holders:
        for key in ("CLASSES", "classes"):
            v = holder.get(key)
            if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
                return list(v)
    return None
