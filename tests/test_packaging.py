"""The package as people install it: console scripts, declared dependencies, version, license."""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

import fa2jax

ROOT = Path(__file__).parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
PACKAGES = ("fa2jax", "spec", "pallas_kernels")
# Distributions whose import name differs from the distribution name.
IMPORT_NAMES = {"orbax-checkpoint": "orbax", "pyyaml": "yaml", "pillow": "PIL", "scikit-learn": "sklearn"}


def _table(name: str) -> str:
    """The body of one [table] of pyproject.toml (a plain reader: tomllib is Python >= 3.11 only)."""
    match = re.search(rf"^\[{re.escape(name)}\]\n(.*?)(?=^\[|\Z)", PYPROJECT, re.S | re.M)
    assert match, f"pyproject.toml has no [{name}]"
    return match.group(1)


def _names(requirements: str) -> set[str]:
    """Import names of a TOML list of requirement strings ("gguf>=0.17" -> "gguf")."""
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in re.findall(r'"([^"]+)"', requirements)}
    return {IMPORT_NAMES.get(name, name) for name in names}


def _scripts() -> dict[str, str]:
    return dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', _table("project.scripts"), re.M))


@pytest.mark.parametrize("script", ["fa2jax-train", "fa2jax-generate"])
def test_console_script_help(script, capsys):
    """Each console script's target runs `--help`, and every flag of it says what it does."""
    module_name, function = _scripts()[script].split(":")
    module = importlib.import_module(module_name)
    # A console script hands its return value to sys.exit: it must be the exit status.
    assert inspect.signature(getattr(module, function)).return_annotation in (int, "int")
    with pytest.raises(SystemExit) as exit_info:
        getattr(module, function)(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {script}")
    parser = module.build_parser()
    silent = [a.option_strings for a in parser._actions
              if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not silent, f"{script} flags without help: {silent}"


def _third_party_imports() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level, inside-function) imports of other distributions by our packages: root -> files."""
    ours = set(PACKAGES) | {"__future__"}
    top, lazy = {}, {}
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    roots = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    roots = [node.module.split(".")[0]]
                else:
                    continue
                for root in roots:
                    if root not in sys.stdlib_module_names and root not in ours:
                        (top if node.col_offset == 0 else lazy).setdefault(root, set()).add(file.name)
    return top, lazy


def test_dependencies_are_exactly_what_the_code_imports():
    """Module-level imports are runtime dependencies; imports inside functions belong to an extra;
    every runtime dependency and every extra's entry (but the test extra's) is imported somewhere."""
    runtime = _names(re.search(r"^dependencies = \[(.*?)\]", PYPROJECT, re.S | re.M).group(1))
    extras = dict(re.findall(r"^([\w-]+) = \[(.*?)\]", _table("project.optional-dependencies"), re.S | re.M))
    optional = set().union(*(_names(v) for k, v in extras.items() if k != "test"))
    top, lazy = _third_party_imports()
    assert set(top) <= runtime, f"imported at module level but not a runtime dependency: {set(top) - runtime}"
    assert set(lazy) <= runtime | optional, f"imported but declared nowhere: {set(lazy) - runtime - optional}"
    unused = (runtime | optional) - set(top) - set(lazy)
    assert not unused, f"declared but never imported: {unused}"
    assert _names(extras["test"]) >= optional, "the test extra must install every optional part it tests"


def test_version_license_and_changelog():
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", fa2jax.__version__)
    assert '"version"' in PYPROJECT.split("[project.optional-dependencies]")[0]  # dynamic, one source
    assert re.search(r'^version = \{attr = "fa2jax.__version__"\}', _table("tool.setuptools.dynamic"), re.M)
    assert "Apache License" in (ROOT / "LICENSE").read_text() and 'license = {text = "Apache-2.0"}' in PYPROJECT
    release = fa2jax.__version__.split(".dev")[0]
    assert release in (ROOT / "CHANGELOG.md").read_text(), f"CHANGELOG.md has no entry for {release}"
