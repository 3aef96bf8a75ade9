"""`make test`, read from make's dry run: each notebook executes twice, in two chains side by side.

``make -n test`` prints every command the target would run (make still descends into the
recipe's own ``$(MAKE)`` calls, passing ``-n``), so these tests read the real plan without running it.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


@pytest.fixture(scope="module")
def plan():
    out = subprocess.run(["make", "-n", "--no-print-directory", "test"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


def test_the_book_is_built_once_and_the_student_edition_once(plan):
    """The later targets depend on `book`; a second make call must not build it again (-o book)."""
    books = [line for line in plan if "jupyter-book build" in line]
    assert len(books) == 2, "\n".join(books)
    assert sum("jupyter-book build . " in line for line in books) == 1
    assert sum("jupyter-book build _build/student/src" in line for line in books) == 1


def test_nbval_runs_the_student_edition_once_at_another_seed(plan):
    nbval = [line for line in plan if "--nbval" in line]
    assert len(nbval) == 1, "\n".join(nbval)
    assert any(line.strip() == "-p tests.nbval_stubs _build/student-notebooks" for line in plan)
    assert re.search(r"NORMLAB_SEED=(\d+)", nbval[0]).group(1) != "0"  # the book runs at seed 0
    assert "NORMLAB_AUDIT_FIGURES=1" in nbval[0]  # each figure's audit, for the "figures" test
    books = [line for line in plan if "jupyter-book build" in line]
    assert not any("NORMLAB_AUDIT_FIGURES" in line for line in books)  # the website shows figures alone


def test_two_chains_run_side_by_side_on_one_thread_each(plan):
    """Lint first; then, in one make -j2 call, unit tests then nbval beside the book then its editions."""
    together = [line for line in plan if re.search(r"-j2\b.*\btest-notebooks test-website\b", line)]
    assert len(together) == 1, "no single make -j2 call runs both chains"
    assert "OMP_NUM_THREADS=1" in together[0]
    chains = {name: [line for line in plan if line.startswith(f"make --no-print-directory {name}")]
              for name in ("unit", "book")}
    assert chains["unit"] == ["make --no-print-directory unit && make --no-print-directory notebooks"]
    assert chains["book"] == [  # one make call per step: a freed job slot cannot start a step early
        "make --no-print-directory book && make --no-print-directory -o book colab && \\",
    ]
    website = plan.index(chains["book"][0])
    rest = "make --no-print-directory -o book student-book && make --no-print-directory site"
    assert plan[website + 1].strip() == rest
    lint = [i for i, line in enumerate(plan) if line.startswith("make --no-print-directory lint ||")]
    assert lint and lint[0] < plan.index(together[0]), "lint runs alone, before the two chains"


def test_nbval_waits_for_outputs_as_long_as_for_a_cell(monkeypatch):
    """nbval stops the kernel after 5 s without an output; tests/nbval_stubs.py lifts that limit."""
    from nbval.plugin import IPyNbCell

    import tests.nbval_stubs as stubs

    class Option:
        nbval_cell_timeout = 2000

    class Config:
        option = Option()

    cell = IPyNbCell.__new__(IPyNbCell)
    cell.output_timeout = 5
    cell.cell = type("Cell", (), {"source": "x = 1"})()
    cell.parent = object()
    monkeypatch.setattr(stubs.FiguresReport, "from_parent", lambda parent, **kw: "figures report")
    items = [cell]
    stubs.pytest_collection_modifyitems(None, Config(), items)
    assert cell.output_timeout == 2000
    assert items == [cell, "figures report"]


def _notebook(path, figure_code):
    import nbformat

    nb = nbformat.v4.new_notebook()
    setup = "import matplotlib.pyplot as plt\nfrom normlab.runtime.plotting import use_style\nuse_style()"
    nb.cells = [nbformat.v4.new_code_cell(setup), nbformat.v4.new_code_cell(figure_code)]
    nbformat.write(nb, path)


def test_the_notebook_test_fails_on_a_figure_a_reader_cannot_read(tmp_path):
    """`make notebooks` runs nbval with tests/nbval_stubs.py: a figure whose audit finds a problem
    fails the notebook's "figures" test, and a figure without one passes it."""
    two_lines = "fig, ax = plt.subplots()\nax.plot([1, 2], 'o-', label='BN')\n"
    two_lines += "ax.plot([2, 1], {}, label='GN')\nax.legend()"
    _notebook(tmp_path / "colour_only.ipynb", two_lines.format("'o-'"))
    _notebook(tmp_path / "told_apart.ipynb", two_lines.format("'s--'"))
    paths = [str(ROOT), str(ROOT / "code"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "NORMLAB_AUDIT_FIGURES": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
         "-p", "tests.nbval_stubs", "-q", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 1, run.stdout[-3000:]
    assert "colour_only.ipynb::figures FAILED" in run.stdout or "FAILED colour_only.ipynb::figures" in run.stdout
    assert "'BN' and 'GN' differ by colour only" in run.stdout
    assert "1 failed, 5 passed" in run.stdout, run.stdout[-3000:]
