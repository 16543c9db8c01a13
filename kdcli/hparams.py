"""Typed method options: read and check hyper-parameters from a method's ``Config`` dataclass.

Each method declares its options as a dataclass (``Method.Config``), one field per option: a type
annotation, a default and a one-line help (:func:`opt`). The type is the single source of truth for
what a preset may hold and what ``--set key=value`` accepts:

- ``bool``, ``int``, ``float``, ``str``; ``None`` in a union (``float | None``: the word ``none``);
- ``Literal["a", "b"]``: one of the listed choices;
- ``tuple[int, ...]``: a comma-separated list (``--set grids=1,2,4``); ``A | B``: the first that reads.

Only the annotation's text is used (``from __future__ import annotations`` keeps it a string), so the
same checks run on the imported dataclass and on the one :mod:`kdcli.catalog` reads from the source
without importing torch. This module imports nothing of kdcli but the errors.
"""

from __future__ import annotations

import ast
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def opt(default: Any, help: str, *, key: str | None = None) -> Any:  # noqa: A002 - the field's help text
    """A Config field: its default, a one-line help, and the option's name when it is not a Python name
    (FGD's ``lambda``)."""
    return field(default=default, metadata={"help": help, "key": key})


@dataclass(frozen=True)
class Option:
    key: str  # the name in presets and --set
    attr: str  # the dataclass attribute (differs from key only for keywords)
    kind: str  # the annotation's text
    default: Any
    help: str


def options(config: type) -> dict[str, Option]:
    """The options of a Config dataclass, by key, in declaration order."""
    out: dict[str, Option] = {}
    for f in fields(config):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        key = f.metadata.get("key") or f.name
        out[key] = Option(key, f.name, kind, f.default, f.metadata.get("help", ""))
    return out


def _kind(text: str) -> ast.expr:
    return ast.parse(text, mode="eval").body


def describe(kind: str) -> str:
    """The type for a message: ``float``, ``one of a, b``, ``a comma-separated list of int``."""
    return _describe(_kind(kind))


def _describe(node: ast.expr) -> str:
    if isinstance(node, ast.BinOp):
        return f"{_describe(node.left)} or {_describe(node.right)}"
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if node.value.id == "Literal":
            return "one of " + ", ".join(str(ast.literal_eval(a)) for a in args)
        return f"a comma-separated list of {_describe(args[0])}"
    if isinstance(node, ast.Constant) and node.value is None:
        return "none"
    return ast.unparse(node)


def convert(value: Any, kind: str) -> Any:
    """``value`` (a command-line string or a preset/config value) as type ``kind``; ValueError if it is not."""
    return _convert(value, _kind(kind))


def _convert(value: Any, node: ast.expr) -> Any:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        try:
            return _convert(value, node.left)
        except ValueError:
            return _convert(value, node.right)
    if (isinstance(node, ast.Constant) and node.value is None) or (isinstance(node, ast.Name) and node.id == "None"):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        raise ValueError(value)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if node.value.id == "Literal":
            choices = [ast.literal_eval(a) for a in args]
            for c in choices:
                if value == c or (isinstance(value, str) and not isinstance(c, str) and value == str(c)):
                    return c
            raise ValueError(value)
        if node.value.id == "tuple":
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ValueError(value)
            if len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis:
                return tuple(_convert(v, args[0]) for v in items)
            if len(items) != len(args):
                raise ValueError(value)
            return tuple(_convert(v, a) for v, a in zip(items, args, strict=True))
    if isinstance(node, ast.Name):
        return _scalar(value, node.id)
    raise ValueError(f"unsupported option type {ast.unparse(node)}")  # a Config the checks cannot read


def _scalar(value: Any, name: str) -> Any:
    if name == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
    elif name == "int":
        if isinstance(value, str):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif name == "float":
        out = float(value) if isinstance(value, str) else value
        if isinstance(out, (int, float)) and not isinstance(out, bool) and not math.isnan(out):
            return float(out)
    elif name == "str":
        if isinstance(value, str):
            return value
    elif name == "Any":
        return value
    raise ValueError(value)


def unknown(method: str, key: str, known: list[str], where: str) -> ConfigError:
    """The one-line error for an option ``method`` does not have, with the closest name."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return ConfigError(f"{where}{key}: '{method}' has no such option ({hint}valid: {', '.join(sorted(known))})")


def read(method: str, opts: dict[str, Option], values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` checked and converted by the options' types; ``where`` prefixes each message
    (``"--set "``, ``"--set cwd."``, or a preset's name)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in opts:
            raise unknown(method, key, list(opts), where)
        kind = opts[key].kind
        try:
            out[key] = convert(value, kind)
        except ValueError:
            shown, want = (value if isinstance(value, str) else repr(value)), describe(kind)
            what = f"'{shown}' is not {want}" if want.startswith("one of") else f"cannot read '{shown}' as {want}"
            raise ConfigError(f"{where}{key}: {what} (option of method '{method}')") from None
    return out


__all__ = ["Option", "convert", "describe", "opt", "options", "read", "unknown"]
