"""No import cycles between the modules of dsk_compress, lazy imports included.

The graph is read from the source (AST), not from ``sys.modules``: an import inside a
function is a dependency of its module all the same, and two modules that import each
other lazily are one design knot even though Python happens to load them. Module names come
from pyproject's ``package-dir`` mapping (``compress/`` is ``dsk_compress.compress``, ...).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "dsk_compress"


def package_roots(pyproject: Path) -> dict[str, Path]:
    """``{package name: folder}`` of the top-level folders pyproject maps into the package."""
    mapping = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    return {name: pyproject.parent / folder for name, folder in mapping.items()}


def find_modules(roots: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """``{module name: (file, is_package)}`` for every .py file under the mapped folders."""
    modules: dict[str, tuple[Path, bool]] = {}
    # Deepest mapping first, so a folder mapped on its own wins over its parent's walk.
    for name, folder in sorted(roots.items(), key=lambda kv: -kv[0].count(".")):
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mod = ".".join([name, *(parts[:-1] if is_pkg else parts)])
            modules.setdefault(mod, (f, is_pkg))
    return modules


def _resolve(name: str, modules: dict) -> str | None:
    """The longest prefix of ``name`` that is a known module (``a.b.func`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(mod: str, path: Path, is_pkg: bool, modules: dict) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a package module in ``path``, at any depth of the AST."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: a package's own __init__ is level 1 of itself
                anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name` imports the module pkg.name when there is one, else pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                r = _resolve(t, modules)
                if r and r != mod:
                    found.append((r, node.lineno))
    return sorted(found, key=lambda x: x[1])  # the first import of a module names the edge


def import_graph(roots: dict[str, Path]) -> nx.DiGraph:
    """Directed graph module -> imported module; each edge keeps where the import is (``file:line``)."""
    modules = find_modules(roots)
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for mod, (path, is_pkg) in modules.items():
        for target, line in imports_of(mod, path, is_pkg, modules):
            if not g.has_edge(mod, target):
                g.add_edge(mod, target, where=f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}")
    return g


def cycles(g: nx.DiGraph) -> list[str]:
    """One line per elementary cycle: ``a -> b -> a  (a.py:3, b.py:9)``, shortest first."""
    found = [c[c.index(min(c)) :] + c[: c.index(min(c))] for c in nx.simple_cycles(g)]  # start at the smallest name
    found.sort(key=lambda c: (len(c), c))
    lines = []
    for c in found:
        steps = list(zip(c, c[1:] + c[:1]))
        lines.append(" -> ".join(c + c[:1]) + "  (" + ", ".join(g.edges[a, b]["where"] for a, b in steps) + ")")
    return lines


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_import_graph_sees_lazy_relative_and_from_imports(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from dsk_compress.a import thing\n",  # a name, not a module: the edge goes to a
            "pkg/a.py": "def thing():\n    from .sub import helper\n",  # lazy and relative
            "pkg/b.py": "from dsk_compress import a\nimport dsk_compress.sub.deep as d\n",  # a module, not the package
            "pkg/sub/__init__.py": "from . import deep\nfrom .. import b\n",  # level 1 of a package is itself
            "pkg/sub/deep.py": "X = 1\n",
            "pkg/loop.py": "import dsk_compress.ext.mod\n",
            "other/ext/__init__.py": "",
            "other/ext/mod.py": "def f():\n    from dsk_compress.loop import g\n",  # another mapped folder, lazily
        },
    )
    g = import_graph({PACKAGE: tmp_path / "pkg", f"{PACKAGE}.ext": tmp_path / "other" / "ext"})
    assert set(g.edges) == {
        ("dsk_compress", "dsk_compress.a"),
        ("dsk_compress.a", "dsk_compress.sub"),
        ("dsk_compress.b", "dsk_compress.a"),
        ("dsk_compress.b", "dsk_compress.sub.deep"),
        ("dsk_compress.sub", "dsk_compress.sub.deep"),
        ("dsk_compress.sub", "dsk_compress.b"),
        ("dsk_compress.loop", "dsk_compress.ext.mod"),
        ("dsk_compress.ext.mod", "dsk_compress.loop"),
    }, sorted(g.edges)
    assert cycles(g) == [
        f"dsk_compress.ext.mod -> dsk_compress.loop -> dsk_compress.ext.mod  ({tmp_path}/other/ext/mod.py:2, {tmp_path}/pkg/loop.py:1)",
        f"dsk_compress.a -> dsk_compress.sub -> dsk_compress.b -> dsk_compress.a  "
        f"({tmp_path}/pkg/a.py:2, {tmp_path}/pkg/sub/__init__.py:2, {tmp_path}/pkg/b.py:1)",
    ]


def test_package_import_graph_covers_every_mapped_folder():
    roots = package_roots(ROOT / "pyproject.toml")
    g = import_graph(roots)
    assert {n.split(".")[1] for n in g if n.count(".")} >= {
        "compress",
        "export",
        "runtimes",
        "recipes",
        "devices",
        "cli",
        "models",
        "tasks",
        "report",
    }
    assert g.has_edge("dsk_compress.report.build", "dsk_compress.report.model")
    assert g.has_edge("dsk_compress.cli.main", "dsk_compress.report")  # a lazy import inside a command


def test_package_has_no_import_cycles():
    found = cycles(import_graph(package_roots(ROOT / "pyproject.toml")))
    for line in found:
        print(line, file=sys.stderr)
    assert not found, f"{len(found)} import cycles:\n" + "\n".join(found)
