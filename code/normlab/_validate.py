"""Argument checks shared by the whole package: is this value an int, or a real number?

``bool`` is a subclass of ``int`` in Python, so ``isinstance(True, int)`` holds; an argument
such as ``steps=True`` is a mistake, not the number 1. These predicates exclude bools.
"""

from __future__ import annotations

__all__ = ["is_int", "is_number"]


def is_int(value) -> bool:
    """True for a Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for a Python int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
