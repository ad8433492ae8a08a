"""The values a config key may take (`Domain`), and the usual ones: `at_least`, `above`, `one_of`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Domain:
    """The values a config key may take: `accepts(value)`, described as `text` in the error."""

    accepts: Callable[[Any], bool]
    text: str


def at_least(low, note: str = "") -> Domain:
    return Domain(lambda v: v >= low, f"must be >= {low}{note}")


def above(low) -> Domain:
    return Domain(lambda v: v > low, f"must be > {low}")


def one_of(*choices) -> Domain:
    return Domain(lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}")
