"""Waiting: the one polling helper of the product code."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    interval: float = 0.05,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Poll ``predicate`` every ``interval`` seconds until it is true or ``timeout`` seconds pass.

    Returns:
        Whether ``predicate`` became true; it is asked once more at the deadline.
    """
    deadline = clock() + timeout
    while clock() < deadline:
        if predicate():
            return True
        sleep(interval)
    return predicate()
