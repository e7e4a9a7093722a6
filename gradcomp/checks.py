"""Argument checks shared by the whole package, and the code widths the codec quantizes.

Every public function checks its input with these, so that one kind of mistake always reads the
same: a wrong type is a ``TypeError``, a value out of range a ``ValueError``, and each message says
what was expected and what came (``"bits must be one of (2, 3, 4, 8), got 5"``).

:data:`SUPPORTED_BITS` ``(2, 3, 4, 8)`` is what the codec quantizes and packs (weights,
activations). What the gradient exchange sends is a wire format: ask the registry
(:func:`gradcomp.codec.formats.wire_format`, :func:`gradcomp.codec.formats.gradient_bits`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

__all__ = [
    "SUPPORTED_BITS",
    "check_bits",
    "check_int",
    "check_is_int",
    "check_number",
    "check_positive",
    "check_bool",
    "check_choice",
]

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: Any, allowed: Sequence[int] = SUPPORTED_BITS, name: str = "bits") -> int:
    """Return ``bits`` if it is an int (not a bool) in ``allowed``.

    Raises:
        TypeError: ``bits`` is not an int.
        ValueError: ``bits`` is not one of ``allowed``.

    Example: ``check_bits(3, (2, 4, 8))`` raises ``ValueError: bits must be one of (2, 4, 8), got 3``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int, one of {tuple(allowed)}, got {type(bits).__name__} {bits!r}")
    if bits not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {bits}")
    return bits


def check_int(name: str, value: Any, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """Return ``value`` if it is an int (not a bool) in ``[minimum, maximum]``.

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value`` is out of range.
    """
    want = "a positive int" if minimum == 1 and maximum is None else f"an int >= {minimum}"
    if maximum is not None:
        want += f" and <= {maximum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {want}, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {want}, got {value}")
    return value


def check_is_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int (not a bool), of any sign; range checks are the caller's.

    Raises:
        TypeError: ``value`` is not an int, e.g. ``check_is_int("bits", 8.0)``:
            ``bits must be an int, got float 8.0``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Return ``float(value)`` if it is a finite number > 0 (>= 0 with ``allow_zero``).

    Raises:
        TypeError: ``value`` is not a real number (bools are refused).
        ValueError: ``value`` is not finite, negative, or zero without ``allow_zero``, e.g.
            ``check_positive("bandwidth", 0)``: ``bandwidth must be a positive finite number, got 0``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} finite number, got {value!r}")
    return float(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``float(value)`` if it is a finite real number within the given bounds.

    Args:
        name: the argument's name, for the message.
        value: the value.
        low, high: bounds (None: unbounded on that side).
        low_open, high_open: whether the bound itself is excluded.

    Raises:
        TypeError: ``value`` is not a real number (bools are refused).
        ValueError: ``value`` is not finite or out of range.

    Example: ``check_number("percentile", 40, low=50, high=100, low_open=True)`` raises
    ``ValueError: percentile must be in (50, 100], got 40``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np

            ok = isinstance(value, (np.integer, np.floating))
        except ImportError:  # pragma: no cover - numpy is a dependency
            ok = False
        if not ok:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if not math.isfinite(v) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value}")
    return v


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` listing them."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value
