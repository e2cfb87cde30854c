"""The package layout of `pallas_kernels`, checked by reading the imports of every module.

Rules (STYLE.md, "one folder per op family on a shared foundation"):
  * `fa2/` and `tree/` import only themselves and `common/`; `common/` imports only itself;
  * no import cycle, so that every module can be read (and tested) without the ones above it;
  * every module imports, and `pallas_kernels.<path>` reaches it as an attribute: no public function
    shadows a module or package, also after `from pallas_kernels import *`.
Imports are read with `ast` (inside functions too), relative ones resolved against their package.
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "pallas_kernels"
FAMILIES = ("common", "fa2", "tree")
ALLOWED = {"common": {"common"}, "fa2": {"fa2", "common"}, "tree": {"tree", "common"}}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def modules() -> dict[str, pathlib.Path]:
    return {_module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _imported(name: str, path: pathlib.Path) -> set[str]:
    """The modules of the package that `name` imports (a package's names resolved to its submodules)."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from X import y` imports the module X.y when there is one, else a name from X.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


@functools.lru_cache(maxsize=None)
def import_graph() -> dict[str, set[str]]:
    return {name: _imported(name, path) for name, path in modules().items()}


def _family(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FAMILIES else None


def test_the_walk_sees_the_layout():
    """Guards the test itself: the families exist and their known imports are found."""
    graph = import_graph()
    assert {_family(name) for name in graph} >= set(FAMILIES)
    assert "pallas_kernels.common.mosaic_pipeline" in graph["pallas_kernels.tree.mosaic_kernel"]
    assert "pallas_kernels.fa2.masking" in graph["pallas_kernels.fa2.reference"]


@pytest.mark.parametrize("family", FAMILIES)
def test_families_import_only_themselves_and_common(family):
    wrong = {name: sorted(target for target in targets if _family(target) not in ALLOWED[family])
             for name, targets in import_graph().items() if _family(name) == family}
    assert not {name: targets for name, targets in wrong.items() if targets}


def test_no_import_cycles():
    graph = import_graph()
    mutual = sorted((a, b) for a, targets in graph.items() for b in targets if a < b and a in graph[b])
    assert not mutual, f"modules that import each other: {mutual}"
    # Depth-first search for any longer cycle.
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_every_module_imports_and_is_reachable_by_attribute():
    """Each module imports, and `pallas_kernels.a.b` is that module, not a function named like it.

    Run in a fresh interpreter so that the order of imports is that of a user's script."""
    names = sorted(modules())
    script = "\n".join([
        "import functools, importlib, sys",
        "from pallas_kernels import *",
        "import pallas_kernels",
        f"for name in {names!r}:",
        "    module = importlib.import_module(name)",
        "    reached = functools.reduce(getattr, name.split('.')[1:], pallas_kernels)",
        "    assert reached is module, f'the attribute path {name} reaches {reached!r}, not the module'",
        "print('ok', len(sys.modules))",
    ])
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_public_names():
    import pallas_kernels

    assert sorted(pallas_kernels.__all__) == ["BlockSizes", "attention_reference", "autotune",
                                              "checked_tree_attention", "decode_attention", "flash_attention",
                                              "flash_attention_varlen", "tree_attention", "tree_attention_reference"]
    for name in pallas_kernels.__all__:
        assert callable(getattr(pallas_kernels, name)), name


@pytest.mark.parametrize("script", sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_scripts_import(script, monkeypatch):
    """The GPU benchmarks do not run here, but their imports of the kernels' modules must resolve."""
    monkeypatch.syspath_prepend(str(ROOT))
    importlib.import_module(f"benchmarks.{script}")
