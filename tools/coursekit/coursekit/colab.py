"""Write the Colab edition of the labs: the same notebooks, their text in plain CommonMark.

Colab and Jupyter do not render MyST. In the Colab edition every piece of MyST in a notebook's
markdown becomes what those renderers show:

- ``{glue:text}`name:fmt``` becomes the value of the website's run, formatted as on the website,
  in bold, followed by its name in code font: the notebook's own run prints ``name = value`` in
  the cell that computes it (a note at the top of each notebook says so);
- ``{doc}``, ``{ref}`` and ``{term}`` become links to the website's pages (titles and anchors from
  the built site's ``objects.inv``); ``{cite}`` becomes "(Author, year)" linked to the references;
- ``{exercise}`` and ``{solution}`` blocks become a heading and a blockquote, other directives
  (admonitions) a bold title and a blockquote; ``(label)=`` targets disappear.

Code cells are unchanged, so the Colab edition runs exactly what the book runs. The values and
the site's inventory come from ``make book``; the student Colab edition is made from the student
notebooks (solutions stubbed, ``coursekit.student``).

Usage: ``python -m coursekit.colab ROOT DEST [--student]`` (``make colab`` writes both editions).
"""

from __future__ import annotations

import ast
import json
import posixpath
import re
import sys
from pathlib import Path

from coursekit.course import exercise_titles

__all__ = ["MYST", "Site", "convert_markdown", "make_colab_notebook", "write_colab_edition", "main"]

# What a test looks for in the edition's markdown: any of these means MyST survived.
MYST = re.compile(r"\{[a-z][a-z0-9:_-]*\}`|^[`~:]{3,}\s*\{[a-z]|^\([\w.-]+\)=\s*$|^:[a-z-]+:", re.MULTILINE)

_ROLE = re.compile(r"\{(glue:text|glue|doc|ref|term|cite|numref|eq)\}`([^`]*)`")
_BOLD_GLUE = re.compile(r"\*\*(\{glue(?::text)?\}`[^`]*`)\*\*")
_LABEL = re.compile(r"^\([\w.-]+\)=[ \t]*\n?", re.MULTILINE)
_DIRECTIVE = re.compile(
    r"^(?P<fence>`{3,}|:{3,})\{(?P<name>[a-z-]+)\}[ \t]*(?P<arg>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$\n?",
    re.MULTILINE | re.DOTALL,
)
_OPTION = re.compile(r"^:([a-z-]+):[ \t]*(.*)$")
_TITLED = re.compile(r"^(?P<text>.*?)\s*<(?P<target>[^<>]+)>$", re.DOTALL)
_NOTE = ("*Colab edition of a page of the website {url}. Numbers in **bold** in the text are "
         "those of the website's run (seed 0, quick scale); the code font after each one names "
         "the value, which your run prints (`name = value`) in the cell that computes it.*")


class Site:
    """What the converter needs from the built website: its URL, its inventory and the references."""

    def __init__(self, root, base_url, executed=None):
        root = Path(root)
        self.base_url = base_url.rstrip("/") + "/"
        self.executed = root / "_build" / "jupyter_execute" if executed is None else Path(executed)
        self.inventory = _inventory(root / "_build" / "html" / "objects.inv")
        self.references = _references(root / "references.bib")
        self.references_page = self.base_url + "references.html"
        self.titles = exercise_titles(root)

    def url(self, relative):
        return self.base_url + relative

    def glued(self, doc):
        """{name: value} of the values that the executed notebook ``doc`` glued."""
        path = self.executed / f"{doc}.glue.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `make book` first (it executes the notebooks)")
        return {name: _value(output) for name, output in json.loads(path.read_text(encoding="utf-8")).items()}


def _inventory(path):
    from sphinx.util.inventory import InventoryFile

    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make book` first")
    with open(path, "rb") as f:
        inv = InventoryFile.load(f, "", posixpath.join)
    return {kind: {name: (entry[2], entry[3]) for name, entry in inv[kind].items()} for kind in inv}


def _references(path):
    """{key: "Author, year"} from the book's BibTeX file: one, two or "et al." authors."""
    from pybtex.database import parse_file

    out = {}
    for key, entry in parse_file(str(path)).entries.items():
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [" ".join(p.last_names).replace("{", "").replace("}", "") for p in people]
        who = (names[0] if len(names) == 1 else f"{names[0]} & {names[1]}" if len(names) == 2
               else f"{names[0]} et al." if names else entry.fields.get("title", key))
        out[key] = f"{who}, {entry.fields.get('year', 'n.d.')}"
    return out


def _value(output):
    """The Python value of a glued output's text/plain repr (a number, a string, ...)."""
    text = output.get("data", {}).get("text/plain", "")
    text = "".join(text) if isinstance(text, list) else text
    text = re.sub(r"^np\.(?:float|int)\d*\((.*)\)$", r"\1", text.strip())  # numpy 2's scalar repr
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _format(value, spec):
    """Format a glued value as myst-nb does on the website: the spec's type letter picks the type."""
    if not spec:
        return str(value)
    kind = spec[-1]
    if kind == "s":
        value = str(value)
    elif kind in "bcdoxX":
        value = int(value)
    elif kind in "eEfFgGn%":
        value = float(value)
    return format(value, spec)


def _doc_of(target, doc):
    """The docname that a ``{doc}`` target names, from the notebook ``doc`` that names it."""
    if target.startswith("/"):
        return target.lstrip("/")
    return posixpath.normpath(posixpath.join(posixpath.dirname(doc), target))


def _role(kind, content, doc, site, glued):
    """One MyST role as CommonMark."""
    if kind in ("glue:text", "glue"):
        name, _, spec = content.partition(":")
        if name not in glued:
            raise KeyError(f"{doc}: the text cites {{glue}} {name!r}, which the notebook does not glue")
        return f"**{_format(glued[name], spec)}** (`{name}`)"
    if kind == "cite":
        keys = [k.strip() for k in content.split(",")]
        missing = [k for k in keys if k not in site.references]
        if missing:
            raise KeyError(f"{doc}: cites {missing}, which references.bib does not have")
        return f"([{'; '.join(site.references[k] for k in keys)}]({site.references_page}))"
    titled = _TITLED.match(content)
    text, target = (titled["text"], titled["target"]) if titled else (None, content)
    if kind == "doc":
        name = _doc_of(target, doc)
        url, title = site.inventory["std:doc"].get(name, (None, None))
    elif kind == "term":
        url, title = site.inventory["std:term"].get(target, (None, None))
        title = target
    else:  # ref, numref, eq: a label
        url, title = site.inventory["std:label"].get(target, (None, None))
        if target in site.titles:
            title = f"Exercise: {site.titles[target]}"
    if url is None:
        raise KeyError(f"{doc}: {{{kind}}}`{content}` names nothing the website defines")
    return f"[{text or title}]({site.url(url)})"


def _blockquote(text):
    return "\n".join("> " + line if line.strip() else ">" for line in text.strip("\n").splitlines())


def _directive(match, site):
    """An exercise, solution or admonition as a heading (or bold title) and a blockquote."""
    name, arg, body = match["name"], match["arg"].strip(), match["body"]
    lines = body.splitlines()
    while lines and _OPTION.match(lines[0]):
        lines.pop(0)
    body = "\n".join(lines).strip("\n")
    if name == "exercise":
        head = f"#### Exercise: {arg}"
    elif name == "solution":
        head = f"#### Solution: {site.titles.get(arg, arg)}"
    else:  # note, admonition, tip, ...
        head = f"**{arg or name.capitalize()}**"
    return f"{head}\n\n{_blockquote(body)}\n" if body else f"{head}\n"


def convert_markdown(text, doc, site, glued):
    """Return one markdown cell's text with every piece of MyST replaced by CommonMark."""
    previous = None
    while previous != text:  # directives may nest (a solution inside an exercise's text)
        previous = text
        text = _DIRECTIVE.sub(lambda m: _directive(m, site), text)
    text = _LABEL.sub("", text)
    text = _BOLD_GLUE.sub(r"\1", text)  # a value the text already sets in bold: bold once
    return _ROLE.sub(lambda m: _role(m[1], m[2], doc, site, glued), text)


def make_colab_notebook(nb, doc, site):
    """Return a copy of notebook ``nb`` (the page ``doc``) with its markdown in CommonMark."""
    nb = json.loads(json.dumps(nb))
    glued = site.glued(doc)
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            cell["source"] = convert_markdown(source, doc, site, glued).strip("\n")
        else:
            cell["outputs"], cell["execution_count"] = [], None
    note = {"cell_type": "markdown", "id": "colab-edition", "metadata": {},
            "source": _NOTE.format(url=site.url(f"{doc}.html"))}
    nb["cells"].insert(1, note)  # after the title
    return nb


def write_colab_edition(root, dest, student=False, site=None) -> list[Path]:
    """Write the Colab edition of every lab into dest (the same tree); return the notebooks written."""
    import yaml

    from coursekit.course import toc_files
    from coursekit.student import _write_notebook, make_student_notebook

    root, dest = Path(root), Path(dest)
    if site is None:
        config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))
        site = Site(root, config["html"]["baseurl"])
    written = []
    for doc in toc_files(root):
        source = root / f"{doc}.ipynb"
        if not source.exists():
            continue
        nb = json.loads(source.read_text(encoding="utf-8"))
        if student:
            nb = make_student_notebook(nb)
        out = dest / f"{doc}.ipynb"
        _write_notebook(make_colab_notebook(nb, doc, site), out)
        written.append(out)
    return written


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m coursekit.colab", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="the course repository (after `make book`)")
    parser.add_argument("dest", type=Path, help="where to write the edition")
    parser.add_argument("--student", action="store_true", help="the student edition (solutions stubbed)")
    args = parser.parse_args(argv)
    written = write_colab_edition(args.root, args.dest, student=args.student)
    print(f"wrote {len(written)} notebooks into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
