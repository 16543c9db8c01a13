"""A small data file (TOML or YAML) describing any COCO-format or mask-PNG data set.

    # mydata.toml                        # the same keys in mydata.yaml
    format = "coco"                      # coco (detection) | masks (segmentation)
    root = "/data/mydata"                # optional: default the data file's folder
    [train]
    images = "images/train"              # relative paths are relative to root
    annotations = "annotations/train.json"
    [val]
    images = "images/val"
    annotations = "annotations/val.json"

``coco`` options: ``classes`` (optional: checked against the json's category names in id order),
``labels`` (auto | category-id | contiguous), ``empty`` (drop | keep: images without boxes in
the train split). ``masks`` options: ``classes`` or ``classes_file`` (one name per line, class 0
first), ``image_suffix`` (".jpg"), ``mask_suffix`` (".png"), ``ignore_index`` (255), ``id_map``
(raw mask value -> class index; unmapped values become ignore), and per split ``masks`` (the
mask folder) and optionally ``list`` (a file naming the samples, VOC style).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FORMATS = ("coco", "masks")
SUFFIXES = (".toml", ".yaml", ".yml")
_COMMON = {"format", "root", "classes", "train", "val"}
_KEYS = {
    "coco": _COMMON | {"labels", "empty"},
    "masks": _COMMON | {"classes_file", "image_suffix", "mask_suffix", "ignore_index", "id_map"},
}
_SPLIT_KEYS = {"coco": {"images", "annotations"}, "masks": {"images", "masks", "list"}}


@dataclass
class DataFile:
    """A parsed data file: paths resolved, options checked; ``splits[name]`` maps keys to paths."""

    path: Path
    format: str
    root: Path
    splits: dict[str, dict[str, Path]]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return "detection" if self.format == "coco" else "segmentation"

    def split(self, name: str) -> dict[str, Path]:
        if name not in self.splits:
            raise DataError(f"{self.path}: no [{name}] section (it needs one for the {name} split)")
        return self.splits[name]


def is_data_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in SUFFIXES


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"--data {path}: data file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            doc = tomllib.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except tomllib.TOMLDecodeError as err:
        raise DataError(f"{path}: invalid TOML ({err})") from None
    except Exception as err:  # yaml.YAMLError; yaml is imported lazily
        if type(err).__module__.startswith("yaml"):
            line = str(err).strip().splitlines()
            raise DataError(f"{path}: invalid YAML ({' '.join(x.strip() for x in line[:3])})") from None
        raise
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping of keys (format, root, train, val...)")
    return doc


def read_data_file(path: str | Path) -> DataFile:
    """Parse and check a data file; every problem is a one-line DataError naming the file and key."""
    path = Path(path).expanduser()
    doc = _load(path)
    fmt = doc.get("format")
    if fmt not in FORMATS:
        raise DataError(f"{path}: format = {fmt!r}: expected one of {', '.join(FORMATS)}")
    unknown = sorted(set(doc) - _KEYS[fmt])
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(unknown)} for format {fmt} "
                        f"(valid: {', '.join(sorted(_KEYS[fmt]))})")
    root = Path(str(doc.get("root", "."))).expanduser()
    root = root if root.is_absolute() else (path.parent / root)
    if not root.is_dir():
        raise DataError(f"{path}: root folder {root} does not exist")
    splits: dict[str, dict[str, Path]] = {}
    for name in ("train", "val"):
        if name not in doc:
            continue
        sec = doc[name]
        if not isinstance(sec, dict):
            raise DataError(f"{path}: [{name}] must be a table of paths")
        bad = sorted(set(sec) - _SPLIT_KEYS[fmt])
        if bad:
            raise DataError(f"{path}: [{name}] unknown key(s) {', '.join(bad)} "
                            f"(valid: {', '.join(sorted(_SPLIT_KEYS[fmt]))})")
        need = {"images", "annotations"} if fmt == "coco" else {"images", "masks"}
        miss = sorted(need - set(sec))
        if miss:
            raise DataError(f"{path}: [{name}] is missing {', '.join(miss)}")
        splits[name] = {k: _under(root, v) for k, v in sec.items()}
    if not splits:
        raise DataError(f"{path}: no [train] or [val] section")
    opts = {k: v for k, v in doc.items() if k not in ("format", "root", "train", "val")}
    if "classes_file" in opts:
        opts["classes"] = _read_classes(_under(root, opts.pop("classes_file")), path)
    if "classes" in opts:
        cl = opts["classes"]
        if not (isinstance(cl, list) and cl and all(isinstance(c, str) for c in cl)):
            raise DataError(f"{path}: classes must be a non-empty list of names")
    if fmt == "masks":
        if "classes" not in opts:
            raise DataError(f"{path}: format masks needs classes (or classes_file), class 0 first")
        if "id_map" in opts:
            opts["id_map"] = _id_map(opts["id_map"], path)
        ign = opts.get("ignore_index", 255)
        if not (isinstance(ign, int) and 0 <= ign <= 255):
            raise DataError(f"{path}: ignore_index must be an integer in 0..255, got {ign!r}")
    else:
        if opts.get("empty", "drop") not in ("drop", "keep"):
            raise DataError(f"{path}: empty = {opts['empty']!r}: expected drop or keep")
    return DataFile(path, fmt, root, splits, opts)


def _under(root: Path, value: Any) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else root / p


def _read_classes(p: Path, where: Path) -> list[str]:
    if not p.is_file():
        raise DataError(f"{where}: classes_file {p} not found")
    names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not names:
        raise DataError(f"{where}: classes_file {p} holds no names")
    return names


def _id_map(raw: Any, where: Path) -> dict[int, int]:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: id_map must be a table of raw value -> class index")
    try:
        return {int(k): int(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise DataError(f"{where}: id_map keys and values must be integers") from None
