"""One exception type for everything a user can get wrong.

Each message says what is wrong *and* what to do about it, and is raised before
expensive work starts (validate first, compute second).
"""

from __future__ import annotations

import numpy as np


class RephelpersError(ValueError):
    """Bad input, a missing resource or a corrupt artifact, with a fix in the message."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`RephelpersError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise RephelpersError(message)


def is_positive_integer(value: object) -> bool:
    """An integer ≥ 1, numpy's included; a bool is not one (a count, a round size, a cap)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
