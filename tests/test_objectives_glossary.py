"""Learning objectives at the top of every chapter, and a glossary that the chapter pages link to.

Objectives: each chapter's index.md opens with one "Learning objectives" admonition whose 3-5
numbered items each name an exercise of that chapter that a self-check (or an assert) grades, and
together name every exercise of the chapter.

Glossary: glossary.md holds one ``{glossary}`` directive; every entry is linked with ``{term}`` from
a chapter page, every ``{term}`` target in the book is a glossary term, and on each chapter page
the first use of a term in the running text is a ``{term}`` link.
"""

import re

import pytest

from conftest import ROOT, cell_source, load_notebook
from coursekit import grade

CHAPTERS = sorted(p for p in (ROOT / "chapters").iterdir() if (p / "index.md").exists())
CHAPTER_IDS = [p.name for p in CHAPTERS]

ROLE = re.compile(r"\{(?P<name>[\w:-]+)\}`(?P<body>[^`]*)`")
REF = re.compile(r"\{ref\}`(?:[^`<]*<)?(?P<label>[\w-]+)>?`")
TARGET = re.compile(r"^\((?P<label>[\w-]+)\)=", re.MULTILINE)


# --- learning objectives -------------------------------------------------------------------------


def chapter_notebooks(folder):
    return sorted(folder.glob("*.ipynb"))


def exercises(folder):
    """Return {label: (notebook name, graded)} for every exercise in the chapter's notebooks.

    graded: the grader (coursekit.grade) finds the cell the student completes and a ``check_*``
    self-check for it. A pen-and-paper exercise has neither and is graded by hand.
    """
    found = {}
    for path in chapter_notebooks(folder):
        for label, _title, work, _check in grade.exercises(load_notebook(path)):
            assert not label.startswith("exercise-"), f"{path.relative_to(ROOT)}: an exercise without a :label:"
            found[label] = (path.name, work is not None)
    return found


def defined_labels(folder):
    """Every label a {ref} may name in the chapter: (label)= targets and exercise labels."""
    labels = set(TARGET.findall((folder / "index.md").read_text(encoding="utf-8")))
    for path in chapter_notebooks(folder):
        for cell in load_notebook(path)["cells"]:
            if cell["cell_type"] == "markdown":
                labels |= set(TARGET.findall(cell_source(cell)))
    return labels | set(exercises(folder))


def objective_blocks(text):
    """Return the bodies of the 'Learning objectives' admonitions in a page."""
    fence = re.compile(
        r"^(?P<fence>:{3,}|`{3,})\{admonition\}[ \t]*Learning objectives[ \t]*\n(?P<body>.*?)^(?P=fence)[ \t]*$",
        re.MULTILINE | re.DOTALL,
    )
    return [(m.start(), m.group("body")) for m in fence.finditer(text)]


def objective_items(body):
    """Return the numbered items of an objectives block as (number, text) pairs, continuation lines joined."""
    lines = body.splitlines()
    intro = [i for i, line in enumerate(lines) if line.strip() == "After this chapter you can"]
    assert intro, "the block must say 'After this chapter you can' before its items"
    items = []
    for line in lines[intro[0] + 1 :]:
        start = re.match(r"^(\d+)\.\s+(.*)", line)
        if start:
            items.append([int(start.group(1)), start.group(2)])
        elif line.strip() and items and line.startswith(" "):
            items[-1][1] += " " + line.strip()
        elif line.strip():
            raise AssertionError(f"unexpected line in the objectives: {line!r}")
    return [(n, text) for n, text in items]


@pytest.mark.parametrize("folder", CHAPTERS, ids=CHAPTER_IDS)
def test_chapter_opens_with_one_objectives_block(folder):
    text = (folder / "index.md").read_text(encoding="utf-8")
    blocks = objective_blocks(text)
    where = f"{folder.name}/index.md"
    assert len(blocks) == 1, f"{where}: expected one 'Learning objectives' admonition, found {len(blocks)}"
    first_section = re.search(r"^## ", text, re.MULTILINE)
    assert first_section is None or blocks[0][0] < first_section.start(), (
        f"{folder.name}/index.md: the learning objectives must come before the first ## heading"
    )
    items = objective_items(blocks[0][1])
    assert 3 <= len(items) <= 5, f"{folder.name}: {len(items)} objectives, expected 3 to 5"
    assert [n for n, _ in items] == list(range(1, len(items) + 1)), f"{folder.name}: items must be numbered 1, 2, ..."


@pytest.mark.parametrize("folder", CHAPTERS, ids=CHAPTER_IDS)
def test_every_objective_names_a_graded_exercise_of_its_chapter(folder):
    text = (folder / "index.md").read_text(encoding="utf-8")
    (_, body), = objective_blocks(text)
    known = exercises(folder)
    labels = defined_labels(folder)
    for n, item in objective_items(body):
        refs = REF.findall(item)
        where = f"{folder.name}, objective {n}"
        for label in refs:
            assert label in labels, f"{where}: {{ref}}`{label}` is not a label of this chapter's pages"
        graded = [label for label in refs if label in known and known[label][1]]
        assert graded, (
            f"{where}: names no exercise of this chapter with a self-check (its refs: {refs}); "
            f"exercises here: {sorted(known)}"
        )


@pytest.mark.parametrize("folder", CHAPTERS, ids=CHAPTER_IDS)
def test_every_exercise_is_named_by_an_objective(folder):
    text = (folder / "index.md").read_text(encoding="utf-8")
    (_, body), = objective_blocks(text)
    named = {label for _, item in objective_items(body) for label in REF.findall(item)}
    missing = sorted(set(exercises(folder)) - named)
    assert not missing, f"{folder.name}: no objective names the exercises {missing}"


def test_the_exercise_scan_finds_the_graded_and_the_paper_exercises():
    found = exercises(ROOT / "chapters" / "scratch")
    assert found["ex-scratch-forward"][1], "ex-scratch-forward calls checks.check_forward"
    assert not found["ex-scratch-derive"][1], "ex-scratch-derive is a pen-and-paper exercise"


# --- glossary ------------------------------------------------------------------------------------

GLOSSARY = ROOT / "glossary.md"


def glossary_entries():
    """Return the glossary's entries in source order as (terms, definition) pairs."""
    text = GLOSSARY.read_text(encoding="utf-8")
    block = re.search(r"^(`{3,}|:{3,})\{glossary\}[^\n]*\n(?P<body>.*?)^\1[ \t]*$", text, re.MULTILINE | re.DOTALL)
    assert block, "glossary.md has no {glossary} directive"
    entries = []
    for line in block.group("body").splitlines():
        if not line.strip() or re.match(r"^:[\w-]+:", line):
            continue
        if not line[0].isspace():
            if entries and not entries[-1][1]:
                entries[-1][0].append(line.strip())  # another name for the same entry
            else:
                entries.append(([line.strip()], ""))
        else:
            assert entries, f"glossary.md: a definition line before any term: {line!r}"
            entries[-1] = (entries[-1][0], (entries[-1][1] + " " + line.strip()).strip())
    return entries


def glossary_terms():
    return [term for terms, _ in glossary_entries() for term in terms]


def term_target(body):
    """The term a {term} role links to: the text in <...>, or the whole text."""
    match = re.fullmatch(r"(?s)(?P<text>.*?)\s*<(?P<target>[^<>]+)>", body)
    return (match.group("target") if match else body).strip()


def book_sources():
    """Yield (where, markdown text) for every page of the book and every notebook markdown cell."""
    for path in sorted(ROOT.glob("*.md")) + sorted((ROOT / "chapters").rglob("*.md")):
        if path.name != "README.md":
            yield str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "chapters").rglob("*.ipynb")):
        for i, cell in enumerate(load_notebook(path)["cells"]):
            if cell["cell_type"] == "markdown":
                yield f"{path.relative_to(ROOT)}, cell {i}", cell_source(cell)


def test_glossary_has_enough_entries_sorted_each_pointing_to_a_chapter():
    entries = glossary_entries()
    assert len(entries) >= 35, f"only {len(entries)} glossary entries"
    heads = [terms[0].lower() for terms, _ in entries]
    assert heads == sorted(heads), "glossary entries must be sorted alphabetically"
    terms = [t.lower() for t in glossary_terms()]
    assert len(terms) == len(set(terms)), f"duplicate terms: {sorted({t for t in terms if terms.count(t) > 1})}"
    for terms, definition in entries:
        docs = re.findall(r"\{doc\}`(?:[^`<]*<)?([\w/.-]+)>?`", definition)
        assert docs, f"glossary entry {terms[0]!r} does not say where the course treats it ({{doc}} link)"
        for doc in docs:
            assert (ROOT / f"{doc}.md").exists() or (ROOT / f"{doc}.ipynb").exists(), f"{terms[0]!r}: no page {doc}"


def test_required_terms_are_in_the_glossary():
    terms = {t.lower() for t in glossary_terms()}
    required = ["batch statistics", "running statistics", "momentum", "Bessel's correction", "internal covariate shift",
                "ghost batch", "virtual batch", "population statistics", "AdaBN", "test-time adaptation",
                "Welford's algorithm", "Chan merge", "roofline"]
    missing = [t for t in required if t.lower() not in terms]
    assert not missing, f"missing from the glossary: {missing}"


def test_every_glossary_entry_is_linked_from_a_chapter_page():
    linked = set()
    for folder in CHAPTERS:
        text = (folder / "index.md").read_text(encoding="utf-8")
        linked |= {term_target(m.group("body")).lower() for m in ROLE.finditer(text) if m.group("name") == "term"}
    for terms, _ in glossary_entries():
        names = {t.lower() for t in terms}
        assert linked & names, f"no chapter page links the glossary entry {terms[0]!r} with {{term}}"


def test_every_term_link_names_a_glossary_term():
    terms = {t.lower() for t in glossary_terms()}
    for where, text in book_sources():
        for m in ROLE.finditer(text):
            if m.group("name") == "term":
                target = term_target(m.group("body"))
                assert target.lower() in terms, f"{where}: {{term}}`{m.group('body')}` names no glossary term"


def blank(text, start, end):
    """Replace text[start:end] by spaces, keeping newlines, so positions stay valid."""
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def running_text(text):
    """Blank out what is not running text (positions kept), and return it with the {term} roles.

    Blanked: fenced blocks (code, literalinclude, the "Claims, checked" box and the learning
    objectives, which summarize the page: the links belong where the page teaches the term),
    headings, (label)= lines, math, inline code, and every role other than {term}. A {term} role
    keeps its displayed text; its <target> is blanked.
    """
    fences = re.compile(r"^(`{3,}|:{3,}).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
    for pattern in (fences, re.compile(r"\$\$.*?\$\$", re.DOTALL), re.compile(r"^#.*$|^\([\w-]+\)=.*$", re.MULTILINE)):
        for m in pattern.finditer(text):
            text = blank(text, m.start(), m.end())
    roles = []
    for m in ROLE.finditer(text):
        if m.group("name") == "term":
            shown = re.match(r"(?s)(.*?)(\s*<[^<>]+>)?$", m.group("body"))
            body_start = m.start("body")
            roles.append((body_start, body_start + len(shown.group(1)), term_target(m.group("body")).lower()))
            if shown.group(2):
                text = blank(text, body_start + len(shown.group(1)), m.end("body"))
            text = blank(text, m.start(), body_start)  # the {term} prefix
        else:
            text = blank(text, m.start(), m.end())
    for m in re.finditer(r"`[^`\n]*`|\$[^$\n]+\$", text):
        if not any(start <= m.start() < end for start, end, _ in roles):
            text = blank(text, m.start(), m.end())
    return text, roles


def term_pattern(term):
    words = r"\s+".join(re.escape(w) for w in term.split())
    return re.compile(rf"(?<![\w-]){words}(?:s|es)?(?![\w-])", re.IGNORECASE)


def unlinked_first_uses(page):
    """Return (names of the entry, match) for each glossary entry whose first use on the page is not linked.

    The first use is the earliest match of any of the entry's names (exact text, any case, an optional
    plural s) in the running text, not counting matches inside another entry's link. It counts as
    linked when it sits inside a {term} link to the entry, or when an earlier {term} link already
    named the entry with other words (e.g. {term}`running averages <running statistics>`).
    """
    text, roles = running_text(page)
    found = []
    for terms, _ in glossary_entries():
        names = {t.lower() for t in terms}
        uses = [m for term in terms for m in term_pattern(term).finditer(text)
                if not any(start <= m.start() < end and target not in names for start, end, target in roles)]
        if not uses:
            continue
        first = min(uses, key=lambda m: m.start())
        if not any(target in names and start <= first.start() for start, _, target in roles):
            found.append((terms, first))
    return found


@pytest.mark.parametrize("folder", CHAPTERS, ids=CHAPTER_IDS)
def test_first_use_of_each_term_on_a_chapter_page_is_linked(folder):
    page = (folder / "index.md").read_text(encoding="utf-8")
    problems = [f"line {page.count(chr(10), 0, m.start()) + 1}: first use of {m.group(0)!r} is not a "
                f"{{term}} link to {terms[0]!r}" for terms, m in unlinked_first_uses(page)]
    assert not problems, f"{folder.name}/index.md:\n" + "\n".join(problems)
