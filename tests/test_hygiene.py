"""The repository's conventions: clean notebooks, a complete toc, the standard first cell, citations,
and the split between the library students install (code/normlab) and the maintainers' tooling
(tools/coursekit)."""

import ast
import fnmatch
import re

import pytest
import tomllib
import yaml

from conftest import ROOT, assert_no_cycle, cell_source, load_notebook, notebook_paths, toc_files
from coursekit.seedscan import parse_cell
from normlab.checks import SELF_CHECK

NOTEBOOKS = notebook_paths()
IDS = [str(p.relative_to(ROOT)) for p in NOTEBOOKS]


def test_there_are_notebooks_to_check():
    assert NOTEBOOKS, "no notebooks under chapters/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_stored_without_outputs(path):
    for i, cell in enumerate(load_notebook(path)["cells"]):
        if cell["cell_type"] == "code":
            assert not cell["outputs"], f"cell {i} has outputs: strip them (the book executes notebooks)"
            assert cell["execution_count"] is None, f"cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_cell_rebinds_an_imported_name(path):
    """``checks = ...`` after ``from normlab import checks`` breaks every self-check run after it."""
    imported, rebound = set(), []
    for i, cell in enumerate(load_notebook(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(parse_cell(cell_source(cell))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id in imported:
                rebound.append(f"cell {i}: {node.id}")
    assert not rebound, f"names imported earlier are assigned again: {rebound}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_in_the_toc(path):
    assert str(path.relative_to(ROOT).with_suffix("")) in toc_files()


def test_every_toc_entry_exists():
    for entry in toc_files():
        found = [ROOT / f"{entry}{ext}" for ext in (".md", ".ipynb") if (ROOT / f"{entry}{ext}").exists()]
        assert len(found) == 1, f"_toc.yml names {entry}: expected one .md or .ipynb, found {found}"


def test_every_chapter_folder_has_a_narrative_page():
    for folder in (ROOT / "chapters").iterdir():
        if folder.is_dir():
            assert (folder / "index.md").exists(), f"{folder.name}/ has no index.md"


def _labs_before_claims(text):
    """Whether a chapter page lists its labs (a Labs section holding the toc) before its Claims box."""
    marks = ("\n## Labs\n", "```{tableofcontents}", "\n## Claims, checked\n")
    labs, toc, claims = (text.find(s) for s in marks)
    return -1 < labs < toc < claims


def test_every_chapter_lists_its_labs_before_its_claims_box():
    """Sphinx numbers a page's sub-pages where its toctree sits: in the Labs section, the labs are part of
    the chapter (5.6.1, ...); left at the page's end, after "Claims, checked" and the Questions (5.9)."""
    with_labs = {f.split("/")[1] for f in toc_files() if f.startswith("chapters/") and "/lab" in f}
    assert with_labs
    for chapter in sorted(with_labs):
        text = (ROOT / "chapters" / chapter / "index.md").read_text()
        where = f"chapters/{chapter}/index.md"
        assert _labs_before_claims(text), f"{where}: no Labs section with its toc before the Claims box"


def test_the_labs_rule_sees_a_toc_left_at_the_end():
    good = "# C\n\n## Labs\n\n```{tableofcontents}\n```\n\n## Claims, checked\n\n## Questions\n"
    assert _labs_before_claims(good)
    assert not _labs_before_claims("# C\n\n## Claims, checked\n\n## Questions\n")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_cell_has_a_unique_id(path):
    """nbformat 4.5 requires cell ids (a missing one is a warning today, an error in later nbformat)."""
    ids = [c.get("id") for c in load_notebook(path)["cells"]]
    assert None not in ids, f"cells without an id: {[i for i, x in enumerate(ids) if x is None]}"
    assert len(set(ids)) == len(ids), "duplicate cell ids"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_first_code_cell_is_the_standard_one(path, config):
    cells = [c for c in load_notebook(path)["cells"] if c["cell_type"] == "code"]
    first = cell_source(cells[0])
    url = config["repository"]["url"]
    assert 'if "google.colab" in sys.modules:' in first
    installs = [line.strip() for line in first.splitlines() if "pip install" in line]
    # Colab installs normlab from the repository named in _config.yml, and nothing else (never torch);
    # IPython puts the variable into the magic, so that no line is wider than the page's code column.
    assert f'    repo = "git+{url}"\n' in first
    assert installs == ['%pip install -q "normlab @ {repo}#subdirectory=code"'], installs
    assert "import normlab" in first
    assert re.search(r"^ctx = normlab\.setup\(\)$", first, re.MULTILINE)


def test_colab_launch_buttons_are_configured_from_the_repository(config):
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", config["repository"]["url"])
    assert config["repository"]["branch"]


def cited_keys():
    texts = [p.read_text(encoding="utf-8") for p in ROOT.glob("*.md")]
    texts += [p.read_text(encoding="utf-8") for p in (ROOT / "chapters").rglob("*.md")]
    for path in NOTEBOOKS:
        texts += [cell_source(c) for c in load_notebook(path)["cells"] if c["cell_type"] == "markdown"]
    keys = set()
    for text in texts:
        for group in re.findall(r"\{cite(?::\w+)?\}`([\w\-:, ]+)`", text):
            keys.update(k.strip() for k in group.split(","))
    return keys


def test_every_citation_key_exists_in_references_bib():
    bib = set(re.findall(r"^@\w+\{([^,]+),", (ROOT / "references.bib").read_text(), re.MULTILINE))
    keys = cited_keys()
    assert keys, "no citations found at all"
    assert keys <= bib, f"cited but not in references.bib: {sorted(keys - bib)}"


def markdown_texts():
    texts = [(p.name, p.read_text(encoding="utf-8")) for p in ROOT.glob("*.md")]
    texts += [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in (ROOT / "chapters").rglob("*.md")]
    return texts


def test_every_glue_from_another_page_names_a_format():
    """myst-nb splits "nb.ipynb::key" at its last colon when no format follows, and finds no key."""
    bare = [(name, m.group(0)) for name, text in markdown_texts()
            for m in re.finditer(r"\{glue(?::\w+)?\}`[^`:]+::[^`:]+`", text)]
    assert not bare, f"cross-page glue without a format (add :d, :s, :.1f ...): {bare}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_solution_block_is_closed_and_followed_by_a_self_check(path):
    cells = [c for c in load_notebook(path)["cells"]]
    for i, cell in enumerate(cells):
        src = cell_source(cell)
        if cell["cell_type"] == "code" and "# BEGIN SOLUTION" in src:
            assert src.count("# BEGIN SOLUTION") == src.count("# END SOLUTION"), f"cell {i}"
            nxt = next(c for c in cells[i + 1 :] if c["cell_type"] == "code")
            assert SELF_CHECK.search(cell_source(nxt)), f"cell {i}: the next code cell should call a self-check"


def test_the_publishing_workflow_tests_every_change_and_publishes_only_main(config):
    """.github/workflows/publish.yml: pushes and pull requests run the README's `make test` (through
    .ci/run); only a push to main deploys the site and pushes the Colab editions, whose branch is
    read from _config.yml (named there once), never typed into the workflow."""
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text())
    triggers = flow[True]  # YAML 1.1 reads the key `on` as True
    assert triggers["push"]["branches"] == ["main"] and "pull_request" in triggers
    assert flow["permissions"] == {}, "no job gets a permission it does not ask for"
    jobs = flow["jobs"]
    assert any(step.get("run") == ".ci/run" for step in jobs["test"]["steps"])
    assert jobs["test"]["permissions"] == {"contents": "read"}
    for name in ("pages", "colab"):
        assert jobs[name]["needs"] == "test"
        assert jobs[name]["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    text = (ROOT / ".github" / "workflows" / "publish.yml").read_text()
    assert '["repository"]["branch"]' in text and "student_branch(branch)" in text, "branches come from _config.yml"
    assert config["repository"]["branch"] not in ("main", "master")


TOOLING = ROOT / "tools" / "coursekit" / "coursekit"


def imported_modules(tree):
    """The absolute names of the modules that a parsed source imports, anywhere in it (lazy imports too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_library_never_imports_the_tooling():
    """coursekit imports normlab, never the reverse: Colab installs normlab alone."""
    found = []
    for path in sorted((ROOT / "code" / "normlab").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [f"{path.relative_to(ROOT)}: {name}" for name in sorted(imported_modules(tree))
                  if name == "coursekit" or name.startswith("coursekit.")]
    assert not found, f"normlab imports the maintainers' tooling: {found}"


def test_the_library_package_holds_no_tooling():
    """code/pyproject.toml packages normlab only, and none of coursekit's modules sits in code/normlab."""
    project = tomllib.loads((ROOT / "code" / "pyproject.toml").read_text(encoding="utf-8"))
    packages = project["tool"]["setuptools"]["packages"]  # a list, or a find table with its include patterns
    listed = packages if isinstance(packages, list) else packages["find"]["include"]
    assert listed and all(p.startswith("normlab") for p in listed), listed
    assert not any(fnmatch.fnmatch(name, p) for p in listed for name in ("coursekit", "coursekit.course")), listed
    modules = sorted(p.stem for p in TOOLING.glob("*.py") if p.stem != "__init__")
    assert {"course", "student", "grade", "colab", "seedscan", "cells"} <= set(modules), modules
    stray = [m for m in modules if (ROOT / "code" / "normlab" / f"{m}.py").exists()]
    assert not stray, f"tooling modules in the library: {stray}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_notebook_imports_the_tooling(path):
    """Colab installs normlab alone, so a notebook that imported coursekit would fail there."""
    for i, cell in enumerate(load_notebook(path)["cells"]):
        if cell["cell_type"] == "code":
            names = imported_modules(parse_cell(cell_source(cell)))
            assert not any(n.split(".")[0] == "coursekit" for n in names), f"cell {i} imports coursekit"


def test_the_tooling_imports_its_own_modules_one_way():
    """No import cycle inside coursekit, lazy imports included: a helper two modules share lives
    in a lower one (coursekit.notebooks), not in either of them."""
    modules = {p.stem for p in TOOLING.glob("*.py") if p.stem != "__init__"}
    deps = {}
    for m in modules:
        tree = ast.parse((TOOLING / f"{m}.py").read_text(encoding="utf-8"))
        deps[m] = {n.split(".")[1] for n in imported_modules(tree)
                   if n.startswith("coursekit.") and n.split(".")[1] in modules} - {m}
    assert_no_cycle(deps)


def _log_axes_and_tick_setters(tree):
    """The calls of a cell that put an axis on a log scale, and those that set ticks."""
    logs, ticks = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name = node.func.attr
        literal = [a.value for a in node.args if isinstance(a, ast.Constant)]
        if name in ("loglog", "semilogx", "semilogy") or (name in ("set_xscale", "set_yscale") and "log" in literal):
            logs.append(name)
        if name == "set" and any(k.arg in ("xscale", "yscale") and isinstance(k.value, ast.Constant)
                                 and k.value.value == "log" for k in node.keywords):
            logs.append("set(xscale/yscale='log')")
        if name in ("set_xticks", "set_yticks"):
            ticks.append(name)
        if name == "set":  # ticks and a log scale for the same axis in one call
            kw = {k.arg: k.value for k in node.keywords}
            ticks += [f"set({a}ticks)" for a in "xy" if f"{a}ticks" in kw
                      and isinstance(kw.get(f"{a}scale"), ast.Constant) and kw[f"{a}scale"].value == "log"]
    return logs, ticks


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_ticks_on_a_log_axis_are_set_with_log_axis(path):
    """Ticks a lab sets on a log axis by hand share it with matplotlib's minor labels (3x10^1, ...)."""
    for i, cell in enumerate(load_notebook(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        logs, ticks = _log_axes_and_tick_setters(parse_cell(cell_source(cell)))
        assert not (logs and ticks), (
            f"cell {i} sets ticks ({ticks}) beside a log scale ({logs}): use "
            "normlab.runtime.plotting.log_axis(ax, axis, ticks=...)")


def test_the_log_axis_rule_sees_the_pattern_it_forbids():
    src = 'ax.set(xscale="log", xlabel="B")\nax.set_xticks(sizes, [str(s) for s in sizes])'
    assert _log_axes_and_tick_setters(parse_cell(src)) == (["set(xscale/yscale='log')"], ["set_xticks"])
    assert _log_axes_and_tick_setters(parse_cell('ax.loglog(b, m)\nlog_axis(ax, "x", ticks=b)')) == (["loglog"], [])
    one_call = 'ax.set(xscale="log", xticks=sizes, xticklabels=sizes)'
    assert _log_axes_and_tick_setters(parse_cell(one_call)) == (["set(xscale/yscale='log')"], ["set(xticks)"])
    other_axis = 'ax.set(yscale="log", xticks=range(5))'
    assert _log_axes_and_tick_setters(parse_cell(other_axis)) == (["set(xscale/yscale='log')"], [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_code_line_is_wider_than_the_page(path):
    """88 characters, ruff's line length for notebooks, magics and comments included: the website's
    code column shows that much without scrolling sideways."""
    for i, cell in enumerate(load_notebook(path)["cells"]):
        if cell["cell_type"] == "code":
            wide = [line for line in cell_source(cell).splitlines() if len(line) > 88]
            assert not wide, f"cell {i} has lines over 88 characters: {wide}"


def _bar_axis_floors(tree):
    """The lower y-limits (ylim=(lo, ...), set_ylim(lo, ...)) of a cell that draws bars; None if it draws none."""
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    if not any(c.func.attr in ("bar", "barh") for c in calls):
        return None
    floors = []
    for c in calls:
        if c.func.attr == "set_ylim" and c.args:
            floors.append(c.args[0])
        floors += [k.value.elts[0] for k in c.keywords
                   if k.arg == "ylim" and isinstance(k.value, ast.Tuple) and k.value.elts]
    return [ast.literal_eval(f) if isinstance(f, ast.Constant) else ast.unparse(f) for f in floors]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_bar_charts_start_at_zero(path):
    """A bar's length is its value: an axis cut at 0.4 makes a two-point difference look like a doubling."""
    for i, cell in enumerate(load_notebook(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        floors = _bar_axis_floors(parse_cell(cell_source(cell))) or []
        assert all(f in (0, None) for f in floors), f"cell {i} draws bars on an axis cut at {floors}"


def test_the_bar_rule_sees_a_cut_axis():
    src = "ax.bar(0, 0.9)\nax.set(ylim=(0.4, None))\nax2.set_ylim(lo - 5, None)"
    assert sorted(map(str, _bar_axis_floors(parse_cell(src)))) == ["0.4", "lo - 5"]
    assert _bar_axis_floors(parse_cell("ax.plot([1], [2])\nax.set(ylim=(0.4, 1))")) is None


FIGURE = re.compile(r"\bplt\.(subplots|figure)\(")  # a cell that draws a figure
FILLER = re.compile(r"^(a |an |the )?(plot|figure|image|graph|chart) (of|showing)\b", re.IGNORECASE)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_figure_has_a_text_alternative_that_says_what_it_shows(path):
    """The website's <img> of a figure takes its alt text from the cell's ``mystnb.image.alt`` (myst-nb);
    without it, the alt is the image's file path. The text says what the figure shows, not "a plot"."""
    for cell in load_notebook(path)["cells"]:
        if cell["cell_type"] != "code" or not FIGURE.search(cell_source(cell)):
            continue
        alt = cell.get("metadata", {}).get("mystnb", {}).get("image", {}).get("alt", "")
        assert len(alt) >= 60, f"cell {cell['id']} draws a figure without a text alternative (mystnb.image.alt)"
        assert len(alt) <= 300, f"cell {cell['id']}: the alt text runs to {len(alt)} characters (at most 300)"
        assert not FILLER.match(alt), f"cell {cell['id']}: the alt text opens with filler: {alt[:40]!r}"


def test_the_alt_text_rule_sees_filler_and_figures():
    assert FILLER.match("A plot of accuracy") and FILLER.match("Image showing bars")
    assert not FILLER.match("Test accuracy against step") and not FILLER.match("Image grid of digits")
    assert FIGURE.search("fig, ax = plt.subplots(1, 2)") and not FIGURE.search("ax.plot(x, y)")
