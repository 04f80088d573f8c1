"""One way to show a byte count to a person: `human_bytes(n)`.

Decimal units (kB = 1000 B, as disk vendors, `df -H` and Hugging Face's file listings count) with three
significant digits: `512 B`, `220 kB`, `1.87 GB`, `8.04 GB`. Messages that a user may act on (free space)
give the exact byte count beside it. Binary units (MiB) stay only where memory is meant, e.g. the plan's
predicted peak memory.
"""

from __future__ import annotations

import re

_UNITS = ("kB", "MB", "GB", "TB")
# As Hugging Face reads `max_shard_size`: decimal KB..TB, binary KiB..TiB, and a lower-case `b` for bits.
_SIZE_FACTORS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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


def parse_size(text: str | int) -> int:
    """A byte count as Hugging Face's `max_shard_size` takes it: an int, or "5GB" (5·10⁹), "500MB", "2GiB"
    (2·2³⁰), "1000000"; a lower-case final `b` means bits ("5Gb" is 5·10⁹/8 bytes).

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"a size must be positive, got {text}")
        return text
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KkMmGgTt]i?[Bb]|[Bb])?\s*", str(text))
    if not found:
        raise ValueError(f"{text!r} is not a size; expected bytes or a number with KB, MB, GB, TB (or KiB, MiB, GiB)")
    unit = found[2] or ""
    bits = unit.endswith("b") and unit != "b"
    value = float(found[1]) * _SIZE_FACTORS[unit.lower()] / (8 if bits else 1)
    if value < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)
