"""coursekit.course: chapters from the toc, the map's arrows from cross-references, recorded timings."""

import json
import re

import nbformat
import pytest

from conftest import ROOT
from coursekit import course

TOC = """\
format: jb-book
root: intro
parts:
  - caption: First
    numbered: true
    chapters:
      - file: chapters/a/index
        sections:
          - file: chapters/a/lab
      - file: chapters/b/index
  - caption: Second
    numbered: true
    chapters:
      - file: chapters/c/index
  - caption: Back matter
    chapters:
      - file: references
"""


@pytest.fixture
def tiny(tmp_path):
    """A three-chapter course: b links to a's label, c links to a and to b (a->c is implied)."""
    (tmp_path / "_toc.yml").write_text(TOC)
    pages = {
        "a": "# Alpha\n\n(a-label)=\n## Section\n",
        "b": "# Beta\n\nAs in {ref}`the section <a-label>`.\n",
        "c": "# Gamma\n\nSee {doc}`../a/index` and {doc}`Beta <../b/index>`; later {doc}`../c/index`.\n",
    }
    for name, text in pages.items():
        (tmp_path / "chapters" / name).mkdir(parents=True)
        (tmp_path / "chapters" / name / "index.md").write_text(text)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("(lab-label)=\n# Lab"), nbformat.v4.new_code_cell("x = 1 + 1")]
    nbformat.write(nb, tmp_path / "chapters" / "a" / "lab.ipynb")
    return tmp_path


def test_chapters_come_from_the_toc_with_titles_parts_and_links(tiny):
    chs = course.chapters(tiny)
    assert [(c.number, c.folder, c.title, c.part) for c in chs] == [
        (1, "a", "Alpha", "First"),
        (2, "b", "Beta", "First"),
        (3, "c", "Gamma", "Second"),
    ]
    assert chs[0].pages == ["chapters/a/index", "chapters/a/lab"]
    assert [c.builds_on for c in chs] == [[], ["a"], ["a", "b"]]  # a link to itself is not a dependency
    assert course._direct(chs) == [("a", "b"), ("b", "c")]  # a -> c follows from a -> b -> c
    assert course.toc_files(tiny) == ["intro", "chapters/a/index", "chapters/a/lab", "chapters/b/index",
                                      "chapters/c/index", "references"]


def test_the_map_has_a_linked_box_per_chapter_and_an_arrow_per_direct_link(tiny):
    svg = course.course_map_svg(tiny)
    assert svg.startswith("<svg")
    for name in "abc":
        assert f'id="chapter-{name}"' in svg
        assert f'xlink:href="chapters/{name}/index.html"' in svg
    assert 'id="builds-on-a-b"' in svg and 'id="builds-on-b-c"' in svg
    assert 'id="builds-on-a-c"' not in svg
    assert "Gamma" in svg  # titles stay text (searchable, accessible)


def test_bad_input_is_named(tmp_path, tiny):
    with pytest.raises(ValueError, match="no _toc.yml"):
        course.chapters(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="scale"):
        course.time_notebooks(tiny, scale="medium")
    with pytest.raises(ValueError, match="no notebook"):
        course.time_notebooks(tiny, only="zzz")
    (tiny / "chapters" / "b" / "index.md").write_text("no title here\n")
    with pytest.raises(ValueError, match="no '# ' title"):
        course.chapters(tiny)


def test_timings_execute_each_notebook_and_are_recorded(tiny, capsys):
    assert course.load_timings(tiny, "quick") is None
    assert course.main(["timings", "--root", str(tiny)]) == 0
    record = course.load_timings(tiny, "quick")
    assert list(record["seconds"]) == ["chapters/a/lab.ipynb"]
    assert 0 < record["seconds"]["chapters/a/lab.ipynb"] < 60
    assert record["scale"] == "quick" and record["machine"]["cores"] >= 1
    assert "1 notebooks" in capsys.readouterr().out


def test_timings_calibrated_on_a_recorded_notebook_scale_the_new_times(tiny, capsys):
    lab = "chapters/a/lab.ipynb"
    (tiny / "timings").mkdir(exist_ok=True)
    (tiny / "timings" / "quick.json").write_text(json.dumps({"scale": "quick", "seconds": {lab: 0.5}}))
    assert course.main(["timings", "--root", str(tiny), "--only", "chapters/a", "--calibrate", lab]) == 0
    record = course.load_timings(tiny, "quick")
    cal = record["calibrated"][lab]
    assert cal["yardstick"] == lab and cal["recorded_s"] == 0.5 and cal["measured_s"] > 0 and cal["date"]
    assert cal["factor"] == pytest.approx(0.5 / cal["measured_s"], abs=5.01e-4)  # recorded to 3 decimals
    assert record["seconds"][lab] == pytest.approx(cal["raw_s"] * 0.5 / cal["measured_s"], abs=0.051)
    assert "scaled by" in capsys.readouterr().out
    # an entry stays until its notebook is re-timed; a plain re-timing makes it raw again
    other = {"raw_s": 9.0, "factor": 0.5, "yardstick": lab, "recorded_s": 0.5, "measured_s": 1.0, "date": "d"}
    path = tiny / "timings" / "quick.json"
    path.write_text(json.dumps({**record, "seconds": {**record["seconds"], "chapters/b/y.ipynb": 4.5},
                                "calibrated": {**record["calibrated"], "chapters/b/y.ipynb": other}}))
    assert course.main(["timings", "--root", str(tiny), "--only", "chapters/a"]) == 0
    assert course.load_timings(tiny, "quick")["calibrated"] == {"chapters/b/y.ipynb": other}
    with pytest.raises(SystemExit):  # a calibration notebook without a recorded time
        course.main(["timings", "--root", str(tiny), "--only", "chapters/a", "--calibrate", "chapters/b/x.ipynb"])


# The course itself.

CHAPTERS = course.chapters(ROOT)


def test_every_chapter_after_the_first_builds_on_an_earlier_one():
    """The map is connected: each chapter's page links back to a chapter it builds on."""
    lonely = [c.folder for c in CHAPTERS[1:] if not c.builds_on]
    assert not lonely, f"chapters that link to no earlier chapter: {lonely}"


def test_recorded_quick_timings_cover_every_notebook_within_budget():
    record = course.load_timings(ROOT, "quick")
    assert record, "no timings/quick.json: run `make timings` and commit it"
    notebooks = [f"{p}.ipynb" for c in CHAPTERS for p in c.pages[1:]]
    assert sorted(record["seconds"]) == sorted(notebooks), "timings/quick.json is stale: run `make timings`"
    slow = {k: v for k, v in record["seconds"].items() if v > 60}
    assert not slow, f"notebooks over the 60 s budget: {slow}"
    # COURSE.md's 8 minutes were set for nine chapters; Chapter 10's three labs (issue 23) need about
    # 75 s, and no chapter's evidence was cut to make room: 9 minutes, as the README says.
    assert sum(record["seconds"].values()) <= 9 * 60, "all notebooks together exceed the 9-minute budget"


def test_the_instructor_guide_times_only_notebooks_that_exist():
    text = (ROOT / "instructors.md").read_text(encoding="utf-8")
    named = [p for role in re.findall(r"\{nbtime\}`([^`]+)`", text) for p in role.split()]
    assert named, "the instructor guide shows no measured time"
    for path in named:
        assert (ROOT / f"{path}.ipynb").exists(), f"instructors.md times {path}, which does not exist"
    assert "```{notebook-times}" in text
    full = ROOT / "timings" / "full.json"
    if full.exists():  # a full-scale record, where there is one, is for notebooks of the course
        assert set(json.loads(full.read_text())["seconds"]) <= {f"{p}.ipynb" for c in CHAPTERS for p in c.pages}


def test_student_minutes_count_reading_and_each_kind_of_exercise():
    from coursekit.course import STUDENT_MINUTES, student_minutes

    def md(text):
        return {"cell_type": "markdown", "metadata": {}, "source": text}

    def code(text):
        return {"cell_type": "code", "metadata": {}, "source": text, "outputs": [], "execution_count": None}

    words = " ".join(["word"] * STUDENT_MINUTES["words per minute"])  # one minute of reading
    nb = {"cells": [
        md(words),
        md("```{exercise} Write\n:label: ex-a\n```"), code("def f():\n    pass"), code("checks.check_f(f)"),
        md("```{exercise} Train\n:label: ex-b\n:class: integration\n```"), code("g = 1"), code("checks.check_g(g)"),
        md("```{exercise} Derive\n:label: ex-c\n\nOn paper.\n```"),
    ]}
    est = student_minutes(nb)
    assert est["exercises"] == {"code": 1, "integration": 1, "by hand": 1}
    expected = STUDENT_MINUTES["code"] + STUDENT_MINUTES["integration"] + STUDENT_MINUTES["by hand"]
    assert est["reading"] == 1 and abs(est["total"] - 1 - expected) <= 1


def test_every_exercise_has_a_title_for_its_links():
    """The instructor guide's links read "Exercise N (title)"; an untitled exercise would read
    "Exercise N" alone."""
    from coursekit.course import exercise_titles
    from coursekit.grade import exercises

    titles = exercise_titles(ROOT)
    labels = [label for p in sorted((ROOT / "chapters").glob("*/*.ipynb"))
              for label, *_ in exercises(json.loads(p.read_text(encoding="utf-8")))]
    assert labels and not [label for label in labels if label not in titles]
    assert titles["ex-scratch-forward"] == "The forward pass" and "q-scratch-1" in titles
