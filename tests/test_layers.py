"""The library's layers: each module of normlab imports only from its own layer or a lower one.

1. the BN library: what the chapters teach and a user's own code would import;
2. the notebook runtime (``normlab.runtime``, and ``normlab.setup``): data, training loops, plots,
   timing, evidence and the claims registry;
3. the chapters: each chapter's experiments and its self-checks (``normlab.experiments.<chapter>``,
   ``normlab.checks.<chapter>``); the checks may use the experiments, never the reverse.

The maintainers' tooling is a package of its own (``tools/coursekit``), above all of these
(tests/test_hygiene.py: normlab never imports it). Lazy imports inside functions count too.
"""

import ast
from pathlib import Path

import pytest

from conftest import ROOT, assert_no_cycle

PACKAGE = ROOT / "code" / "normlab"
LIBRARY = {"scratch", "functional", "nn", "kernels", "stats", "fold", "adapt", "distributed", "normfree", "_validate"}
RUNTIME = {"normlab", "runtime"}  # the package itself (setup) and normlab.runtime
CHAPTERS = {"experiments": 3, "checks": 4}  # two sublayers of the chapters' layer: checks above experiments


def layer(module: str) -> int:
    """1 library, 2 runtime, 3 experiments, 4 checks (``module`` without the "normlab." prefix)."""
    top = module.split(".")[0]
    if top in LIBRARY:
        return 1
    if top in RUNTIME:
        return 2
    if top in CHAPTERS:
        return CHAPTERS[top]
    raise AssertionError(f"normlab.{module} is in no layer: add it to tests/test_layers.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "normlab"


def imports(path: Path) -> set:
    """The normlab modules a file imports anywhere in it (lazy imports too), without the prefix."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "normlab" or node.module.startswith("normlab."):
                package = node.module.removeprefix("normlab").removeprefix(".")
                for alias in node.names:  # from normlab[.package] import module, or a name of the package
                    name = f"{package}.{alias.name}" if package else alias.name
                    found.add(name if name in MODULES or not package else package)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("normlab.") for a in node.names if a.name.startswith("normlab."))
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_its_own_layer_or_a_lower_one(name):
    own = layer(name)
    upward = sorted(m for m in imports(MODULES[name]) if layer(m) > own)
    assert not upward, f"normlab.{name} (layer {own}) imports from a higher layer: {upward}"


def test_the_import_graph_has_no_cycle():
    graph = {n: {m for m in imports(p) if m in MODULES and m != n and not m.startswith(n + ".")}
             for n, p in MODULES.items()}
    assert_no_cycle(graph)


def test_the_layer_test_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from normlab.experiments import seeds_for\n    from normlab.runtime import train\n")
    assert imports(bad) == {"experiments", "runtime.train"}
    assert layer("nn") < layer("runtime.train") < layer("experiments.alternatives") < layer("checks.scratch")


def test_the_folder_shows_the_layers():
    """normlab/ holds the library's modules and three packages: runtime/, experiments/ and checks/."""
    top = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    top |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert top == LIBRARY | {"runtime"} | set(CHAPTERS), sorted(top ^ (LIBRARY | {"runtime"} | set(CHAPTERS)))


def test_the_cycle_check_names_a_cycle():
    assert_no_cycle({"a": {"b"}, "b": set()})
    with pytest.raises(AssertionError, match="a -> b -> a"):
        assert_no_cycle({"a": {"b"}, "b": {"a"}})
