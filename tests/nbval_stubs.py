"""A pytest plugin for `make notebooks`: what a student sees who runs a lab before any exercise.

`make notebooks` runs nbval over the student edition, every solution a stub (``coursekit.student``),
at another seed than the book build. nbval fails on any cell that raises. This plugin adds one
test after each notebook's last cell, which reads what the cells printed:

- each exercise's self-check said ``NOT ATTEMPTED Exercise N: <title>``;
- each cell that needs a stubbed function (``checks.solution_or_reference``) said that it used
  the course's reference instead.

So one execution checks the asserts at a second seed and the student's "Run All". Loaded with
``-p tests.nbval_stubs`` (the Makefile's ``notebooks`` target).

A second test after each notebook with figures reads each figure's audit, which
``normlab.runtime.plotting.use_style`` displays beside the image when ``NORMLAB_AUDIT_FIGURES=1``
(the Makefile sets it): it fails on text the website shrinks below a readable size, legend entries
told apart by colour alone, and overlapping tick labels, naming the cell.

It also lifts nbval's one short wall-clock limit: after a cell's reply, nbval waits only 5 s for
each of its outputs, then stops the kernel, so on a busy machine a slow plot failed that cell and
every later one ("Kernel dead on test start"). Each cell now waits as long as nbval's own cell
timeout (``--nbval-cell-timeout``, 2000 s unless set).
"""

from __future__ import annotations

import pytest
from nbval.plugin import IPyNbCell

from normlab.checks import NOT_ATTEMPTED, STUB, STUB_SUFFIX, stub_messages
from normlab.runtime.plotting import AUDIT_MIME

_USES_REFERENCE = "has not passed its self-check yet"


def _printed(item) -> str:
    return "".join(o.get("text", "") for o in item.test_outputs or [] if o.get("output_type") == "stream")


class StubsReport(pytest.Item):
    """After a notebook's last cell: every stub was reported and every use fell back to the reference."""

    def __init__(self, *, cells, **kwargs):
        super().__init__(**kwargs)
        self.cells = cells

    def runtest(self):
        unrun = [c.name for c in self.cells if c.test_outputs is None]
        if unrun:
            raise AssertionError(f"cells that did not run, so nothing to read: {', '.join(unrun)}")
        printed = "\n".join(_printed(c) for c in self.cells)
        problems = []
        for cell in self.cells:
            for message in stub_messages(cell.cell.source):
                said = f"{NOT_ATTEMPTED} {message.removesuffix(STUB_SUFFIX)}"
                if said not in printed:
                    problems.append(f"no self-check said '{said}' (the stub is in {cell.name})")
            if "solution_or_reference(" in cell.cell.source and _USES_REFERENCE not in _printed(cell):
                problems.append(f"{cell.name} needs a stub but did not say '{_USES_REFERENCE}'")
        assert not problems, "\n".join(problems)

    def reportinfo(self):
        return self.path, None, f"{self.name}: every stub reported, every use on the reference"


def _figures(item):
    return [o["data"] for o in item.test_outputs or [] if "image/png" in o.get("data", {})]


class FiguresReport(pytest.Item):
    """After a notebook's last cell: every figure it showed passed its audit."""

    def __init__(self, *, cells, **kwargs):
        super().__init__(**kwargs)
        self.cells = cells

    def runtest(self):
        problems, shown = [], 0
        for cell in self.cells:
            for data in _figures(cell):
                shown += 1
                if AUDIT_MIME not in data:
                    problems.append(f"{cell.name}: a figure without its audit (is NORMLAB_AUDIT_FIGURES=1 "
                                    "set, and does the notebook call use_style()?)")
                problems += [f"{cell.name}: {p}" for p in data.get(AUDIT_MIME, {}).get("problems", [])]
        if not shown:
            pytest.skip("this notebook showed no figure")
        assert not problems, "\n".join(problems)

    def reportinfo(self):
        return self.path, None, f"{self.name}: every figure readable on the page, its series told apart without colour"


def pytest_collection_modifyitems(session, config, items):
    by_notebook = {}
    for item in items:
        if isinstance(item, IPyNbCell):  # nbval's item for one code cell
            item.output_timeout = config.option.nbval_cell_timeout  # nbval's own: 5 s
            by_notebook.setdefault(item.parent, []).append(item)
    for notebook, cells in by_notebook.items():
        reports = [FiguresReport.from_parent(notebook, name="figures", cells=cells)]
        if any(STUB.search(c.cell.source) for c in cells):
            reports.insert(0, StubsReport.from_parent(notebook, name="stubs", cells=cells))
        at = items.index(cells[-1]) + 1
        items[at:at] = reports
