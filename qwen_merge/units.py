"""One way to show a byte count to a person: `human_bytes(n)`.

Decimal units (kB = 1000 B, as disk vendors, `df -H` and Hugging Face's file listings count) with three
significant digits: `512 B`, `220 kB`, `1.87 GB`, `8.04 GB`. Messages that a user may act on (free space)
give the exact byte count beside it. Binary units (MiB) stay only where memory is meant, e.g. the plan's
predicted peak memory.
"""

from __future__ import annotations

_UNITS = ("kB", "MB", "GB", "TB")


def human_bytes(n: int) -> str:
    """`n` bytes in the largest decimal unit that keeps the value below 1000, with 3 significant digits."""
    if abs(n) < 1000:
        return f"{n} B"
    for power, unit in enumerate(_UNITS[:-1], 1):
        text = _three_digits(n / 1000**power)
        if abs(float(text)) < 1000:  # 999.7 kB would round to "1000 kB": the next unit shows "1.00 MB"
            return f"{text} {unit}"
    return f"{_three_digits(n / 1000**len(_UNITS))} {_UNITS[-1]}"


def _three_digits(value: float) -> str:
    # The thresholds are where rounding adds a digit: 9.996 prints as "10.0", not "10.00".
    size = abs(value)
    decimals = 2 if size < 9.995 else 1 if size < 99.95 else 0
    return f"{value:.{decimals}f}"
