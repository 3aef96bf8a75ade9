"""The Colab editions that `make colab` writes (_build/colab, _build/colab-student): every lab, no
MyST left in any markdown cell, the chapters' own code (stubbed in the student edition), and
every link into the website pointing at a page and anchor that the built site has."""

import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cell_source, load_notebook, toc_files
from coursekit.colab import MYST
from coursekit.student import make_student_notebook

EDITIONS = {"main": ROOT / "_build" / "colab", "student": ROOT / "_build" / "colab-student"}
NOTEBOOKS = [d for d in toc_files() if (ROOT / f"{d}.ipynb").exists()]
BASE = yaml.safe_load((ROOT / "_config.yml").read_text())["html"]["baseurl"]
LINK = re.compile(r"\]\((" + re.escape(BASE) + r"[^)\s]*)\)")
CASES = [(e, d) for e in EDITIONS for d in NOTEBOOKS]


def edition(name, doc):
    path = EDITIONS[name] / f"{doc}.ipynb"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make colab`")
    return load_notebook(path)


@pytest.mark.parametrize("name, doc", CASES, ids=[f"{e}:{d}" for e, d in CASES])
def test_no_myst_survives_and_the_code_is_the_chapters(name, doc):
    nb = edition(name, doc)
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            found = MYST.search(cell_source(cell))
            assert not found, f"cell {i}: MyST left in the Colab edition: {found.group(0)!r}"
    source = load_notebook(ROOT / f"{doc}.ipynb")
    if name == "student":
        source = make_student_notebook(source)
    code = [cell_source(c) for c in nb["cells"] if c["cell_type"] == "code"]
    assert code == [cell_source(c) for c in source["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("doc", NOTEBOOKS)
def test_every_link_into_the_website_finds_its_page_and_anchor(doc):
    html = ROOT / "_build" / "html"
    for cell in edition("main", doc)["cells"]:
        for url in LINK.findall(cell_source(cell)):
            page, _, anchor = url[len(BASE):].partition("#")
            target = html / page
            assert target.is_file(), f"{url}: no page {page} in the built site"
            if anchor:
                assert f'id="{anchor}"' in Path(target).read_text(encoding="utf-8"), f"{url}: no anchor {anchor}"
