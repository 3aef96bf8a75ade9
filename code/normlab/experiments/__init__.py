"""The experiments whose results the chapters show and assert: one module per chapter."""


def _check_positive_int(name, value):
    """Raise ValueError unless value is a positive int (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
