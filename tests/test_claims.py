"""normlab.runtime.claims: registered claims, verdicts computed from paired results, one recording notebook each."""

import ast
import re
import sys

import numpy as np
import pytest

from conftest import ROOT, cell_source, load_notebook, notebook_paths
from normlab.runtime import claims
from normlab.runtime.claims import CLAIMS, REGISTRY, VERDICTS, Criterion, record, verdict
from normlab.runtime.evidence import paired

sys.path.insert(0, str(ROOT / "_ext"))
from claims_page import registry_markdown  # noqa: E402

PAGE = ROOT / "claims.md"


def parse_cell(source):
    """Parse a code cell, with IPython magics (%pip, !ls) replaced by `pass`."""
    lines = [re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in source.splitlines()]
    return ast.parse("\n".join(lines))


def is_record_call(node):
    """Whether node is `record(...)` or `claims.record(...)`."""
    func = getattr(node, "func", None)
    if isinstance(func, ast.Name):
        return func.id == "record"
    return isinstance(func, ast.Attribute) and func.attr == "record" and getattr(func.value, "id", "") == "claims"


def record_calls():
    """Every `claims.record(...)` call in the chapters' notebooks: key, notebook, string literals in it."""
    calls = []
    for path in notebook_paths():
        rel = str(path.relative_to(ROOT))
        for cell in load_notebook(path)["cells"]:
            if cell["cell_type"] != "code" or "record(" not in cell_source(cell):
                continue
            for node in ast.walk(parse_cell(cell_source(cell))):
                if not is_record_call(node):
                    continue
                assert node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str), (
                    f"{rel}: record() needs the claim's key as a literal string")
                strings = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                strings += [v.value for n in ast.walk(node) if isinstance(n, ast.JoinedStr)
                            for v in n.values if isinstance(v, ast.Constant)]
                calls.append({"key": node.args[0].value, "notebook": rel, "strings": strings})
    return calls


def labels_in(notebook):
    cells = load_notebook(ROOT / notebook)["cells"]
    return set(re.findall(r"^\(([\w-]+)\)=", "\n".join(cell_source(c) for c in cells if c["cell_type"] == "markdown"),
                          re.MULTILINE))


@pytest.fixture
def glued(monkeypatch):
    store = {}

    def glue(name, value, display=True, quiet=False):
        store[name] = (value, display)

    monkeypatch.setattr(claims, "glue", glue)
    return store


def test_the_registry_holds_the_seed_texts_ten_claims_well_formed():
    assert VERDICTS == ("supported", "partly", "not supported", "contested", "not tested")
    assert len(CLAIMS) == 11 and list(CLAIMS) == list(REGISTRY)
    claims.check_registry()


@pytest.mark.parametrize("outcomes, measures, untested, expected", [
    ({"a": "met", "b": "met"}, {}, False, "supported"),
    ({"a": "met", "b": "met"}, {}, True, "partly"),
    ({"a": "met", "b": "not shown"}, {}, False, "partly"),
    ({"a": "met", "b": "reversed"}, {}, False, "partly"),
    ({"a": "met", "b": "reversed"}, {"a": "x", "b": "x"}, False, "contested"),
    ({"a": "met", "b": "not shown"}, {"a": "x", "b": "x"}, False, "partly"),
    ({"a": "not shown", "b": "reversed"}, {}, False, "not supported"),
    ({"a": "met", "b": "not tested"}, {}, False, "partly"),
    ({"a": "not tested"}, {}, False, "not tested"),
])
def test_verdict_follows_the_outcomes(outcomes, measures, untested, expected):
    assert verdict(outcomes, measures=measures, untested=untested) == expected


@pytest.mark.parametrize("bad", [{}, {"a": "holds"}, {"a": "supported"}])
def test_verdict_rejects_unknown_outcomes(bad):
    with pytest.raises(ValueError, match="outcomes must be"):
        verdict(bad)


GAIN = paired(np.array([3.0, 2.0, 4.0, 3.5, 2.5, 3.0, 2.8, 3.2]), 0.0)  # about +3, CI about [2.5, 3.5]
LOSS = paired(-GAIN.diffs, 0.0)
NOISE = paired(np.array([1.0, -1.0, 0.5, -0.5, 0.2, -0.2, 0.1, -0.1]), 0.0)


@pytest.mark.parametrize("test, margin, result, expected", [
    ("above", 2.0, GAIN, "met"), ("above", 4.0, GAIN, "not shown"), ("above", 0.0, LOSS, "reversed"),
    ("above", 0.0, NOISE, "not shown"), ("below", 0.0, LOSS, "met"), ("below", 0.0, GAIN, "reversed"),
    ("within", 2.0, NOISE, "met"), ("within", 2.0, GAIN, "reversed"), ("within", 3.0, GAIN, "not shown"),
    ("above", 0.0, None, "not tested"),
])
def test_a_criterion_is_decided_by_its_interval(test, margin, result, expected):
    assert Criterion("x", "words", test, margin).outcome(result) == expected


def test_a_ratio_criterion_reads_the_margin_as_a_ratio():
    r = paired(np.array([8.0, 9.0, 7.0, 8.5]), np.ones(4), ratio=True)
    assert Criterion("x", "w", "above", 3.0).outcome(r) == "met"
    assert Criterion("x", "w", "below", 1.0).outcome(r) == "reversed"
    assert Criterion("x", "w", "within", 2.0).outcome(r) == "reversed"


def _results(key, result=GAIN):
    return {c.name: result for c in REGISTRY[key].criteria}


@pytest.mark.parametrize("key, results, evidence, match", [
    ("ICS", None, "Measured.", "unknown claim 'ICS'.*higher_lr"),
    ("ics", {"drift": GAIN}, "Measured.", "registered with criteria"),
    ("ics", {**_results("ics"), "extra": GAIN}, "Measured.", "registered with criteria"),
    ("ics", "supported", "Measured.", "registered with criteria"),
    ("ics", {**_results("ics"), "gradient": 3.0}, "Measured.", "needs a normlab.runtime.evidence.Paired"),
    ("ics", _results("ics"), "  ", "evidence must be a non-empty sentence"),
])
def test_record_rejects_bad_input(key, results, evidence, match, glued):
    with pytest.raises(ValueError, match=match):
        record(key, results, evidence)
    assert not glued  # nothing is glued when the input is bad


def test_record_computes_the_verdict_and_glues_results_and_outcomes(glued, capsys):
    drift = paired(np.array([9.0, 8.0, 10.0, 9.5]), np.ones(4), ratio=True)
    gradient = paired(np.array([5.0, 6.0, 4.0, 5.5]), np.ones(4), ratio=True)  # BN's is larger: reversed
    rec = record("ics", {**_results("ics", gradient), "drift": drift}, " Drift 9x, gradient change 5x. ")
    assert rec.verdict == "contested"
    assert rec.outcomes == {"drift": "met", "gradient": "reversed", "gradient_he": "reversed",
                            "gradient_equal": "reversed"}
    assert glued["claim_ics_verdict"] == ("contested", False)
    assert glued["claim_ics_drift"] == ("met", False) and glued["claim_ics_gradient"] == ("reversed", False)
    assert glued["claim_ics_evidence"] == ("Drift 9x, gradient change 5x.", False)
    assert drift.summary() in glued["claim_ics_results"][0] and "(reversed)" in glued["claim_ics_results"][0]
    out = capsys.readouterr().out
    assert "Verdict: contested" in out and CLAIMS["ics"] in out


def test_an_untested_part_caps_the_verdict_at_partly(glued):
    assert record("placement", _results("placement"), "Before.").verdict == "partly"
    assert record("higher_lr", _results("higher_lr"), "Higher.").verdict == "supported"
    assert record("higher_lr", {"max_lr": None, "max_lr_relu": None}, "Not run.").verdict == "not tested"


def test_every_claim_is_recorded_once_by_the_notebook_the_registry_names():
    calls = record_calls()
    unknown = [f"{c['notebook']} records {c['key']!r}" for c in calls if c["key"] not in REGISTRY]
    assert not unknown, f"notebooks record claims that normlab.runtime.claims.REGISTRY does not have: {unknown}"
    for key, claim in REGISTRY.items():
        where = [c["notebook"] for c in calls if c["key"] == key]
        assert where == [claim.notebook], f"claim {key!r} should be recorded once, by {claim.notebook}; found {where}"
        assert claim.section in labels_in(claim.notebook), (
            f"claim {key!r}: section {claim.section!r} is not a label of {claim.notebook}")


def test_no_notebook_writes_a_verdict_word_into_a_record():
    for c in record_calls():
        typed = [s for s in c["strings"] if s.strip().lower() in VERDICTS]
        assert not typed, f"{c['notebook']} passes the verdict word(s) {typed} to record({c['key']!r}): compute it"


def test_no_notebook_code_holds_a_verdict_word():
    """A verdict is computed by normlab.runtime.claims.verdict, never spelled in a notebook's code."""
    for path in notebook_paths():
        for i, cell in enumerate(load_notebook(path)["cells"]):
            if cell["cell_type"] != "code":
                continue
            tree = parse_cell(cell_source(cell))
            words = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                     and n.value.strip().lower() in VERDICTS]
            assert not words, f"{path.relative_to(ROOT)}, cell {i}: the verdict word(s) {words} are typed"


def test_the_page_renders_the_registry_and_glues_from_the_recording_notebook():
    assert "```{claims-registry}" in PAGE.read_text(encoding="utf-8")
    md = registry_markdown()
    for key, claim in REGISTRY.items():
        for field in ["verdict", "results", "evidence"] + [c.name for c in claim.criteria]:
            assert f"{{glue:text}}`{claim.notebook}::claim_{key}_{field}:s`" in md, f"{key}: {field} is not glued"
        assert claim.setup in md and claim.at_scale in md and all(c.says in md for c in claim.criteria)
        chapter = claim.notebook.rsplit("/", 1)[0] + "/index"
        assert f"{{ref}}`{claim.section}` ({{doc}}`{chapter}`)" in md
