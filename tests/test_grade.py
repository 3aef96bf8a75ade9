"""python -m coursekit.grade: each exercise is passed, failed, not attempted or graded by hand."""

import json

import nbformat
import pytest

from conftest import ROOT, load_notebook, notebook_paths
from coursekit.grade import exercises, main
from coursekit.student import BEGIN, make_student_notebook

NOTEBOOKS = [p for p in notebook_paths() if "{exercise}" in p.read_text(encoding="utf-8")]


def exercise_md(title, label):
    return nbformat.v4.new_markdown_cell(f"```{{exercise}} {title}\n:label: {label}\n\nDo it.\n```")


def exercise(title, label, *code):
    """An exercise's cells: its directive, then one code cell for each source (the work, the check)."""
    return [exercise_md(title, label), *(nbformat.v4.new_code_cell(source) for source in code)]


def test_grading_a_handed_in_notebook(tmp_path):
    check = (
        "def check_double(f):\n"
        "    got = f(3)\n"
        "    if got != 6:\n"
        "        raise AssertionError(f'double(3): got {got}, expected 6')\n"
        "    print('passed')\n"
    )
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(check),
        *exercise("Right", "ex-right", "def a(x):\n    return 2 * x", "check_double(a)"),
        *exercise("Wrong", "ex-wrong", "def b(x):\n    return x + 2", "check_double(b)"),
        *exercise("Untouched", "ex-stub", "def c(x):\n    raise NotImplementedError('Exercise 3: Untouched')",
                  "check_double(c)"),
        *exercise("Untouched, with a course self-check", "ex-stub-course",
                  "def e(scale):\n    raise NotImplementedError('Exercise 4: Growth')",
                  "from normlab import checks\nchecks.check_block_growth(e)\nprint('ran on')"),
        *exercise("Crashes", "ex-crash", "d = undefined_name", "check_double(d)"),
        exercise_md("Explain", "ex-prose"),
        nbformat.v4.new_markdown_cell("Write your answer here."),
    ]
    path = tmp_path / "handed_in.ipynb"
    nbformat.write(nb, path)
    report = tmp_path / "report.json"
    assert main([str(path), "--json", str(report), "--timeout", "60"]) == 1  # not everything passed
    got = {e["label"]: e for e in json.loads(report.read_text())[str(path)]["exercises"]}
    assert {k: e["status"] for k, e in got.items()} == {
        "ex-right": "passed",
        "ex-wrong": "failed",
        "ex-stub": "not attempted",
        "ex-stub-course": "not attempted",
        "ex-crash": "failed",
        "ex-prose": "by hand",
    }
    assert "got 5, expected 6" in got["ex-wrong"]["message"]
    assert "NameError" in got["ex-crash"]["message"]
    assert json.loads(report.read_text())[str(path)]["passed"] == 1


def test_a_notebook_without_exercises_is_an_error(tmp_path, capsys):
    path = tmp_path / "empty.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), path)
    assert main([str(path)]) == 2
    assert "nothing to grade" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.ipynb")]) == 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(ROOT)) for p in NOTEBOOKS])
def test_the_grader_finds_every_exercise_of_the_course(path):
    """Each coded exercise maps to the cell with the solution and a cell that runs a self-check, so a
    student notebook's stub lands in the cell the grader reads."""
    nb = load_notebook(path)
    student = make_student_notebook(nb)
    for label, _title, work, check in exercises(nb):
        if work is None:
            continue  # a derivation: graded by hand
        assert BEGIN in "".join(nb["cells"][work]["source"]), f"{label}: the student's cell has no solution"
        assert "NotImplementedError" in "".join(student["cells"][work]["source"]), label
        assert "check_" in "".join(nb["cells"][check]["source"]), f"{label}: no self-check after the solution"
    coded = [e for e in exercises(nb) if e[2] is not None]
    solutions = sum(BEGIN in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert len(coded) == solutions, "a solution block that no exercise directive owns would not be graded"


def test_rubrics_come_from_the_worked_solutions_of_pages_and_notebooks(tmp_path):
    from coursekit.grade import rubrics

    (tmp_path / "chapters" / "a").mkdir(parents=True)
    page = ("# A\n\n```{exercise} Why\n:label: q-a-1\n\nWhy?\n```\n\n````{solution} q-a-1\n:class: dropdown\n\n"
            "**Answer key.** Because.\n\n**Rubric (2 points).** 1 point for the reason;\n1 point for the example.\n"
            "````\n")
    (tmp_path / "chapters" / "a" / "index.md").write_text(page)
    cell = {"cell_type": "markdown", "metadata": {},
            "source": "```{solution} ex-a-derive\n:class: dropdown\n\nDifferentiate $x^2$.\n```"}
    (tmp_path / "chapters" / "a" / "lab.ipynb").write_text(json.dumps({"cells": [cell]}))
    found = rubrics(tmp_path)
    assert found == {"q-a-1": "**Rubric (2 points).** 1 point for the reason; 1 point for the example.",
                     "ex-a-derive": "Differentiate $x^2$."}
    assert "ex-scratch-derive" in rubrics(), "the course's own pen-and-paper exercise has a key"


def test_grade_lists_the_written_questions_with_their_rubrics(capsys):
    assert main(["--questions"]) == 0
    out = capsys.readouterr().out
    assert "q-scratch-1" in out and "Rubric" in out
