"""Write student versions of the course's notebooks: solution code replaced by stubs.

In a lab notebook, the code of an exercise's solution stands between two marker lines::

    def my_forward(x, gamma, beta, eps):
        # BEGIN SOLUTION
        ...
        # END SOLUTION

A student version keeps every cell, and replaces each marked block, markers included, with
``raise NotImplementedError("Exercise N: <title>")`` at the marker's indentation. The worked
solutions in the text (``{solution}`` directives) are removed, and so is the output of the
self-check that ran on the solution. N counts the
exercises of the notebook in order; the title comes from the nearest ``{exercise}`` directive above.

Usage: ``python -m coursekit.student SOURCE_DIR DEST_DIR`` (``make student``).

The student edition of the website (``make student-book``) is built from the same stubs:
``python -m coursekit.student --book ROOT DEST_DIR`` copies the book's sources into DEST_DIR and puts
in place of each notebook its student version, made from the copy that ``make book`` executed (so
figures and glued numbers stay, solutions and their outputs go). The copy's ``_config.yml`` turns
execution off and drops the Colab buttons, which would open the solutions from the repository.
"""

from __future__ import annotations

import io
import json
import keyword
import re
import shutil
import sys
import tokenize
from pathlib import Path

from coursekit.notebooks import cell_source
from normlab.checks import SELF_CHECK, STUB_SUFFIX

__all__ = ["BEGIN", "END", "HIDE", "strip_solutions", "make_student_notebook", "answers_shown_early",
           "write_student_book", "main"]

BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"
HIDE = "hide-input"  # the tag that folds an exercise's code on the instructor website
_EXERCISE = re.compile(r"^[`:]{3,}\{exercise\}[ \t]*(.*)$", re.MULTILINE)
# A worked solution in the text: a {solution} directive, up to the line that closes its fence.
_SOLUTION = re.compile(r"^(?P<fence>`{3,}|:{3,})\{solution\}.*?^(?P=fence)[ \t]*$\n?", re.MULTILINE | re.DOTALL)


def _stub(indent: str, message: str, width: int = 88) -> str:
    """``raise NotImplementedError(message)`` at ``indent``: one line where it fits in ``width``
    characters (ruff's line length for notebooks), else the message split at spaces into adjacent
    string literals, one per line (the suffix whole: the student website shows it as one phrase)."""
    line = f"{indent}raise NotImplementedError({message!r})\n"
    if len(line) <= width + 1:
        return line
    room, parts = width - len(indent) - 7, [""]  # 4 spaces of indentation, the quotes and ")"
    head = message.removesuffix(STUB_SUFFIX)
    words = re.split(r"(?= )", head) + ([STUB_SUFFIX] if head != message else [])
    for word in words:  # each word keeps the space before it
        parts[-1:] = [parts[-1] + word] if len(parts[-1] + word) <= room or not parts[-1] else [parts[-1], word]
    # the parenthesis closes on the last literal's line: a line of ")" alone could be a solution's
    return f"{indent}raise NotImplementedError(\n" + "\n".join(f"{indent}    {p!r}" for p in parts) + ")\n"


def strip_solutions(source: str, message: str) -> str:
    """Replace each BEGIN/END SOLUTION block of one cell's source with a NotImplementedError stub."""
    out, inside = [], False
    for lineno, line in enumerate(source.splitlines(keepends=True), 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"line {lineno}: '{BEGIN}' inside another solution block")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(_stub(indent, message))
        elif stripped == END:
            if not inside:
                raise ValueError(f"line {lineno}: '{END}' without a '{BEGIN}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"'{BEGIN}' is never closed by '{END}'")
    return "".join(out)


def make_student_notebook(nb: dict) -> dict:
    """Return a copy of a notebook (nbformat JSON as a dict) with every solution stubbed out."""
    nb = json.loads(json.dumps(nb))  # deep copy; the source notebook stays as it is
    title, number, stubbed = "exercise", 0, False
    for cell in nb["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "markdown":
            titles = _EXERCISE.findall(source)
            if titles:
                title = titles[-1].strip() or "exercise"
            if _SOLUTION.search(source):
                cell["source"] = _SOLUTION.sub("", source).rstrip("\n")
            stubbed = False
        elif cell["cell_type"] == "code" and BEGIN in source:
            number += 1
            message = f"Exercise {number}: {title}{STUB_SUFFIX}"
            cell["source"] = strip_solutions(source, message)
            cell["outputs"], cell["execution_count"] = [], None
            tags = cell.get("metadata", {}).get("tags", [])
            if HIDE in tags:  # the instructor edition folds the solution away; the stub shows
                cell["metadata"]["tags"] = [t for t in tags if t != HIDE]
            stubbed = True
        elif cell["cell_type"] == "code" and stubbed and SELF_CHECK.search(source):
            cell["outputs"], cell["execution_count"] = [], None  # the solution's self-check result
    return nb


def _shape(line: str) -> tuple:
    """A code line's shape: its tokens, with variable names, numbers and strings replaced by ``_``.

    Only what the line computes counts: a leading ``return`` and the targets of an assignment go.
    Attribute, keyword and called names stay (``m = x.mean(axis=0)`` becomes ``_.mean(axis=_)``),
    so two lines that compute the same thing under other variable names have the same shape. A line that is not
    Python (prose) has the empty shape.
    """
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline)
                if t.type in (tokenize.NAME, tokenize.NUMBER, tokenize.OP, tokenize.STRING)]
    except (tokenize.TokenError, SyntaxError):
        return ()
    if toks and toks[0].string == "return":  # what a line computes, not where it puts it
        toks = toks[1:]
    depth, last_assign = 0, -1
    for k, tok in enumerate(toks):
        depth += tok.string in "([{" if tok.type == tokenize.OP else 0
        depth -= tok.string in ")]}" if tok.type == tokenize.OP else 0
        if depth == 0 and tok.type == tokenize.OP and tok.string == "=":
            last_assign = k
    toks = toks[last_assign + 1 :]
    out, depth = [], 0
    for k, tok in enumerate(toks):
        text = tok.string
        if tok.type == tokenize.OP:
            depth += text in "([{"
            depth -= text in ")]}"
            out.append(text)
        elif tok.type == tokenize.NAME and not keyword.iskeyword(text):
            attribute = k > 0 and toks[k - 1].string == "."
            after = toks[k + 1].string if k + 1 < len(toks) else ""
            kwarg = depth > 0 and after == "="
            out.append(text if attribute or kwarg or after == "(" else "_")  # a called name stays
        else:
            out.append(text if tok.type == tokenize.NAME else "_")  # keywords stay; literals go
    return tuple(out)


def answers_shown_early(nb: dict, min_tokens: int = 9) -> list[str]:
    """Return, for the student edition of ``nb``, every place before an exercise that shows a line
    of its solution: the same line, or one of the same shape under other names (``_shape``).

    Only solution lines of at least ``min_tokens`` tokens count (``return x`` shows nothing).
    Code and text of every earlier cell are compared, and so is a call of ``inspect.getsource``,
    which prints a library function that may be the answer.
    """
    student, found = make_student_notebook(nb), []
    for i, cell in enumerate(nb["cells"]):
        source = cell_source(cell)
        if cell["cell_type"] != "code" or BEGIN not in source:
            continue
        lines = [line for block in source.split(BEGIN)[1:] for line in block.split(END)[0].splitlines()]
        keys = {}
        for line in lines:
            if line.strip() and not line.strip().startswith("#") and len(_shape(line)) >= min_tokens:
                keys.setdefault(_shape(line), line.strip())
        for j, earlier in enumerate(student["cells"][:i]):
            text = cell_source(earlier)
            if earlier["cell_type"] == "code" and "getsource(" in text:
                found.append(f"cell {j} prints library source (inspect.getsource) before exercise cell {i}")
            for line in text.splitlines():
                if _shape(line) in keys:
                    found.append(f"cell {j} shows {line.strip()!r} before exercise cell {i}, whose "
                                 f"solution has {keys[_shape(line)]!r}")
    return found


def _write_notebook(nb: dict, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _restore_glue(nb: dict, glued: dict) -> None:
    """Put back the glued values that myst-nb moved out of an executed notebook (into
    ``<name>.glue.json``), each into the first code cell that names its key, else the last one."""
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for key, output in glued.items():
        output = json.loads(json.dumps(output))
        prefix = output.get("metadata", {}).get("scrapbook", {}).get("mime_prefix", "")
        output["data"] = {prefix + mime: value for mime, value in output["data"].items()}
        cell = next((c for c in code if key in "".join(c["source"])), code[-1])
        if not any(o.get("metadata", {}).get("scrapbook", {}).get("name") == key for o in cell["outputs"]):
            cell["outputs"].append(output)


def student_branch(branch: str) -> str:
    """The branch of the student Colab edition, beside ``branch`` (the Colab edition's): ``colab-student``."""
    return f"{branch}-student"


def write_student_book(root, dest, executed=None) -> list[Path]:
    """Write the student edition's book sources into dest; return the notebooks written.

    root: the course repository; executed: where ``make book`` left the executed notebooks
    (default ``root/_build/jupyter_execute``). Raises FileNotFoundError, naming the command to run,
    if a notebook has not been executed.
    """
    import yaml  # the book's toolchain has it; the library's users do not need it

    from coursekit.course import toc_files

    root, dest = Path(root), Path(dest)
    executed = root / "_build" / "jupyter_execute" if executed is None else Path(executed)
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("_toc.yml", *config.get("bibtex_bibfiles", [])):
        shutil.copy2(root / name, dest / name)
    folders = [*config.get("sphinx", {}).get("local_extensions", {}).values(), "_static", "timings", "code"]
    for folder in dict.fromkeys(folders):  # extensions, styles, measurements and code the pages show
        if (root / folder).is_dir():
            shutil.copytree(root / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    notebooks = []
    for doc in toc_files(root):
        if (root / f"{doc}.md").exists():  # a page: its worked solutions go, as in the notebooks
            (dest / doc).parent.mkdir(parents=True, exist_ok=True)
            text = (root / f"{doc}.md").read_text(encoding="utf-8")
            (dest / f"{doc}.md").write_text(_SOLUTION.sub("", text), encoding="utf-8")
            continue
        source = executed / f"{doc}.ipynb"
        if not source.exists():
            raise FileNotFoundError(f"{source} is missing: run `make book` first (it executes the notebooks)")
        nb = make_student_notebook(json.loads(source.read_text(encoding="utf-8")))
        glued = executed / f"{doc}.glue.json"
        if glued.exists():
            _restore_glue(nb, json.loads(glued.read_text(encoding="utf-8")))
        _write_notebook(nb, dest / f"{doc}.ipynb")
        notebooks.append(dest / f"{doc}.ipynb")

    config["title"] = f"{config['title']} (student edition)"
    config["execute"]["execute_notebooks"] = "off"  # outputs come from the executed solutions
    if "branch" in config.get("repository", {}):  # its Colab buttons open the stubbed Colab edition
        config["repository"]["branch"] = student_branch(config["repository"]["branch"])
    (dest / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return notebooks


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "--book":
        try:
            notebooks = write_student_book(argv[1], argv[2])
        except FileNotFoundError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"wrote the student edition's sources, {len(notebooks)} student notebooks, into {argv[2]}/")
        return 0
    if len(argv) != 2:
        print("usage: python -m coursekit.student SOURCE_DIR DEST_DIR\n"
              "       python -m coursekit.student --book ROOT DEST_DIR", file=sys.stderr)
        return 2
    src, dest = Path(argv[0]), Path(argv[1])
    if not src.is_dir():
        print(f"{src} is not a folder", file=sys.stderr)
        return 2
    paths = sorted(p for p in src.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    for path in paths:
        target = dest / path.relative_to(src)
        _write_notebook(make_student_notebook(json.loads(path.read_text(encoding="utf-8"))), target)
        print(f"wrote {target}")
    print(f"{len(paths)} student notebooks in {dest}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
