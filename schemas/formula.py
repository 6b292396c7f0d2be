"""Trend formulas (spec §6.8): letters A, B, … name series by index; arithmetic; x/0 = 0.

Parsed once with Python's own parser into a restricted tree (no names but series letters, no
calls), then evaluated point-wise.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Sequence

_STRIP = re.compile(r"[^A-Za-z0-9 +\-*/^().%]")
_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b if b else 0.0,
    ast.Mod: lambda a, b: math.fmod(a, b) if b else 0.0,
    ast.Pow: lambda a, b: _power(a, b),
}


class FormulaError(ValueError):
    pass


def _power(a: float, b: float) -> float:
    try:
        result = a**b
    except (OverflowError, ZeroDivisionError):
        return 0.0
    return result if isinstance(result, int | float) and math.isfinite(result) else 0.0


class Formula:
    def __init__(self, text: str, series_count: int) -> None:
        self.text = text
        cleaned = _STRIP.sub("", text).replace("^", "**")
        if not cleaned.strip():
            raise FormulaError("The formula is empty.")
        try:
            tree = ast.parse(cleaned.upper(), mode="eval")
        except SyntaxError as exc:
            raise FormulaError(f"Invalid formula '{text}': {exc.msg}.") from exc
        self.letters: set[int] = set()
        self._check(tree.body, series_count)
        self._tree = tree.body

    def _check(self, node: ast.AST, series_count: int) -> None:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            self._check(node.left, series_count)
            self._check(node.right, series_count)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            self._check(node.operand, series_count)
        elif isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            pass
        elif isinstance(node, ast.Name) and len(node.id) == 1 and node.id.isalpha():
            index = ord(node.id) - ord("A")
            if index >= series_count:
                raise FormulaError(f"The formula uses series {node.id}, but the query has only {series_count} "
                                   f"series ({', '.join(chr(65 + i) for i in range(series_count))}).")
            self.letters.add(index)
        else:
            raise FormulaError(f"Invalid formula '{self.text}': only series letters, numbers, + - * / % ^ and "
                               "parentheses are allowed.")

    def evaluate(self, values: Sequence[float]) -> float:
        """Values by series index."""
        return float(self._eval(self._tree, values))

    def _eval(self, node: ast.AST, values: Sequence[float]) -> float:
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](self._eval(node.left, values), self._eval(node.right, values))
        if isinstance(node, ast.UnaryOp):
            operand = self._eval(node.operand, values)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.Constant):
            return float(node.value)
        assert isinstance(node, ast.Name)
        return float(values[ord(node.id) - ord("A")])

    def pointwise(self, series: Sequence[Sequence[float]]) -> list[float]:
        length = max((len(s) for s in series), default=0)
        return [self.evaluate([s[i] if i < len(s) else 0 for s in series]) for i in range(length)]
