"""Argument checks shared by the whole package: is this value an int, a real number, a positive int?

``bool`` is a subclass of ``int`` in Python, so ``isinstance(True, int)`` holds; an argument
such as ``steps=True`` is a mistake, not the number 1. These predicates exclude bools.
"""

from __future__ import annotations

__all__ = ["check_positive_int", "is_int", "is_number"]


def is_int(value) -> bool:
    """True for a Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for a Python int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name, value) -> None:
    """Raise ValueError, naming the argument, unless value is an int >= 1 (bools excluded)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
