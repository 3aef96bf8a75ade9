"""What every chapter's self-checks share.

A self-check is a ``check_*`` function decorated with ``_self_check``: it runs the student's
function (or class, or Triton kernel) against the course's reference, prints one ``PASS`` line
(``_pass``) when every case matches, raises ``AssertionError`` (``assert_close`` names the worst
element) when one does not, and prints ``NOT ATTEMPTED`` and returns when the function is still the
student edition's stub. The functions whose check passed are kept in one set for all chapters
(``passed``, ``solution_or_reference``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import weakref

import numpy as np

# A self-check cell is a code cell that calls a check (``checks.check_forward(my_forward)``): the
# grader, the student edition and the tests find them with this pattern.
SELF_CHECK = re.compile(r"\bcheck_\w+\s*\(")
# The student edition's stub: ``raise NotImplementedError("Exercise N: <title>" + STUB_SUFFIX)`` in
# place of a solution (coursekit.student writes it, its message split over adjacent string literals
# where one line would be wider than the page; a check reports it without the suffix).
STUB = re.compile(r"raise NotImplementedError\(\s*((?:(?:'[^'\n]*'|\"[^\"\n]*\")\s*)+)\)")
STUB_SUFFIX = " (write your solution here)"
NOT_ATTEMPTED = "NOT ATTEMPTED"  # the grader (grade.py) and tests/nbval_stubs.py read this marker in the output
_passed = weakref.WeakSet()  # the functions whose self-check passed in this session


def _self_check(check):
    """Make ``check(fn, ...)`` tolerate the stub: print NOT ATTEMPTED and return instead of raising;
    remember ``fn`` when the check passes (``passed``)."""

    @functools.wraps(check)
    def run(fn, *args, **kwargs):
        _passed.discard(fn)
        try:
            checked = check(fn, *args, **kwargs)  # False: the check could not run here (it said why)
        except NotImplementedError as exc:
            what = str(exc).removesuffix(STUB_SUFFIX) or fn.__name__
            print(f"{NOT_ATTEMPTED} {what}: nothing to check yet. The notebook goes on; cells that "
                  "need this function use the course's reference until its check passes.")
            return
        if checked is not False:
            _passed.add(fn)

    return run




def _raise_if_stub(fn):
    """Raise the stub's NotImplementedError if ``fn``'s source is the student edition's stub.

    For a Triton kernel, which cannot raise once compiled: its source says whether it is a stub.
    """
    try:
        source = inspect.getsource(getattr(fn, "fn", fn))  # a triton kernel keeps its function in .fn
    except (OSError, TypeError):
        return
    messages = stub_messages(source)
    if messages:
        raise NotImplementedError(messages[0])


def stub_messages(source: str) -> list:
    """The messages of the student edition's stubs in ``source``, in order (adjacent literals joined)."""
    return [ast.literal_eval(f"({m.group(1)})") for m in STUB.finditer(source)]


def passed(fn) -> bool:
    """Return True when ``fn`` passed its self-check in this session (and was not redefined since)."""
    return fn in _passed


def solution_or_reference(fn, reference):
    """Return ``fn`` if it passed its self-check, else ``reference``, saying which one is used.

    ``reference`` None stands for the course's own code where the caller treats None so (for
    instance ``kernels.channel_sums(..., kernel=None)`` runs the course's kernel).
    """
    if passed(fn):
        return fn
    which = "own code" if reference is None else f"reference ({reference.__module__}.{reference.__qualname__})"
    print(f"{fn.__name__} has not passed its self-check yet: this cell uses the course's {which} instead.")
    return reference


def assert_close(name, got, expected, rtol=1e-7, atol=1e-9):
    """Raise AssertionError naming the worst element of ``got`` when it is not close to ``expected``."""
    expected = np.asarray(expected)
    if got is None:
        raise AssertionError(f"{name}: got None (did the function forget to return it?)")
    got = got.detach().cpu().numpy() if hasattr(got, "detach") else np.asarray(got)  # a torch tensor, or not
    if got.shape != expected.shape:
        raise AssertionError(f"{name}: shape {got.shape}, expected {expected.shape}")
    bad = ~np.isclose(got, expected, rtol=rtol, atol=atol)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} elements differ; first at index {idx}: "
            f"expected {expected[idx]:.10g}, got {got[idx]:.10g} (rtol={rtol}, atol={atol})"
        )


def expect_tuple(what, got, names):
    """Raise AssertionError unless ``got`` is a tuple of ``len(names)`` values (``names`` says which)."""
    if not isinstance(got, tuple) or len(got) != len(names):
        found = f"a tuple of {len(got)}" if isinstance(got, tuple) else type(got).__name__
        raise AssertionError(f"{what}: expected a tuple ({', '.join(names)}), got {found}")


def assert_tuple_close(what, got, expected, names, rtol=1e-7, atol=1e-9):
    """``expect_tuple``, then ``assert_close`` for each value of ``got`` against the one of ``expected``."""
    expect_tuple(what, got, names)
    for name, g, e in zip(names, got, expected, strict=True):
        assert_close(f"{what}: {name}", g, e, rtol=rtol, atol=atol)


def _pass(what, n):
    print(f"PASS {what}: matches the reference on {n} inputs.")
