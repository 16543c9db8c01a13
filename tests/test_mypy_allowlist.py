"""The mypy allow-list in pyproject.toml only shrinks.

``make lint`` and ``make test`` run mypy on kdcli with the modules of the allow-list (the
``ignore_errors`` override) skipped. This test runs mypy once on those modules with the same
configuration minus that override, and fails when a listed module has no error left: it is clean,
so it must come off the list (and stay clean). See docs/design.md, "Type checks".
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is not installed (it comes with the test extra: pip install -e '.[test]')")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - kdcli's own fallback dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.mypy


def mypy_config() -> tuple[dict, list[str]]:
    """``[tool.mypy]`` of pyproject.toml and the allow-listed module names."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    allow = [o for o in cfg.get("overrides", []) if o.get("ignore_errors")]
    assert len(allow) == 1, "pyproject.toml: expected one [[tool.mypy.overrides]] with ignore_errors (the allow-list)"
    return cfg, list(allow[0]["module"])


def ini_without_allowlist(cfg: dict) -> str:
    """The same mypy configuration as an ini file, minus the allow-list override."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, list):
            return ",".join(str(x) for x in v)
        return str(v)

    lines = ["[mypy]"] + [f"{k} = {value(v)}" for k, v in cfg.items() if k not in ("overrides", "packages")]
    for o in cfg.get("overrides", []):
        if o.get("ignore_errors"):
            continue
        mods = o["module"] if isinstance(o["module"], list) else [o["module"]]
        lines.append(f"[mypy-{','.join(mods)}]")
        lines += [f"{k} = {value(v)}" for k, v in o.items() if k != "module"]
    return "\n".join(lines) + "\n"


def module_of(path: str) -> str:
    """``kdcli/data/__init__.py`` -> ``kdcli.data``; ``kdcli/models/mm.py`` -> ``kdcli.models.mm``."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def test_ini_translation_keeps_options_and_drops_only_the_allowlist() -> None:
    cfg = {"python_version": "3.11", "warn_unused_ignores": True, "packages": ["kdcli"],
           "overrides": [{"module": ["yaml.*", "onnxruntime.*"], "ignore_missing_imports": True},
                         {"module": ["kdcli.api"], "ignore_errors": True}]}
    assert ini_without_allowlist(cfg) == (
        "[mypy]\npython_version = 3.11\nwarn_unused_ignores = True\n"
        "[mypy-yaml.*,onnxruntime.*]\nignore_missing_imports = True\n"
    )
    assert module_of("kdcli/data/__init__.py") == "kdcli.data"
    assert module_of("kdcli/models/mm.py") == "kdcli.models.mm"


def test_allowlisted_modules_still_have_errors(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cfg, allow = mypy_config()
    assert allow == sorted(set(allow)), "pyproject.toml: keep the mypy allow-list sorted and without repeats"
    ini = tmp_path / "mypy.ini"
    ini.write_text(ini_without_allowlist(cfg), encoding="utf-8")
    # pytest's cache folder keeps mypy's cache between runs (a cold run checks torch's stubs: minutes)
    # (no cache attribute at all under -p no:cacheprovider)
    pytest_cache = getattr(request.config, "cache", None)
    cache = pytest_cache.mkdir("mypy") if pytest_cache else tmp_path / "cache"
    args = [sys.executable, "-m", "mypy", "--config-file", str(ini), "--cache-dir", str(cache),
            "--no-error-summary", "--hide-error-context", "--no-pretty"]
    for mod in allow:
        args += ["-m", mod]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    # 0: no errors, 1: errors found, 2: mypy could not run (bad config, a listed module that does not exist)
    assert proc.returncode in (0, 1), f"mypy failed to run:\n{proc.stdout}\n{proc.stderr}"
    failing = {module_of(m.group(1)) for m in re.finditer(r"^(kdcli/\S+\.py):\d+: error:", proc.stdout, re.M)}
    clean = [m for m in allow if m not in failing]
    assert not clean, (
        f"now type-clean, take off the mypy allow-list in pyproject.toml: {', '.join(clean)}"
    )
