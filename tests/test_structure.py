"""The package's import structure, read from the source (AST): no import cycle, napari and Qt
only in the shell, and imports that go one way through the layers

    io < models < engine < (analysis, training) < data < (shell, cli)

Imports anywhere in a file count (function-local and ``TYPE_CHECKING`` ones too): a deferred
import still ties the two modules together.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "napari_yolocell"

#: Top-level names that only :mod:`napari_yolocell.shell` may import.
GUI_PACKAGES = {"napari", "qtpy", "magicgui", "superqt", "PyQt5", "PyQt6", "PySide2", "PySide6"}
#: Layer of each subpackage (or top-level module): a module imports only its own subpackage or
#: lower layers, so siblings on one layer (analysis / training, shell / cli) stay independent.
LAYERS = {
    "io": 0,
    "models": 1,
    "engine": 2,
    "analysis": 3,
    "training": 3,
    "data": 4,
    "shell": 5,
    "cli": 5,
}


@cache
def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    mods = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _is_package(name: str) -> bool:
    return _modules()[name].name == "__init__.py"


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names an import statement may load (``from a import b``: ``a`` and ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        parts = module.split(".") if _is_package(module) else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, base] if base else parts)
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _own_module(name: str) -> str | None:
    """The package module ``name`` refers to (a function or class resolves to its module)."""
    mods = _modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


@cache
def _imports() -> dict[str, dict[str, set[str]]]:
    """Per module: ``{"package": package modules imported, "external": top-level names}``."""
    out = {}
    for module, path in _modules().items():
        found: dict[str, set[str]] = {"package": set(), "external": set()}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(module, node):
                if target.split(".")[0] != PACKAGE:
                    found["external"].add(target.split(".")[0])
                elif (own := _own_module(target)) and own != module:
                    found["package"].add(own)
        out[module] = found
    return out


def _layer_name(module: str) -> str:
    """``napari_yolocell.engine.detect`` -> ``engine``; ``napari_yolocell.cli`` -> ``cli``."""
    return module.split(".")[1]


def _cycles() -> list[list[str]]:
    """Import cycles (Tarjan's strongly connected components with more than one module).

    A package ``__init__`` importing its own children is left out: that is how a package
    re-exports, and the children never need the ``__init__`` to be complete.
    """
    edges = {
        m: {t for t in found["package"] if not (_is_package(m) and t.startswith(m + "."))}
        for m, found in _imports().items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def _gui_outside_shell() -> dict[str, list[str]]:
    """Modules outside :mod:`napari_yolocell.shell` that import napari / Qt / magicgui."""
    return {
        m: sorted(found["external"] & GUI_PACKAGES)
        for m, found in _imports().items()
        if found["external"] & GUI_PACKAGES and not m.startswith(f"{PACKAGE}.shell")
    }


def _layer_violations() -> list[str]:
    """Imports of a sibling on the same layer or of a higher layer."""
    bad = []
    for module, found in _imports().items():
        if module == PACKAGE:
            continue
        layer = _layer_name(module)
        for target in found["package"]:
            if target == PACKAGE:  # the root package (version only) sits below every layer
                continue
            other = _layer_name(target)
            if other != layer and LAYERS.get(other, 99) >= LAYERS.get(layer, -1):
                bad.append(f"{module} ({layer}) imports {target} ({other})")
    return sorted(bad)


@pytest.fixture(autouse=True)
def _source_checkout():
    if not (SRC / PACKAGE / "__init__.py").is_file():
        pytest.skip("not a source checkout")


def test_the_package_is_found():
    mods = _modules()
    assert len(mods) > 20 and f"{PACKAGE}.shell.reader" in mods and f"{PACKAGE}.cli" in mods


def test_no_import_cycle():
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_only_the_shell_imports_napari_or_qt():
    offenders = _gui_outside_shell()
    assert not offenders, f"napari / Qt / magicgui imported outside the shell: {offenders}"


def test_every_module_has_a_layer():
    unknown = sorted(m for m in _modules() if m != PACKAGE and _layer_name(m) not in LAYERS)
    assert not unknown, f"modules outside the known layers (add them to LAYERS): {unknown}"


def test_root_package_imports_nothing_of_the_package():
    assert not _imports()[PACKAGE]["package"]


def test_imports_go_down_the_layers():
    bad = _layer_violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_checks_see_violations(tmp_path, monkeypatch):
    """The helpers resolve relative and function-local imports (or the tests above prove little)."""
    pkg = tmp_path / PACKAGE
    for sub in ("io", "engine"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "a.py").write_text("def f():\n    from ..engine import b\n    import napari\n")
    (pkg / "engine" / "b.py").write_text("from napari_yolocell.io.a import f\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    for fn in (_modules, _imports):
        fn.cache_clear()
    try:
        found = _imports()
        assert found[f"{PACKAGE}.io.a"]["package"] == {f"{PACKAGE}.engine", f"{PACKAGE}.engine.b"}
        assert "napari" in found[f"{PACKAGE}.io.a"]["external"]
        assert [f"{PACKAGE}.engine.b", f"{PACKAGE}.io.a"] in _cycles()
        assert _gui_outside_shell() == {f"{PACKAGE}.io.a": ["napari"]}
        assert _layer_violations() == [
            f"{PACKAGE}.io.a (io) imports {PACKAGE}.engine (engine)",
            f"{PACKAGE}.io.a (io) imports {PACKAGE}.engine.b (engine)",
        ]
    finally:
        for fn in (_modules, _imports):
            fn.cache_clear()
