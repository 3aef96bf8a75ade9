"""The experiments whose results the chapters show and assert: one module per chapter."""


def _check_positive_int(name, value):
    """Raise ValueError unless value is a positive int (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def seeds_for(seed, n):
    """Return the n seeds a notebook run with ``NORMLAB_SEED=seed`` uses: seed * 100 + k for k < n.

    Different notebook seeds give disjoint lists as long as n <= 100.
    """
    _check_positive_int("n", n)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return [100 * seed + k for k in range(n)]
