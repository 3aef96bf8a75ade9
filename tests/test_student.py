"""make student: solutions become stubs, nothing else changes, and student notebooks run."""

import json
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, cell_source, load_notebook, notebook_paths
from normlab.student import BEGIN, END, make_student_notebook, strip_solutions

NOTEBOOKS = [p for p in notebook_paths() if BEGIN in p.read_text(encoding="utf-8")]


def test_strip_solutions_keeps_the_indentation_and_the_rest_of_the_cell():
    src = "def f(x):\n    '''Doc.'''\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION\n\nprint(1)\n"
    out = strip_solutions(src, "Exercise 1: f")
    assert out == "def f(x):\n    '''Doc.'''\n    raise NotImplementedError('Exercise 1: f')\n\nprint(1)\n"


@pytest.mark.parametrize(
    "src, message",
    [
        (f"{BEGIN}\nx = 1\n", "never closed"),
        (f"x = 1\n{END}\n", "without"),
        (f"{BEGIN}\n{BEGIN}\n{END}\n", "inside another"),
    ],
)
def test_unbalanced_markers_are_an_error(src, message):
    with pytest.raises(ValueError, match=message):
        strip_solutions(src, "m")


def test_exercises_are_numbered_and_titled_from_their_directive():
    def code(source):
        return {"cell_type": "code", "source": source, "outputs": [], "execution_count": None}

    nb = {
        "cells": [
            {"cell_type": "markdown", "source": "```{exercise} The forward pass\n:label: a\n```"},
            code(f"def f():\n    {BEGIN}\n    pass\n    {END}\n"),
            {"cell_type": "markdown", "source": "```{exercise} The backward pass\n```"},
            code(f"{BEGIN}\ny = 2\n{END}\n"),
        ]
    }
    out = make_student_notebook(nb)
    assert "Exercise 1: The forward pass" in out["cells"][1]["source"]
    assert "Exercise 2: The backward pass" in out["cells"][3]["source"]
    assert BEGIN in nb["cells"][1]["source"], "the source notebook must not change"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    dest = tmp_path_factory.mktemp("student")
    subprocess.run([sys.executable, "-m", "normlab.student", str(ROOT / "chapters"), str(dest)], check=True)
    return dest


def test_there_are_notebooks_with_exercises():
    assert NOTEBOOKS, "no notebook under chapters/ has a solution block"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_solution_line_survives(path, student_dir):
    original = load_notebook(path)
    student = load_notebook(student_dir / path.relative_to(ROOT / "chapters"))
    assert len(student["cells"]) == len(original["cells"])
    for orig, stud in zip(original["cells"], student["cells"]):
        src, out = cell_source(orig), cell_source(stud)
        if BEGIN not in src:
            assert out == src, "a cell without a solution must stay as it is"
            continue
        assert BEGIN not in out and END not in out and "NotImplementedError" in out
        solution = src.split(BEGIN)[1].split(END)[0]
        for line in solution.splitlines():
            if line.strip() and not line.strip().startswith("#"):
                assert line not in out.splitlines(), f"solution line survived: {line!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_student_notebook_runs_up_to_its_first_exercise(path, student_dir):
    nb = nbformat.read(student_dir / path.relative_to(ROOT / "chapters"), as_version=4)
    stub = next(i for i, c in enumerate(nb.cells) if "raise NotImplementedError" in c.source)
    check = next(i for i in range(stub + 1, len(nb.cells)) if nb.cells[i].cell_type == "code")
    nb.cells = nb.cells[: check + 1]
    NotebookClient(nb, timeout=120, allow_errors=True, resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [
        (i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert [i for i, _ in errors] == [check], f"errors before the first exercise: {json.dumps(errors)[:2000]}"
    assert errors[0][1]["ename"] == "NotImplementedError"
    assert "Exercise 1" in errors[0][1]["evalue"]
