"""Formula parsing and evaluation (spec §6.8)."""

from __future__ import annotations

import pytest

from schemas.formula import Formula, FormulaError


def test_arithmetic_and_letters() -> None:
    f = Formula("a + 2*B - (C / 4) ^ 2", 3)
    assert f.evaluate([1, 2, 8]) == 1 + 4 - 4
    assert f.letters == {0, 1, 2}
    assert Formula("A % 3", 1).evaluate([7]) == 1
    assert Formula("-A", 1).evaluate([2]) == -2


def test_division_by_zero_is_zero() -> None:
    assert Formula("A/0", 1).pointwise([[1, 2, 0]]) == [0.0, 0.0, 0.0]
    assert Formula("A/B", 2).pointwise([[4, 1], [2, 0]]) == [2.0, 0.0]


def test_stripping_and_errors() -> None:
    assert Formula("A + B!@", 2).evaluate([1, 2]) == 3  # characters outside the grammar are stripped
    for text, count in (("A + C", 2), ("A +", 1), ("", 1), ("A(B)", 2), ("AB", 2), ("A; import os", 1)):
        with pytest.raises(FormulaError):
            Formula(text, count)
