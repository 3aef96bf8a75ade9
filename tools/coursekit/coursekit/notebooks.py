"""Reading the course's notebooks and pages: a cell's source, a lab's exercises, the chapters' text.

The lowest layer of coursekit (it imports nothing else of it; a self-check cell is what
``normlab.checks.SELF_CHECK`` finds): :mod:`coursekit.course` estimates
a student's time from :func:`exercises` and finds exercise titles in :func:`chapter_markdown`;
:mod:`coursekit.grade` grades the cells :func:`exercises` names and reads rubrics from
:func:`chapter_markdown`; :mod:`coursekit.student` compares cells through :func:`cell_source`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from normlab.checks import SELF_CHECK

__all__ = ["cell_source", "exercises", "chapter_markdown"]

_DIRECTIVE = re.compile(r"^[`:]{3,}\{exercise\}[ \t]*(.*)$", re.MULTILINE)
_LABEL = re.compile(r"^\s*:label:\s*(\S+)", re.MULTILINE)


def cell_source(cell) -> str:
    """A cell's source as one string (nbformat stores it as a string or a list of lines)."""
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def exercises(nb) -> list[tuple[str, str, int | None, int | None]]:
    """(label, title, index of the student's cell, index of the self-check cell) per exercise.

    The student's cell is the first code cell after the directive, the self-check cell the first
    code cell after it that calls ``check_*``; both must come before the next markdown cell that
    opens another exercise. An exercise with no such cells has indices None (graded by hand).
    """
    cells, out = nb["cells"], []
    for i, cell in enumerate(cells):
        text = cell_source(cell)
        if cell["cell_type"] != "markdown" or not _DIRECTIVE.search(text):
            continue
        label = (_LABEL.search(text) or [None, f"exercise-{len(out) + 1}"])[1]
        title = _DIRECTIVE.search(text)[1].strip() or label
        work = check = None
        for j in range(i + 1, len(cells)):
            if cells[j]["cell_type"] == "markdown" and _DIRECTIVE.search(cell_source(cells[j])):
                break
            if cells[j]["cell_type"] != "code":
                if work is not None:
                    break  # the exercise's code ends at the first markdown cell after it
                continue
            if work is None:
                work = j
            elif SELF_CHECK.search(cell_source(cells[j])):
                check = j
                break
        if work is not None and check is None and SELF_CHECK.search(cell_source(cells[work])):
            check = work  # the self-check may sit in the student's cell itself
        out.append((label, title, work if check is not None else None, check))
    return out


def chapter_markdown(root) -> list[str]:
    """The text of every chapter page and of every markdown cell of the chapters' notebooks."""
    root = Path(root)
    texts = [p.read_text(encoding="utf-8") for p in sorted(root.glob("chapters/*/*.md"))]
    for path in sorted(root.glob("chapters/*/*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        texts += ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    return texts
