"""Grade handed-in student notebooks with their own self-checks.

Every exercise in a lab is a ``{exercise}`` directive, then the cell the student completes, then a
cell that calls a self-check from :mod:`normlab.checks`. Grading executes the notebook in a fresh
kernel, going on after errors, and reads each exercise's outcome from those two cells:

- **passed**: both cells ran and the self-check raised nothing;
- **not attempted**: the stub's ``NotImplementedError`` is still raised, by the student's cell, or
  by the student's function when the self-check calls it (the check then prints ``NOT ATTEMPTED``
  and returns, so that the notebook runs on);
- **failed**: the student's cell or the self-check raised; the error's message says why;
- **by hand**: the exercise has no code (a derivation or a written answer). The report gives the
  rubric for a person to grade by: the ``**Rubric**`` paragraph of the exercise's worked solution in
  the course's own notebooks and chapter pages (or, without one, the whole answer key).

Usage: ``python -m coursekit.grade NOTEBOOK [NOTEBOOK ...] [--json REPORT.json] [--timeout S]``;
``python -m coursekit.grade --questions`` lists the chapter pages' written questions with their rubrics.
The exit status is 0 when every graded exercise passed.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

from coursekit.notebooks import chapter_markdown, exercises
from normlab.checks import NOT_ATTEMPTED

__all__ = ["Outcome", "exercises", "rubrics", "grade_notebook", "main"]


@dataclass
class Outcome:
    label: str
    title: str
    status: str  # "passed", "failed", "not attempted" or "by hand"
    message: str = ""


_SOLUTION_OF = re.compile(r"^(`{3,}|:{3,})\{solution\}[ \t]+(\S+)[^\n]*\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_RUBRIC = re.compile(r"\*\*Rubric[^*]*\*\*.*?(?=\n\s*\n|\Z)", re.DOTALL)


def rubrics(root=None) -> dict[str, str]:
    """{exercise label: rubric} from the worked solutions in the course's notebooks and chapter pages.

    root: the course repository (default: the one this package sits in, as tools/coursekit/). A
    solution with a ``**Rubric (N points).**`` paragraph gives that paragraph; one without gives its
    whole text.
    """
    root = Path(__file__).resolve().parents[3] if root is None else Path(root)
    found = {}
    for text in chapter_markdown(root):
        for _fence, label, body in _SOLUTION_OF.findall(text):
            body = re.sub(r"^:\w+:.*\n", "", body.strip() + "\n", flags=re.MULTILINE).strip()
            rubric = _RUBRIC.search(body)
            found[label] = " ".join((rubric[0] if rubric else body).split())
    return found


def _printed(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _error(cell):
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return output["ename"], output.get("evalue", "")
    return None


def grade_notebook(path, timeout: int = 600) -> list[Outcome]:
    """Execute one notebook (from its own folder) and return one Outcome per exercise."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such notebook")
    nb = nbformat.read(path, as_version=4)
    found = exercises(nb)
    if not found:
        raise ValueError(f"{path}: no {{exercise}} directive, so nothing to grade")
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    outcomes, keys = [], None
    for label, title, work, check in found:
        if work is None:
            keys = rubrics() if keys is None else keys
            outcomes.append(Outcome(label, title, "by hand", keys.get(
                label, "no rubric found: grade with the worked solution of the instructor edition")))
            continue
        err = _error(nb.cells[work]) or (_error(nb.cells[check]) if check != work else None)
        if err is None and check != work and not nb.cells[check].get("outputs") and nb.cells[check].get(
                "execution_count") is None:
            err = ("NotExecuted", "the self-check cell did not run")
        if err is None and NOT_ATTEMPTED in _printed(nb.cells[check]):
            outcomes.append(Outcome(label, title, "not attempted"))
        elif err is None:
            outcomes.append(Outcome(label, title, "passed"))
        elif err[0] == "NotImplementedError":  # the stub raised, in the cell or when the check called it
            outcomes.append(Outcome(label, title, "not attempted"))
        else:
            outcomes.append(Outcome(label, title, "failed", f"{err[0]}: {err[1]}".strip()))
    return outcomes


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m coursekit.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--questions", action="store_true",
                        help="list the chapter pages' written questions with their rubrics (graded by hand)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = parser.parse_args(argv)
    if args.questions:
        for label, rubric in rubrics().items():
            if label.startswith("q-"):
                print(f"{label}\n{textwrap.fill(rubric, 100, initial_indent='  ', subsequent_indent='  ')}")
        if not args.notebooks:
            return 0
    if not args.notebooks:
        parser.error("name the notebooks to grade (or pass --questions)")
    report, all_passed = {}, True
    for path in args.notebooks:
        try:
            outcomes = grade_notebook(path, args.timeout)
        except (FileNotFoundError, ValueError) as err:
            print(err, file=sys.stderr)
            return 2
        graded = [o for o in outcomes if o.status != "by hand"]
        passed = sum(o.status == "passed" for o in graded)
        all_passed &= passed == len(graded)
        print(f"{path}: {passed}/{len(graded)} exercises passed")
        for o in outcomes:
            message = textwrap.fill(o.message, 100, initial_indent=" " * 17, subsequent_indent=" " * 17)
            print(f"  {o.status:>13}  {o.label}  {o.title}" + (f"\n{message}" if o.message else ""))
        report[str(path)] = {"passed": passed, "graded": len(graded), "exercises": [asdict(o) for o in outcomes]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
