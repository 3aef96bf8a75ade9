"""`make test`, read from make's dry run: each notebook executes twice, the two runs side by side.

``make -n test`` prints every command the target would run (make still descends into the
recipe's own ``$(MAKE)`` calls, passing ``-n``), so these tests read the real plan without running it.
"""

import re
import shutil
import subprocess
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


def test_nbval_and_the_book_run_side_by_side_on_one_thread_each(plan):
    together = [line for line in plan if re.search(r"-j2\b.*\bnotebooks book\b", line)]
    assert len(together) == 1, "no single make -j2 call runs both `notebooks` and `book`"
    assert "OMP_NUM_THREADS=1" in together[0]


def test_nbval_waits_for_outputs_as_long_as_for_a_cell():
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
    stubs.pytest_collection_modifyitems(None, Config(), [cell])
    assert cell.output_timeout == 2000
