"""The seed scan: run notebooks at many seeds and record, for every assert, the value it tested.

``python -m coursekit.seedscan --seeds 100-111 chapters/pytorch/lab.ipynb ...`` (``make seed-scan``)
executes each notebook once per seed (``NORMLAB_SEED``, quick scale, ``OMP_NUM_THREADS=1``, which
also caps a lab's ``normlab.set_threads(2)``: the thread count of `make test`), with every
``assert`` in its code rewritten to report before it checks:

- ``assert a <op> b`` records a and b, and the *slack*: how far the assert was from failing
  (a - b for >= and >, b - a for <= and <); ``and`` and chained comparisons are split into their
  parts, each recorded on its own;
- an interval criterion of ``normlab.runtime.evidence`` (``assert cmp.above(2)``, ``.below(m)``,
  ``.within(w)``) records the bound of the 95% interval it tested and the margin, on the scale
  of the paired differences (log-ratios for a ratio): ``lo > m``, ``hi < m``, ``max(-lo, hi) <= w``;
- any other assert (``assert all(c.above(3) for c in cmps)``) records whether it held.

It writes ``seed_scan.json``: the seeds; per notebook the date and code version (git commit, with
"+changes" for uncommitted edits under chapters/, code/ or tools/coursekit/) of the scan that ran
it, and its seconds and errors per seed; per assert its notebook, source, how often it held, the
seeds where it failed, and the worst slack with its seed. Scans of some notebooks merge into the
file; the top-level date and code version are those of the latest scan. Margins are chosen from
this file; ``tests/test_seed_scan.py`` fails when a scanned assert did not hold at a scanned seed,
or when a scanned notebook holds an assert the scan has not seen (rerun the scan after changing
one).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_OPS = {ast.GtE: ">=", ast.Gt: ">", ast.LtE: "<=", ast.Lt: "<"}
_PRELUDE = '''
def __scan__(key, source, passed, a=None, op=None, b=None):
    import json as _json, math as _math, os as _os
    slack = None
    try:
        a, b = float(a), float(b)
        slack = a - b if op in (">=", ">") else b - a if op in ("<=", "<") else None
        if slack is not None and not _math.isfinite(slack):
            slack = None
    except (TypeError, ValueError):
        a = b = None
    with open(_os.environ["NORMLAB_SCAN_LOG"], "a") as _f:
        _f.write(_json.dumps({"key": key, "source": source, "passed": bool(passed), "a": a, "op": op, "b": b,
                              "slack": slack}) + "\\n")
    if not passed:
        raise AssertionError(source)


from coursekit.seedscan import interval_check as __interval_check__
'''
_CRITERIA = ("above", "below", "within")


def interval_check(obj, method, *args):
    """Run ``obj.<method>(*args)``, an interval criterion of a ``normlab.runtime.evidence.Paired``.

    Returns (a, op, b, passed): the interval bound the criterion tested, the comparison and the
    margin on the differences' scale, and its result; (None, None, None, passed) for an object
    without an interval.
    """
    passed = getattr(obj, method)(*args)
    if not hasattr(obj, "interval") or not hasattr(obj, "_on_scale"):
        return None, None, None, passed
    lo, hi = obj.interval
    margin = obj._on_scale(args[0] if args and args[0] is not None else obj._null)
    if method == "above":
        return lo, ">", margin, passed
    if method == "below":
        return hi, "<", margin, passed
    return max(-lo, hi), "<=", margin, passed


def _parts(test):
    """Split an assert's test into the parts recorded one by one: ``and`` operands, chained comparisons."""
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return [p for v in test.values for p in _parts(v)]
    if isinstance(test, ast.Compare) and len(test.ops) > 1:
        terms = [test.left, *test.comparators]
        return [ast.Compare(left=terms[i], ops=[op], comparators=[terms[i + 1]]) for i, op in enumerate(test.ops)]
    return [test]


class _Rewrite(ast.NodeTransformer):
    """Replace each assert statement by calls to ``__scan__``, one per part, in order."""

    def __init__(self, prefix):
        self.prefix, self.count = prefix, 0

    def visit_Assert(self, node):
        calls = []
        for part in _parts(node.test):
            source = ast.unparse(part)
            key = f"{self.prefix}:{self.count}"
            self.count += 1
            args = [ast.Constant(key), ast.Constant(source)]
            if isinstance(part, ast.Compare) and type(part.ops[0]) in _OPS:
                a, b = ast.Name("__a", ast.Load()), ast.Name("__b", ast.Load())
                calls += [ast.Assign([ast.Name("__a", ast.Store())], part.left),
                          ast.Assign([ast.Name("__b", ast.Store())], part.comparators[0]),
                          ast.Expr(ast.Call(ast.Name("__scan__", ast.Load()), args + [
                              ast.Compare(a, part.ops, [b]), a, ast.Constant(_OPS[type(part.ops[0])]), b], []))]
            elif (isinstance(part, ast.Call) and isinstance(part.func, ast.Attribute) and part.func.attr in _CRITERIA
                  and not part.keywords and len(part.args) <= 1):
                names = ["__a", "__op", "__b", "__passed"]
                check = ast.Call(ast.Name("__interval_check__", ast.Load()),
                                 [part.func.value, ast.Constant(part.func.attr), *part.args], [])
                calls += [ast.Assign([ast.Tuple([ast.Name(n, ast.Store()) for n in names], ast.Store())], check),
                          ast.Expr(ast.Call(ast.Name("__scan__", ast.Load()), args + [
                              ast.Name("__passed", ast.Load()), ast.Name("__a", ast.Load()),
                              ast.Name("__op", ast.Load()), ast.Name("__b", ast.Load())], []))]
            else:
                calls.append(ast.Expr(ast.Call(ast.Name("__scan__", ast.Load()), args + [part], [])))
        return calls


def asserts_in(source):
    """Return the sources of the assert parts in a code cell, in order (what the scan records)."""
    tree = parse_cell(source)
    return [ast.unparse(p) for node in ast.walk(tree) if isinstance(node, ast.Assert) for p in _parts(node.test)]


def parse_cell(source):
    """Parse a code cell's source, its IPython magic and shell lines (%pip, !ls) read as ``pass``."""
    from coursekit.cells import magics_as_pass

    return ast.parse(magics_as_pass(source))


def rewrite_cell(source, prefix):
    """Return the cell's source with its asserts reporting to ``__scan__``; unchanged if it has none."""
    if "assert" not in source:
        return source
    tree = parse_cell(source)
    if not any(isinstance(n, ast.Assert) for n in ast.walk(tree)):
        return source
    magics = [line for line in source.splitlines() if line.lstrip().startswith(("%", "!"))]
    if magics:
        return source  # a cell with magics and asserts would lose its magics; none exists today
    return ast.unparse(ast.fix_missing_locations(_Rewrite(prefix).visit(tree)))


def _run(path, seed, log):
    """Execute one notebook at one seed with rewritten asserts; return (seconds, errors)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.source = rewrite_cell(cell.source, f"{path}:{i}")
    nb.cells.insert(0, nbformat.v4.new_code_cell(_PRELUDE))
    env = dict(os.environ, NORMLAB_SEED=str(seed), NORMLAB_SCALE="quick", NORMLAB_PROGRESS="0",
               OMP_NUM_THREADS="1", NORMLAB_SCAN_LOG=str(log))
    client = NotebookClient(nb, timeout=900, allow_errors=True, kernel_name="python3",
                            resources={"metadata": {"path": str(Path(path).parent)}})
    start = time.perf_counter()
    client.execute(env=env)  # the kernel's own environment: runs in other threads keep theirs
    seconds = time.perf_counter() - start
    errors = [{"cell": i - 1, "error": o.get("ename", "")} for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    return round(seconds, 1), errors


def _run_retrying(path, seed, log, tries=3):
    """_run, started again when the kernel dies before finishing (a port race with another kernel)."""
    from nbclient.exceptions import DeadKernelError

    for attempt in range(tries):
        log.write_text("")  # a dead kernel's partial records are dropped
        try:
            return _run(path, seed, log)
        except DeadKernelError:
            if attempt == tries - 1:
                raise
            print(f"{path} seed {seed}: the kernel died; starting it again", flush=True)


def scan(notebooks, seeds, root=".", out=None, jobs=1):
    """Run every notebook at every seed; return the scan as a dict (see the module docstring).

    With ``out``, the scan so far is merged into that file after each notebook, so a long scan
    that is stopped keeps every notebook it finished. ``jobs`` seeds of a notebook run at once,
    each kernel started with ``OMP_NUM_THREADS=1`` (a lab's ``normlab.set_threads(2)`` then gets
    one thread), so two jobs halve the wait on two cores. The result does not depend on ``jobs``.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    root = Path(root)
    result = {"seeds": list(seeds), "scale": "quick", "date": datetime.date.today().isoformat(),
              "code_version": _version(root), "notebooks": {}, "asserts": {}}
    for nb in notebooks:
        rel = str(Path(nb).resolve().relative_to(root.resolve()))
        result["notebooks"][rel] = {"seconds": {}, "errors": {}, "date": result["date"],
                                    "code_version": result["code_version"]}

        def one(seed, rel=rel):
            with tempfile.NamedTemporaryFile("w+", suffix=".jsonl", delete=False) as f:
                log = Path(f.name)
            seconds, errors = _run_retrying(rel, seed, log)
            records = [json.loads(line) for line in log.read_text().splitlines()]
            log.unlink()
            print(f"{rel} seed {seed}: {seconds:.1f} s, {len(errors)} errors", flush=True)
            return seed, seconds, errors, records

        with ThreadPoolExecutor(max_workers=jobs) as pool:  # each job waits on its own kernel process
            runs = list(pool.map(one, seeds))
        for seed, seconds, errors, records in runs:  # in seed order, whatever order they finished in
            result["notebooks"][rel]["seconds"][str(seed)] = seconds
            if errors:
                result["notebooks"][rel]["errors"][str(seed)] = errors
            for rec in records:
                _merge(result["asserts"], rec, rel, seed)
        if out is not None:
            write(result, out)
    return result


def write(scan_result, out):
    """Merge a scan into the file ``out`` (other notebooks' entries at the same seeds are kept)."""
    out, new = Path(out), dict(scan_result)
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("seeds") == new["seeds"]:
            keep = {k: v for k, v in old["asserts"].items() if v["notebook"] not in new["notebooks"]}
            new["asserts"] = keep | new["asserts"]
            kept = {k: v for k, v in old["notebooks"].items() if k not in new["notebooks"]}
            new["notebooks"] = kept | new["notebooks"]
    out.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
    return new


def _merge(asserts, rec, notebook, seed):
    entry = asserts.setdefault(rec["key"], {"notebook": notebook, "source": rec["source"], "op": rec["op"],
                                            "held": 0, "failed_at": [], "worst_slack": None, "worst_seed": None,
                                            "values": {}})
    entry["held"] += rec["passed"]
    if not rec["passed"]:
        entry["failed_at"].append(seed)
    if rec["slack"] is not None and (entry["worst_slack"] is None or rec["slack"] < entry["worst_slack"]):
        entry["worst_slack"], entry["worst_seed"] = rec["slack"], seed
    if rec["a"] is not None:
        entry["values"][str(seed)] = [rec["a"], rec["b"]]


def _version(root):
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "chapters", "code",
                                "tools/coursekit"], capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "")
    except OSError:
        return "unknown"


def _seeds(text):
    """'100-111' or '3,5,8' -> a list of ints."""
    if "-" in text:
        lo, hi = (int(v) for v in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(v) for v in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", help="notebooks to scan")
    parser.add_argument("--seeds", default="100-111", help="e.g. 100-111 (default: 12 seeds) or 3,5,8")
    parser.add_argument("--out", default="seed_scan.json", help="where to write the scan (merged into it)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (default 1; see scan())")
    args = parser.parse_args(argv)
    seeds = _seeds(args.seeds)
    if len(seeds) < 1:
        parser.error("no seeds")
    out = Path(args.out)
    new = write(scan(args.notebooks, seeds, out=out, jobs=args.jobs), out)
    failed = [v for v in new["asserts"].values() if v["failed_at"]]
    print(f"wrote {out}: {len(new['asserts'])} asserts over {len(seeds)} seeds; {len(failed)} failed somewhere")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
