"""Tests of gradcomp.checks: the shared argument checks and the widths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradcomp import codec
from gradcomp.checks import SUPPORTED_BITS, check_bits, check_bool, check_int, check_number
from gradcomp.codec.formats import gradient_bits


def test_widths_are_the_codecs():
    assert SUPPORTED_BITS == codec.SUPPORTED_BITS == (2, 3, 4, 8)
    assert set(gradient_bits()) < set(SUPPORTED_BITS) and 3 not in gradient_bits()


def test_check_bits():
    assert check_bits(4) == 4
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 3"):
        check_bits(3, gradient_bits())
    for bad in (True, 8.0, "8"):
        with pytest.raises(TypeError, match="bits must be an int"):
            check_bits(bad)


def test_check_int():
    assert check_int("n", 3) == 3
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        check_int("n", 0)
    with pytest.raises(ValueError, match=r"bins must be an int >= 2, got 1"):
        check_int("bins", 1, 2)
    with pytest.raises(ValueError, match="<= 4"):
        check_int("k", 5, 1, 4)
    with pytest.raises(TypeError, match="n must be a positive int, got bool True"):
        check_int("n", True)


def test_check_number_and_bool():
    assert check_number("p", np.float32(99.5), low=50, high=100, low_open=True) == 99.5
    with pytest.raises(ValueError, match=r"p must be in \(50, 100\], got 50"):
        check_number("p", 50, low=50, high=100, low_open=True)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="got"):
            check_number("x", bad)
    with pytest.raises(TypeError, match="x must be a real number"):
        check_number("x", "1")
    assert check_bool("flag", False) is False
    with pytest.raises(TypeError, match="flag must be a bool, got int 1"):
        check_bool("flag", 1)
