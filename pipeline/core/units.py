"""Human units in configuration: memory sizes such as ``"512M"`` or ``"16G"`` (autofaiss's spelling)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text: str | int) -> int:
    """Parse a memory size such as ``"16G"`` into bytes.

    >>> parse_memory("16G")
    17179869184
    >>> parse_memory("512M")
    536870912
    >>> parse_memory("1.5K")
    1536
    >>> parse_memory(100)
    100
    """
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"memory size must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse memory size {text!r}; use e.g. '512M' or '16G'")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value)
