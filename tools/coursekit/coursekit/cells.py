"""Run a notebook's code cells in order in one Python process, without Jupyter.

For a machine that has Python, torch and the course's library but no Jupyter kernel (the GPU
image ``chapters/gpu/run_on_gpu.sh`` runs on)::

    PYTHONPATH=code:tools/coursekit python -m coursekit.cells chapters/gpu/lab.ipynb

The cells share one namespace, as in a kernel. A line that is an IPython magic (``%pip ...``,
``!cmd``) becomes ``pass``, so an ``if`` around it stays valid Python; figures go to matplotlib's
Agg backend; the working directory is the notebook's folder, as in Jupyter. The exit status is 1,
naming the cell and its error, at the first cell that fails.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

__all__ = ["code_cells", "magics_as_pass", "run"]

_MAGIC = re.compile(r"^(\s*)[%!].*$", re.MULTILINE)


def magics_as_pass(source: str) -> str:
    """Return a cell's source with each IPython magic or shell line (%pip, !ls) read as ``pass``."""
    return _MAGIC.sub(r"\1pass", source)


def code_cells(path) -> list[str]:
    """Return the source of each code cell of the notebook at ``path``, magics replaced by ``pass``."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            out.append(magics_as_pass(src))
    return out


def run(path, out=None) -> int:
    """Execute the notebook's code cells in order; return 0, or 1 at the first cell that raises."""
    import matplotlib

    out = out or sys.stdout
    matplotlib.use("Agg")
    path = Path(path).resolve()
    cells = code_cells(path)
    namespace = {"__name__": "__main__"}
    cwd = os.getcwd()
    os.chdir(path.parent)
    start = time.time()
    try:
        for i, src in enumerate(cells, 1):
            try:
                exec(compile(src, f"{path.name}, code cell {i}", "exec"), namespace)
            except Exception:
                print(f"FAILED {path.name}: code cell {i} of {len(cells)}", file=out)
                traceback.print_exc(file=out)
                return 1
    finally:
        os.chdir(cwd)
        import matplotlib.pyplot as plt

        plt.close("all")
    print(f"ran the {len(cells)} code cells of {path.name} in {time.time() - start:.1f} s", file=out)
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m coursekit.cells", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for nb in args.notebooks:
        if not nb.is_file():
            parser.error(f"no such notebook: {nb}")
        if run(nb):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
