"""One notation across the book: the symbols of STYLE.md, written the same way in every source.

The canonical forms: the batch is $\\mathcal{B}$, its statistics $\\mu_\\mathcal{B}$ and
$\\sigma_\\mathcal{B}^2$ (subscript before the square); the normalized value $\\hat{x}$ (accents
take braces); $\\gamma$, $\\beta$ (BN's scale and shift, nothing else); $\\epsilon$; $m$ for the
momentum; the running statistics $\\hat{\\mu}$ and $\\hat{\\sigma}^2$; the loss $\\ell$.
Scanned: every book page (*.md), notebook markdown cells, and the Python string literals that hold
$...$ math (plot labels) in notebook code cells and in code/normlab.
"""

import ast
import re

import pytest

from conftest import ROOT, cell_source, load_notebook, notebook_paths

# A stray variant (regex) -> the canonical form to write instead.
FORBIDDEN = [
    (r"\\sigma\^\{?2\}?_", r"subscript before the square: \sigma_\mathcal{B}^2 (running: \hat{\sigma}^2)"),
    (
        r"\\(?:mu|sigma)_\{?B\b\}?",
        r"\mu_\mathcal{B}, \sigma_\mathcal{B} (the batch is \mathcal{B}; B alone is its size)",
    ),
    (r"_\{\\mathcal\{B\}\}", r"_\mathcal{B} without the extra braces"),
    (r"\\mathcal\s*[A-Za-z]", r"\mathcal{B}, \mathcal{N} (with braces)"),
    (r"\\varepsilon", r"\epsilon"),
    (r"\\(?:hat|bar|tilde)(?:\s*[A-Za-z]|\\[A-Za-z]+)", r"\hat{x}, \hat{\mu}, \bar{x} (accents take braces)"),
    (
        r"_\{?\\(?:text|mathrm|operatorname)\{(?:running|run|s|src|source)\}",
        r"\hat{\mu}, \hat{\sigma}^2 for the running (source) statistics",
    ),
    (r"\\partial\s*L(?![A-Za-z])", r"\partial \ell (the loss is \ell)"),
    (
        r"z\s*\\gamma|\\gamma[^\n]{0,60}skewness|skewness[^\n]{0,60}\\gamma",
        r"\tau for the skewness (\gamma is BN's scale)",
    ),
]


def _python_strings(source):
    """(line, text) of every string literal in Python source; notebook magics are skipped."""
    lines = [
        line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
        for line in source.splitlines()
    ]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:  # not plain Python (an unusual magic): scan every line that holds a $
        return [(i, line) for i, line in enumerate(source.splitlines(), 1) if "$" in line]
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def _math_strings(source):
    """The string literals that hold $...$ math, one (line, text line) per line of each."""
    out = []
    for lineno, text in _python_strings(source):
        if re.search(r"\$[^$]*\\[A-Za-z][^$]*\$", text):
            out += [(lineno + k, line) for k, line in enumerate(text.splitlines())]
    return out


def sources():
    """(where, line, text) for every line of the book's prose and of its math in Python strings."""
    pages = sorted(ROOT.glob("*.md")) + sorted((ROOT / "chapters").rglob("*.md"))
    for path in pages:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield str(path.relative_to(ROOT)), i, line
    for path in notebook_paths():
        name = str(path.relative_to(ROOT))
        for c, cell in enumerate(load_notebook(path)["cells"]):
            text = cell_source(cell)
            if cell["cell_type"] == "markdown":
                rows = enumerate(text.splitlines(), 1)
            elif cell["cell_type"] == "code":
                rows = _math_strings(text)
            else:
                continue
            for i, line in rows:
                yield f"{name} cell {c}", i, line
    for path in sorted((ROOT / "code" / "normlab").rglob("*.py")):
        for i, line in _math_strings(path.read_text(encoding="utf-8")):
            yield str(path.relative_to(ROOT)), i, line


def stray_variants(rows):
    found = []
    for where, line, text in rows:
        for pattern, canonical in FORBIDDEN:
            for match in re.finditer(pattern, text):
                found.append(f"{where}, line {line}: {match.group(0)!r} -> write {canonical}")
    return found


def test_the_sources_are_scanned():
    rows = list(sources())
    where = {w.split(" cell ")[0] for w, _, _ in rows}
    assert "chapters/scratch/index.md" in where
    assert "chapters/scratch/lab.ipynb" in where
    # The plot labels in code cells are scanned too.
    assert any(
        w.startswith("chapters/small_batches/lab.ipynb cell") and t == r"std($\mu_\mathcal{B}$) / $\sigma$"
        for w, _, t in rows
    )


def test_no_stray_notation():
    found = stray_variants(sources())
    assert not found, "stray notation (STYLE.md: the same symbols across the book):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "variant",
    [
        r"$\sigma^2_\mathcal{B}$",
        r"$\sigma^2_{\text{running}}$",
        r"$\mu_B$",
        r"$\sigma_{B}^2$",
        r"$\sigma_{\mathcal{B}}^2$",
        r"$\mathcal N(0, 1)$",
        r"$\varepsilon$",
        r"$\hat x_i$",
        r"$\hat\mu$",
        r"$\bar\sigma^2$",
        r"$\mu_\text{s}$",
        r"$\partial L / \partial y$",
        r"$\partial L_i$",
        r"$1 + z\gamma$",
    ],
)
def test_each_stray_variant_is_caught(variant):
    assert stray_variants([("plant.md", 1, f"text {variant} text")]), variant


@pytest.mark.parametrize(
    "fine",
    [
        r"$\mu_\mathcal{B}$ and $\sigma_\mathcal{B}^2$ over $B$ examples",
        r"$\hat{x}_i$",
        r"$\hat{\mu}_c$",
        r"$\hat{\sigma}^2$",
        r"$\epsilon$",
        r"$\mathcal{N}(0, 1)$",
        r"$\partial \ell / \partial x_i$",
        r"$\mu_S$, $\sigma_S^2$",
        r"$\mu_r$ and $M_{2,r}$",
        r"$1/\sqrt{B}$",
        r"$\bar{\mu}$",
        r"$\gamma$, $\beta$",
    ],
)
def test_canonical_forms_pass(fine):
    assert not stray_variants([("plant.md", 1, fine)]), fine


def test_a_planted_variant_in_a_notebook_label_is_caught():
    code = 'if True:\n    %matplotlib inline\n    ax.set(xlabel="k", ylabel=r"std($\\mu_B$)")\n'
    rows = [("plant.ipynb cell 0", i, t) for i, t in _math_strings(code)]
    found = stray_variants(rows)
    assert len(found) == 1 and found[0].startswith("plant.ipynb cell 0, line 3: '\\\\mu_B'"), found


def test_chapter_1_defines_the_canonical_symbols():
    """STYLE's symbols exist where they are introduced, so the canonical forms cannot quietly vanish."""
    text = (ROOT / "chapters" / "scratch" / "index.md").read_text(encoding="utf-8")
    for symbol in [
        r"\mathcal{B}",
        r"\mu_\mathcal{B}",
        r"\sigma_\mathcal{B}^2",
        r"\hat{x}_i",
        r"\gamma",
        r"\beta",
        r"\epsilon",
        r"\hat{\mu}",
        r"\hat{\sigma}^2",
        r"\partial \ell",
    ]:
        assert symbol in text, f"chapters/scratch/index.md no longer writes {symbol}"
    # m is the momentum: PyTorch's update, with the weight m on the new batch.
    assert r"\hat{\mu} \leftarrow (1 - m)\, \hat{\mu} + m \, \mu_\mathcal{B}" in text
