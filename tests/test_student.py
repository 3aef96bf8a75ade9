"""make student: solutions become stubs and nothing else changes. That the student notebooks run,
and what their stubs print, is checked by `make notebooks` (nbval over them, tests/nbval_stubs.py)."""

import ast
import json
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, cell_source, load_notebook, notebook_paths
from coursekit.seedscan import parse_cell
from coursekit.student import (
    BEGIN,
    END,
    HIDE,
    answers_shown_early,
    make_student_notebook,
    strip_solutions,
    write_student_book,
)

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


def test_worked_solutions_and_the_solutions_check_output_are_removed():
    text = "```{exercise} Derive it\n:label: ex-d\n\nWhy?\n```\n\n````{solution} ex-d\n:class: dropdown\n\n"
    text += "```python\nanswer = 42\n```\n````\n\nAfter."
    passed = [{"output_type": "stream", "name": "stdout", "text": "PASS"}]
    nb = {
        "cells": [
            {"cell_type": "markdown", "source": text},
            {"cell_type": "code", "source": f"{BEGIN}\nf = 1\n{END}\n", "outputs": passed, "execution_count": 1},
            {"cell_type": "code", "source": "checks.check_f(f)", "outputs": passed, "execution_count": 2},
            {"cell_type": "code", "source": "plot()", "outputs": passed, "execution_count": 3},
        ]
    }
    out = make_student_notebook(nb)
    md = out["cells"][0]["source"]
    assert "{exercise} Derive it" in md and "Why?" in md and "After." in md
    assert "solution" not in md and "42" not in md
    assert out["cells"][2]["outputs"] == [], "the check's PASS came from the solution, not the student"
    assert out["cells"][3]["outputs"] == passed, "other outputs stay"


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
    subprocess.run([sys.executable, "-m", "coursekit.student", str(ROOT / "chapters"), str(dest)], check=True)
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
        if "{solution}" in src:  # a worked solution in the text goes; the rest of the cell stays
            assert "{solution}" not in out
            assert out.strip() in src and ("{exercise}" in out) == ("{exercise}" in src)
            continue
        if BEGIN not in src:
            assert out == src, "a cell without a solution must stay as it is"
            continue
        assert BEGIN not in out and END not in out and "NotImplementedError" in out
        solution = src.split(BEGIN)[1].split(END)[0]
        for line in solution.splitlines():
            if line.strip() and not line.strip().startswith("#"):
                assert line not in out.splitlines(), f"solution line survived: {line!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_exercise_is_answered_before_it_in_the_student_edition(path):
    """Exercise first, reveal after: no earlier cell shows a line of a solution (the same line, or
    one of the same shape under other names) or prints library source."""
    found = answers_shown_early(load_notebook(path))
    assert not found, "\n".join(found)


def test_answers_shown_early_finds_a_renamed_line_and_getsource_but_not_the_solution_itself():
    def code(source):
        return {"cell_type": "code", "source": source, "outputs": [], "execution_count": None, "metadata": {}}

    exercise = code(f"def f(x, eps):\n    {BEGIN}\n    return (x - x.mean()) / np.sqrt(x.var() + eps)\n    {END}\n")
    early = code("y = (z - z.mean()) / np.sqrt(z.var() + 1e-5)  # the answer, renamed\n")
    shown = {"cells": [early, exercise]}
    assert len(answers_shown_early(shown)) == 1 and "cell 0" in answers_shown_early(shown)[0]
    assert answers_shown_early({"cells": [exercise, early]}) == [], "after the exercise is fine"
    other = code("y = (z - z.min()) / np.sqrt(z.var() + 1e-5)\n")  # another computation
    assert answers_shown_early({"cells": [other, exercise]}) == []
    printed = code("print(inspect.getsource(library.f))\n")
    assert "getsource" in answers_shown_early({"cells": [printed, exercise]})[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_exercise_code_is_folded_on_the_instructor_website_and_shown_as_a_stub(path):
    nb, student = load_notebook(path), make_student_notebook(load_notebook(path))
    for cell, stub in zip(nb["cells"], student["cells"]):
        if cell["cell_type"] == "code" and BEGIN in cell_source(cell):
            assert HIDE in cell["metadata"].get("tags", []), f"tag the exercise cell {cell['id']} {HIDE}"
            assert HIDE not in stub["metadata"].get("tags", [])


def _stubbed_names(nb):
    """{name: index of the cell that defines it} for every function or class a solution block is in."""
    names = {}
    for i, c in enumerate(nb["cells"]):
        src = cell_source(c)
        if c["cell_type"] == "code" and BEGIN in src:
            names.update({n: i for n in re.findall(r"^(?:def|class) (\w+)", src, re.MULTILINE)})
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_a_stubbed_function_is_only_called_through_a_self_check_or_solution_or_reference(path):
    """What makes "Run All" finish on a student notebook: the stubs raise only when called, and
    every later cell hands them to a self-check (which tolerates the stub) or to
    checks.solution_or_reference (which falls back to the course's reference)."""
    nb = load_notebook(path)
    stubbed = _stubbed_names(nb)
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] != "code" or i in stubbed.values():
            continue
        tree = parse_cell(cell_source(c))
        allowed = set()  # the Name nodes handed to a self-check or to solution_or_reference
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if func.startswith("check_"):  # a check may take the student's helpers too
                    allowed.update(id(a) for a in node.args)
                elif func == "solution_or_reference":
                    allowed.update(id(a) for a in node.args[:1])
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in stubbed:
                assert id(node) in allowed, (
                    f"cell {i}, line {node.lineno}: the stubbed {node.id} is used outside a self-check "
                    "(pass it through checks.solution_or_reference)")


def test_student_book_sources_keep_outputs_and_drop_solutions(tmp_path):
    """`make student-book`'s sources: the executed notebook, stubbed, execution off, Colab on its branch."""
    root, executed, dest = tmp_path / "book", tmp_path / "executed", tmp_path / "student"
    (root / "chapters" / "a").mkdir(parents=True)
    (root / "_ext").mkdir()
    (root / "_ext" / "ext.py").write_text("def setup(app):\n    pass\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapters/a/lab\n")
    (root / "_config.yml").write_text(
        "title: T\nexecute:\n  execute_notebooks: force\nlaunch_buttons:\n  colab_url: https://colab\n"
        "repository:\n  url: https://github.com/o/r\n  branch: colab\n"
        "bibtex_bibfiles: [refs.bib]\nsphinx:\n  local_extensions:\n    ext: _ext\n"
    )
    (root / "refs.bib").write_text("")
    (root / "intro.md").write_text("# Intro\n\n````{solution} ex-a\n:class: dropdown\n\nThe key.\n````\n\nAfter.\n")
    plot = {"output_type": "display_data", "data": {"text/plain": "<figure>"}, "metadata": {}}
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": "```{exercise} Double\n```"},
        {"cell_type": "code", "metadata": {}, "execution_count": 1, "source": f"{BEGIN}\ny = 2\n{END}\n",
         "outputs": [{"output_type": "stream", "name": "stdout", "text": "the solution's output"}]},
        {"cell_type": "code", "metadata": {}, "execution_count": 2, "source": "plot()", "outputs": [plot]},
        {"cell_type": "code", "metadata": {}, "execution_count": 3, "source": 'glue("acc", 0.9)', "outputs": []},
    ]
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    with pytest.raises(FileNotFoundError, match="make book"):
        write_student_book(root, dest, executed)
    (executed / "chapters" / "a").mkdir(parents=True)
    (executed / "chapters" / "a" / "lab.ipynb").write_text(json.dumps(nb))
    # myst-nb moves glued values out of the executed notebook; the student edition puts them back
    prefix = "application/papermill.record/"
    scrap = {"scrapbook": {"name": "acc", "mime_prefix": prefix}}
    glued = {"acc": {"output_type": "display_data", "metadata": scrap, "data": {"text/plain": "0.9"}}}
    (executed / "chapters" / "a" / "lab.glue.json").write_text(json.dumps(glued))
    assert write_student_book(root, dest, executed) == [dest / "chapters" / "a" / "lab.ipynb"]
    out = load_notebook(dest / "chapters" / "a" / "lab.ipynb")
    assert "NotImplementedError" in cell_source(out["cells"][1]) and not out["cells"][1]["outputs"]
    assert out["cells"][2]["outputs"] == [plot], "outputs of other cells stay (figures, glued numbers)"
    assert out["cells"][3]["outputs"] == [{"output_type": "display_data", "metadata": scrap,
                                          "data": {prefix + "text/plain": "0.9"}}], "the glued value is back"
    config = yaml.safe_load((dest / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["repository"]["branch"] == "colab-student", "Colab buttons open the stubbed edition"
    assert config["title"] == "T (student edition)"
    assert (dest / "intro.md").exists() and (dest / "refs.bib").exists() and (dest / "_ext" / "ext.py").exists()
    page = (dest / "intro.md").read_text()
    assert "The key." not in page and "{solution}" not in page and "After." in page, "a page's solutions go"


def test_a_stub_too_wide_for_one_line_splits_its_message_and_reads_back_whole():
    from normlab.checks import STUB_SUFFIX, stub_messages

    message = "Exercise 2: Statistics per time step, or per example" + STUB_SUFFIX
    src = f"def f(x):\n    if x:\n        {BEGIN}\n        return x\n        {END}\n"
    out = strip_solutions(src, message)
    assert max(len(line) for line in out.splitlines()) <= 88
    assert "' (write your solution here)'" in out  # the suffix stays one phrase
    assert stub_messages(out) == [message]
    assert stub_messages(strip_solutions(src, "Exercise 1: f")) == ["Exercise 1: f"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(ROOT)) for p in NOTEBOOKS])
def test_no_student_code_line_is_wider_than_the_page(path, student_dir):
    student = load_notebook(student_dir / path.relative_to(ROOT / "chapters"))
    for i, cell in enumerate(student["cells"]):
        if cell["cell_type"] == "code":
            wide = [line for line in cell_source(cell).splitlines() if len(line) > 88]
            assert not wide, f"cell {i} of the student edition: {wide}"
