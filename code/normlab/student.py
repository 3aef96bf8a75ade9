"""Write student versions of the course's notebooks: solution code replaced by stubs.

In a lab notebook, the code of an exercise's solution stands between two marker lines::

    def my_forward(x, gamma, beta, eps):
        # BEGIN SOLUTION
        ...
        # END SOLUTION

A student version keeps every cell, and replaces each marked block, markers included, with
``raise NotImplementedError("Exercise N: <title>")`` at the marker's indentation. N counts the
exercises of the notebook in order; the title comes from the nearest ``{exercise}`` directive above.

Usage: ``python -m normlab.student SOURCE_DIR DEST_DIR`` (``make student``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

__all__ = ["BEGIN", "END", "strip_solutions", "make_student_notebook", "main"]

BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"
_EXERCISE = re.compile(r"^[`:]{3,}\{exercise\}[ \t]*(.*)$", re.MULTILINE)


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
            out.append(f"{indent}raise NotImplementedError({message!r})\n")
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
    title, number = "exercise", 0
    for cell in nb["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "markdown":
            titles = _EXERCISE.findall(source)
            if titles:
                title = titles[-1].strip() or "exercise"
        elif cell["cell_type"] == "code" and BEGIN in source:
            number += 1
            message = f"Exercise {number}: {title} (write your solution here)"
            cell["source"] = strip_solutions(source, message)
            cell["outputs"], cell["execution_count"] = [], None
    return nb


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m normlab.student SOURCE_DIR DEST_DIR", file=sys.stderr)
        return 2
    src, dest = Path(argv[0]), Path(argv[1])
    if not src.is_dir():
        print(f"{src} is not a folder", file=sys.stderr)
        return 2
    paths = sorted(p for p in src.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    for path in paths:
        nb = make_student_notebook(json.loads(path.read_text(encoding="utf-8")))
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {target}")
    print(f"{len(paths)} student notebooks in {dest}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
