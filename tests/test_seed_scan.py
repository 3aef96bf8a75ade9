"""The seed scan: its rewriting of asserts, and the committed seed_scan.json against today's notebooks."""

import json

import pytest

from conftest import ROOT, cell_source, load_notebook
from coursekit.seedscan import _merge, _seeds, asserts_in, interval_check, rewrite_cell
from normlab.runtime.evidence import paired

SCAN = ROOT / "seed_scan.json"


def run_rewritten(source, env):
    """Execute a rewritten cell with a __scan__ that collects its records."""
    records = []

    def scan(key, src, passed, a=None, op=None, b=None):
        records.append((src, passed, a, op, b))
        if not passed:
            raise AssertionError(src)

    env = env | {"__scan__": scan, "__interval_check__": interval_check}
    exec(rewrite_cell(source, "nb:0"), env)  # noqa: S102 (test of the rewriter)
    return records


def test_a_comparison_reports_both_sides_and_the_operator():
    records = run_rewritten("x = 5\nassert x >= 3 * 1  # margin\n", {})
    assert records == [("x >= 3 * 1", True, 5, ">=", 3)]


def test_and_and_chained_comparisons_are_split_into_parts():
    records = run_rewritten("a, b, c = 1, 2, 3\nassert a <= b < c and abs(a - b) < 2\n", {})
    assert [r[0] for r in records] == ["a <= b", "b < c", "abs(a - b) < 2"]
    assert asserts_in("assert a <= b < c and abs(a - b) < 2") == ["a <= b", "b < c", "abs(a - b) < 2"]


def test_a_failing_part_still_fails_and_later_parts_are_not_run():
    with pytest.raises(AssertionError, match="x > 10"):
        run_rewritten("x = 5\nassert x > 10 and x > 1\n", {})


def test_other_asserts_report_their_truth():
    records = run_rewritten("assert all([True, True])\n", {})
    assert records == [("all([True, True])", True, None, None, None)]


def test_an_interval_criterion_reports_the_bound_it_tested_and_the_margin():
    cmp = paired([3.0, 4.0, 5.0, 4.5], [1.0, 1.0, 1.0, 1.0])  # differences 2, 3, 4, 3.5
    lo, hi = cmp.interval
    records = run_rewritten("assert cmp.above(1) and cmp.below(6) and cmp.within(7) and cmp.above()\n", {"cmp": cmp})
    assert records == [("cmp.above(1)", True, lo, ">", 1.0), ("cmp.below(6)", True, hi, "<", 6.0),
                       ("cmp.within(7)", True, max(-lo, hi), "<=", 7.0), ("cmp.above()", True, lo, ">", 0.0)]
    ratio = paired([2.0, 2.2, 1.9], [1.0, 1.0, 1.0], ratio=True)
    assert interval_check(ratio, "above", 1.5)[1:] == (">", pytest.approx(0.405465), True)  # log(1.5)
    with pytest.raises(AssertionError, match=r"cmp.above\(3\)"):
        run_rewritten("assert cmp.above(3)\n", {"cmp": cmp})


def test_magics_are_read_as_statements_in_their_block():
    assert asserts_in('if x:\n    %pip install y\nassert x > 1\n') == ["x > 1"]


def test_cells_without_asserts_are_left_alone():
    source = "%pip install x\ny = 1  # comment\n"
    assert rewrite_cell(source, "nb:0") == source


def test_merge_keeps_the_worst_slack_and_the_failing_seeds():
    asserts = {}
    for seed, slack, passed in [(1, 0.5, True), (2, 0.1, True), (3, -0.2, False)]:
        _merge(asserts, {"key": "k", "source": "a >= b", "op": ">=", "passed": passed, "a": 1.0, "b": 1.0 - slack,
                         "slack": slack}, "nb", seed)
    e = asserts["k"]
    assert (e["held"], e["failed_at"], e["worst_slack"], e["worst_seed"]) == (2, [3], -0.2, 3)


def test_seed_lists():
    assert _seeds("100-103") == [100, 101, 102, 103] and _seeds("3,5") == [3, 5]


@pytest.fixture(scope="module")
def scan():
    if not SCAN.exists():
        pytest.fail("no seed_scan.json: run `make seed-scan` and commit it")
    return json.loads(SCAN.read_text())


def test_the_scan_covers_at_least_12_seeds_at_quick_scale(scan):
    assert len(set(scan["seeds"])) >= 12 and scan["scale"] == "quick"
    for nb, info in scan["notebooks"].items():
        assert sorted(info["seconds"], key=int) == sorted(map(str, scan["seeds"]), key=int), f"{nb}: seeds missing"
        assert info["date"] and info["code_version"], f"{nb}: the scan's date and code version are missing"


def test_every_scanned_assert_held_at_every_scanned_seed(scan):
    failed = {f"{e['notebook']}: {e['source']}": e["failed_at"] for e in scan["asserts"].values() if e["failed_at"]}
    assert not failed, f"asserts that fail at scanned seeds (choose their margins from the scan): {failed}"


def test_scanned_notebooks_ran_without_other_errors(scan):
    errors = {nb: info["errors"] for nb, info in scan["notebooks"].items() if info["errors"]}
    assert not errors, f"cells that raised at scanned seeds: {errors}"


def test_every_assert_of_a_scanned_notebook_was_scanned(scan):
    for nb in scan["notebooks"]:
        seen = sorted(e["source"] for e in scan["asserts"].values() if e["notebook"] == nb)
        now = sorted(s for c in load_notebook(ROOT / nb)["cells"] if c["cell_type"] == "code"
                     for s in asserts_in(cell_source(c)))
        assert now == seen, f"{nb}: its asserts changed since the scan; rerun `make seed-scan` ({set(now) ^ set(seen)})"


def test_a_scan_in_two_jobs_records_what_one_job_records(tmp_path, monkeypatch):
    import nbformat

    from coursekit.seedscan import scan as run_scan

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os\nseed = int(os.environ['NORMLAB_SEED'])"),
                nbformat.v4.new_code_cell("assert seed % 2 == 0 or seed > 0\nassert seed >= 101")]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    monkeypatch.chdir(tmp_path)  # the scan runs notebooks by their path from the root
    one, two = (run_scan([path], [100, 101, 102], root=tmp_path, jobs=j) for j in (1, 2))
    assert one["asserts"] == two["asserts"] and one["notebooks"]["tiny.ipynb"]["errors"] == \
        two["notebooks"]["tiny.ipynb"]["errors"]
    (entry,) = [e for e in two["asserts"].values() if e["source"] == "seed >= 101"]
    assert entry["failed_at"] == [100] and entry["held"] == 2
    assert entry["values"] == {"100": [100, 101], "101": [101, 101], "102": [102, 101]}
    assert list(two["notebooks"]["tiny.ipynb"]["errors"]) == ["100"]
    with pytest.raises(ValueError, match="jobs"):
        run_scan([path], [100], root=tmp_path, jobs=0)
