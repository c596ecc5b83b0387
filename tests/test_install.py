"""Every import on the default paths is a declared dependency.

CI once passed while a newcomer's `pip install -e . && lmforge run` failed: datatrove's JsonlWriter
needs orjson, which this machine's Python happened to have. `.ci/run` now installs into a fresh venv,
and these tests say which declaration is missing, without one.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared(extra: list[str] = ()) -> set[str]:
    """The declared runtime dependencies (and `extra` requirements) and everything they require in
    turn, as installed here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [_name(r) for r in [*project["dependencies"], *extra]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def _third_party_imports(top_level_only: bool) -> dict[str, set[str]]:
    """module -> lmforge files importing it; top_level_only: imports run when the file is imported."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "lmforge").rglob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("lmforge", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _undeclared(imports: dict[str, set[str]], declared: set[str]) -> dict[str, list[str]]:
    owners = md.packages_distributions()
    return {module: sorted(files) for module, files in imports.items()
            if not {d.lower().replace("_", "-") for d in owners.get(module, [module])} & declared}


def test_module_level_imports_are_runtime_dependencies():
    """What a module imports at its top runs on every path through it: a core dependency."""
    undeclared = _undeclared(_third_party_imports(top_level_only=True), _declared())
    assert not undeclared, f"imported at module level but not in pyproject's dependencies: {undeclared}"


def test_every_import_is_declared_somewhere():
    """An import inside a function may be an optional extra's, but it is declared as one."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    undeclared = _undeclared(_third_party_imports(top_level_only=False), _declared(extras))
    assert not undeclared, f"imported but declared neither as a dependency nor in an extra: {undeclared}"


def test_datatrove_steps_have_their_dependencies():
    """datatrove checks a step's `_requires_dependencies` only when the step is built, at run time."""
    from lmforge.dataprep import filters, pipeline

    declared = _declared()
    steps = [pipeline.JsonlWriter, pipeline.MinhashDedupSignature, pipeline.MinhashDedupBuckets,
             filters.UrlBlocklist, filters.GopherQualityFilter, filters.C4QualityFilter,
             filters.FineWebQualityFilter, filters.GopherRepetitionFilter]
    missing = {}
    for step in steps:
        for dep in (d for t in step.mro() for d in getattr(t, "_requires_dependencies", [])):
            module, dist = dep if isinstance(dep, tuple) else (dep, dep)
            owners = {d.lower().replace("_", "-") for d in md.packages_distributions().get(module, [dist])}
            if not owners & declared:
                missing.setdefault(step.__name__, []).append(dist)
    assert not missing, f"datatrove steps the pipeline builds need undeclared packages: {missing}"

