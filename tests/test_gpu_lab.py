"""Chapter 8's lab where triton is missing (macOS, Windows, torch's CPU wheels): it runs to the
end, and its kernel cells say they are skipped; the package declares triton as an extra."""

import os

import nbformat
import tomllib
from nbclient import NotebookClient

from conftest import ROOT

LAB = ROOT / "chapters" / "gpu" / "lab.ipynb"


def test_the_lab_runs_without_triton_and_says_which_cells_it_skips(tmp_path):
    hidden = tmp_path / "no_triton" / "triton"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("triton is hidden by this test")\n')
    path = os.pathsep.join([str(hidden.parent), str(ROOT / "code"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, NORMLAB_SEED="0", NORMLAB_PROGRESS="0", TRITON_INTERPRET="1")
    nb = nbformat.read(LAB, as_version=4)
    NotebookClient(nb, timeout=300, allow_errors=True, kernel_name="python3",
                   resources={"metadata": {"path": str(LAB.parent)}}).execute(env=env)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(code) for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    text = "\n".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "triton is not installed: the cells that run normlab.kernels are skipped" in text
    assert 'pip install "normlab[kernels]"' in text
    assert "skipped: triton is not installed, so normlab.kernels cannot run here" in text
    assert "normlab.kernels (fp32)" not in text  # the variance table has no kernel row
    assert "Not yet measured" in text or "Holds" in text or "Does not hold" in text  # ran to the last cell


def test_triton_is_declared_as_the_kernels_extra_for_linux():
    project = tomllib.loads((ROOT / "code" / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra = project["optional-dependencies"]["kernels"]
    assert any(req.startswith("triton") and "platform_system == 'Linux'" in req for req in extra), extra
    assert not any(req.startswith("triton") for req in project["dependencies"])
