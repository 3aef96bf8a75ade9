"""coursekit.cells: a notebook's code cells in one Python process, for machines without Jupyter."""

import json

from coursekit import cells


def _notebook(path, sources):
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                     "source": s} for s in sources] + [{"cell_type": "markdown", "metadata": {}, "source": "# x"}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


def test_cells_share_one_namespace_run_in_the_notebook_folder_and_magics_become_pass(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("42")
    nb = _notebook(tmp_path / "lab.ipynb", [
        "import sys\nif 'google.colab' in sys.modules:\n    %pip install -q something\n!echo hi\n",
        "value = int(open('data.txt').read())\n",
        "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nassert value == 42\nprint('done', value)\n",
    ])
    assert cells.code_cells(nb)[0].splitlines() == ["import sys", "if 'google.colab' in sys.modules:",
                                                    "    pass", "pass"]
    assert cells.main([str(nb)]) == 0
    out = capsys.readouterr().out
    assert "done 42" in out and "ran the 3 code cells of lab.ipynb" in out


def test_the_first_failing_cell_is_named_and_the_rest_is_not_run(tmp_path, capsys):
    nb = _notebook(tmp_path / "lab.ipynb", ["x = 1\n", "assert x == 2, 'x is not 2'\n", "print('never')\n"])
    assert cells.run(nb) == 1
    out = capsys.readouterr().out
    assert "FAILED lab.ipynb: code cell 2 of 3" in out and "x is not 2" in out and "never" not in out
