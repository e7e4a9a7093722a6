"""Units of the command line: parse rates, durations, counts and sizes as users write them; format them back.

Rates with an explicit unit in bits (``10gbit``, ``10Gb/s``, ``100mbit``) or bytes (``25GB/s``,
``1GiB/s``), durations with ``ns``/``us``/``ms``/``s``, counts such as ``7e9``/``7B``/``350M``, sizes
such as ``25MB``/``1MiB``. Parsers raise ``ValueError``/``TypeError`` naming the argument, what
was expected and what came; :func:`gradcomp.cli._common.arg_type` turns that into a usage error.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "parse_bandwidth",
    "parse_duration",
    "parse_count",
    "parse_bytes",
    "format_bandwidth",
    "format_bytes",
    "format_duration",
]




_NUM = r"([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"
_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024.0, "mi": 1024.0**2, "gi": 1024.0**3, "ti": 1024.0**4}


def parse_bandwidth(text: str, what: str = "bandwidth") -> float:
    """Parse a link rate with an explicit unit into bytes per second.

    Bits: ``10gbit``, ``10Gbit/s``, ``100mbit``, ``10gbps``, ``10Gb/s`` (lower-case ``b``).
    Bytes: ``25GB/s``, ``25GiB/s``, ``3.2MB/s``, ``1e9B/s`` (upper-case ``B`` followed by ``/s``).
    Prefixes k, M, G, T are decimal; Ki, Mi, Gi, Ti are binary. A bare number is rejected because
    bits and bytes differ eightfold.

    Example: ``parse_bandwidth("10gbit") == 1.25e9`` and ``parse_bandwidth("25GB/s") == 25e9``.

    Args:
        text: the rate as written by a user.
        what: the argument's name, used in the error message.

    Returns:
        Bytes per second (a positive float).
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string such as '10gbit' or '25GB/s', got {type(text).__name__}")
    m = re.fullmatch(_NUM + r"\s*([kKmMgGtT]i?)?(bits?(?:/s)?|bps|b/s|B/s|Bps|bytes?/s)", text.strip())
    if m is None:
        raise ValueError(
            f"{what} must be a number with a rate unit such as '10gbit', '100mbit', '10Gb/s' (bits) "
            f"or '25GB/s' (bytes), got {text!r}"
        )
    value = float(m.group(1))
    prefix = (m.group(2) or "").lower()
    unit = m.group(3)
    per_byte = 1.0 if unit.startswith("B") or unit.startswith("byte") else 1.0 / 8.0
    rate = value * _SI[prefix] * per_byte
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"{what} must be positive and finite, got {text!r}")
    return rate


_DURATIONS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_duration(text: str, what: str = "latency") -> float:
    """Parse a duration with a unit (``ns``, ``us``, ``ms``, ``s``) into seconds; ``0`` is allowed.

    Example: ``parse_duration("5us") == 5e-6``; ``parse_duration("0.5ms") == 5e-4``.

    Args:
        text: the duration as written by a user.
        what: the argument's name, used in the error message.

    Returns:
        Seconds (a non-negative float).
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string such as '5us', got {type(text).__name__}")
    s = text.strip()
    if s in ("0", "0.0"):
        return 0.0
    m = re.fullmatch(_NUM + r"\s*(ns|us|µs|ms|s)", s)
    if m is None:
        raise ValueError(f"{what} must be a number with a unit ns, us, ms or s such as '5us', got {text!r}")
    value = float(m.group(1)) * _DURATIONS[m.group(2)]
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {text!r}")
    return value


_COUNT_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str, what: str = "params") -> int:
    """Parse a positive count such as ``7e9``, ``7B``, ``350M``, ``125k`` or ``1_000_000``.

    Suffixes (case-insensitive): k = 1e3, M = 1e6, B or G = 1e9, T = 1e12.

    Example: ``parse_count("7B") == 7_000_000_000``; ``parse_count("1.3e9") == 1_300_000_000``.

    Args:
        text: the count as written by a user.
        what: the argument's name, used in the error message.

    Returns:
        A positive int.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string such as '7e9' or '350M', got {type(text).__name__}")
    m = re.fullmatch(_NUM + r"\s*([kKmMbBgGtT]?)", text.strip().replace("_", ""))
    if m is None:
        raise ValueError(f"{what} must be a positive number such as '7e9', '7B' or '350M', got {text!r}")
    value = float(m.group(1)) * _COUNT_SUFFIX[m.group(2).lower()]
    if not math.isfinite(value) or value > 1e18:
        raise ValueError(f"{what} must be a finite count of at most 1e18, got {text!r}")
    if value < 1:
        raise ValueError(f"{what} must be at least 1, got {text!r}")
    return int(round(value))


def parse_bytes(text: str, what: str = "size") -> int:
    """Parse a byte size such as ``25MB``, ``1MiB``, ``512kB`` or ``4096B`` into bytes.

    Example: ``parse_bytes("25MB") == 25_000_000``; ``parse_bytes("1MiB") == 1_048_576``.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string such as '25MB', got {type(text).__name__}")
    m = re.fullmatch(_NUM + r"\s*([kKmMgGtT]i?)?B", text.strip())
    if m is None:
        raise ValueError(f"{what} must be a number with a unit such as '25MB', '1MiB' or '4096B', got {text!r}")
    value = float(m.group(1)) * _SI[(m.group(2) or "").lower()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{what} must be at least 1 byte, got {text!r}")
    return int(round(value))


def format_bandwidth(bytes_per_s: float) -> str:
    """Format bytes per second as a network rate in bits, e.g. ``1.25e9 -> '10 Gbit/s'``."""
    if bytes_per_s == math.inf:
        return "any"
    if bytes_per_s <= 0:
        return "never"
    bits = bytes_per_s * 8
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"


def format_bytes(n: float) -> str:
    """Format a byte count with a decimal prefix, e.g. ``4.9e10 -> '49 GB'``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_duration(seconds: float) -> str:
    """Format seconds with a unit, e.g. ``0.0123 -> '12.3 ms'``."""
    if seconds >= 1 or seconds == 0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"
