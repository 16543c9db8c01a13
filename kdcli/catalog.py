"""The method table without importing torch: read from the method modules' source.

``kdcli methods`` and the CLI's cheap option checks need each method's name, paper, tasks, whether it
needs a teacher, its presets and its options (the nested ``Config`` dataclass: annotation text, default
and help of each :func:`kdcli.hparams.opt` field): class attributes written as literals. Reading them with :mod:`ast`
takes milliseconds where importing the methods (torch, torchvision) takes seconds. A class whose
attributes are not literals makes :func:`methods` fall back to the imported registry.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import hparams

_DIR = Path(__file__).parent / "methods"
_NOT_METHODS = {"base", "common", "__init__"}
_FIELDS = ("name", "paper", "tasks", "needs_teacher", "presets", "teacher_note", "evidence")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    paper: str
    tasks: tuple[str, ...] = ("detection", "segmentation")
    needs_teacher: bool = True
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    teacher_note: str = ""
    evidence: str = ""
    options: dict[str, hparams.Option] = field(default_factory=dict)


class _NotLiteral(Exception):
    pass


def _registered(tree: ast.Module) -> list[ast.ClassDef]:
    return [n for n in tree.body if isinstance(n, ast.ClassDef)
            and any(isinstance(d, ast.Name) and d.id == "register" for d in n.decorator_list)]


def _eval(node: ast.AST, env: dict[str, Any]) -> Any:
    """A literal, where names of module-level literals and ``**name`` in dicts are allowed."""
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise _NotLiteral(node.id)
        return env[node.id]
    if isinstance(node, ast.Dict):
        out: dict[Any, Any] = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if k is None:
                out.update(_eval(v, env))
            else:
                out[_eval(k, env)] = _eval(v, env)
        return out
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_eval(e, env) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise _NotLiteral(ast.dump(node)[:40]) from None


def _module_literals(tree: ast.Module) -> dict[str, Any]:
    env: dict[str, Any] = {}
    for node in tree.body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        if target is not None and value is not None:
            try:
                env[target] = _eval(value, env)
            except _NotLiteral:
                pass
    return env


def _attrs(cls: ast.ClassDef, env: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for node in cls.body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        if target in _FIELDS and value is not None:
            out[target] = _eval(value, env)
    return out


def _config(cls: ast.ClassDef, env: dict[str, Any]) -> dict[str, hparams.Option]:
    """The options of the class's nested ``Config``: ``name: <type> = opt(default, help[, key=...])``."""
    node = next((n for n in cls.body if isinstance(n, ast.ClassDef) and n.name == "Config"), None)
    if node is None:
        raise _NotLiteral(f"{cls.name}.Config")
    out: dict[str, hparams.Option] = {}
    for f in node.body:
        if not isinstance(f, ast.AnnAssign):
            continue
        call = f.value
        if not (isinstance(f.target, ast.Name) and isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                and call.func.id == "opt" and len(call.args) == 2):
            raise _NotLiteral(f"{cls.name}.Config")
        kw = {k.arg: _eval(k.value, env) for k in call.keywords}
        key = kw.get("key") or f.target.id
        out[key] = hparams.Option(key, f.target.id, ast.unparse(f.annotation), _eval(call.args[0], env),
                                  _eval(call.args[1], env))
    return out


def _from_source() -> dict[str, MethodInfo]:
    found: dict[str, MethodInfo] = {}
    for path in sorted(_DIR.glob("*.py")):
        if path.stem in _NOT_METHODS or path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        env = _module_literals(tree)
        for cls in _registered(tree):
            a = _attrs(cls, env)
            if "name" not in a:
                raise _NotLiteral(f"{cls.name}.name")
            a["tasks"] = tuple(a.get("tasks", ("detection", "segmentation")))
            found[a["name"]] = MethodInfo(**a, options=_config(cls, env))
    return dict(sorted(found.items()))


def _from_registry() -> dict[str, MethodInfo]:
    from .methods import available

    return {n: MethodInfo(n, c.paper, tuple(c.tasks), bool(c.needs_teacher), dict(c.presets), c.teacher_note,
                          c.evidence, hparams.options(c.Config)) for n, c in available().items()}


@lru_cache(maxsize=1)
def methods() -> dict[str, MethodInfo]:
    """Every built-in method by name (sorted)."""
    try:
        return _from_source()
    except (_NotLiteral, SyntaxError, OSError):
        return _from_registry()


def check_method_spec(spec: str, option: str = "--method") -> list[str]:
    """The names of ``a+b`` (also ``a,b``); an unknown name is one line listing the valid ones."""
    from .errors import MethodError

    names = [n.strip() for n in spec.replace(",", "+").split("+") if n.strip()]
    known = methods()
    for n in names:
        if n not in known:
            raise MethodError(f"{option}: unknown method '{n}' (valid: {', '.join(known)})")
    return names


def check_sets(spec: str, sets: dict[str, Any], objective: str = "ce") -> None:
    """``--set`` keys and values against the methods' options (their ``Config`` types), before anything
    is built: the same rules as the engine (``method.key`` with several methods, ``hard.*`` for
    ``--augment hard``), the same messages (:func:`kdcli.hparams.read`)."""
    from .errors import ConfigError

    names = check_method_spec(spec)
    if objective == "mcmi" and "mcmi" not in names:
        names.append("mcmi")
    known = methods()
    for key, value in sets.items():
        head, dot, rest = key.partition(".")
        if head == "hard" and dot:
            continue  # HARD's augmentor options, checked where it is built
        if dot and head in names:
            name, option = head, rest
        elif len(names) == 1 or (objective == "mcmi" and len(names) == 2):
            name, option = names[0], key
        else:
            raise ConfigError(f"--set {key}: with several methods prefix the option with the method name "
                              f"({', '.join(f'{n}.{key}' for n in names)})")
        where = f"--set {name}." if dot and head in names else "--set "
        hparams.read(name, known[name].options, {option: value}, where)
