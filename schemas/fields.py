"""Reading one request parameter: the one place for types, JSON-encoded fields and bounds.

Legacy insight parameters arrive as JSON values in a POST body, or as strings (structured ones
JSON-encoded) in a GET query. Every reader here refuses what does not fit with a `RequestError`
naming the parameter (`attr`), so no type or size reaches the computation unchecked. The bounds keep
one request's work and answer bounded; each error says the limit.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from schemas.errors import RequestError

MAX_SERIES = 100              # entities of a trend (formulas name them A..Z, a few more are harmless)
MAX_BUCKETS = 10_000          # intervals of one series over one range (a year of hours is 8,784)
MAX_CELLS = 2_000_000         # series × intervals × breakdown values a trend may answer
MAX_BREAKDOWN_LIMIT = 10_000
MAX_WINDOW_S = 100 * 365 * 86400  # a funnel conversion window of a century, as good as unbounded
MAX_NESTING = 32              # JSON nesting of any parameter (filters nest a few levels)
_TRUE = {"true", "1", "yes", "y", "t", "on"}


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() in _TRUE
    return bool(value) if isinstance(value, int | float) else False


def nesting(value: Any, limit: int = MAX_NESTING) -> int:
    """How deep a JSON value nests, counted up to `limit + 1` (iterative: any depth is safe)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_nesting(value: Any, attr: str | None) -> None:
    if nesting(value) > MAX_NESTING:
        raise RequestError(f"'{attr or 'the request'}' nests more than {MAX_NESTING} levels deep.", attr)


def refuse_unbuilt(data: dict[str, Any]) -> None:
    """Parameters that would change PostHog's numbers in ways not built here: refused, never ignored."""
    if data.get("aggregation_group_type_index") not in (None, ""):
        raise RequestError("Aggregating by groups is not supported yet; insights count persons.",
                           "aggregation_group_type_index", "unsupported")
    if data.get("funnel_aggregate_by_hogql") not in (None, "", "person_id"):
        raise RequestError("Aggregating funnels by a HogQL expression is not supported yet.",
                           "funnel_aggregate_by_hogql", "unsupported")
    sampling = data.get("sampling_factor")
    if sampling not in (None, "", 1, 1.0, "1"):
        raise RequestError("Sampling is not supported: answers here are exact, PostHog's sampled ones are "
                           "estimates.", "sampling_factor", "unsupported")


def decode_json_field(data: dict[str, Any], name: str, default: Any) -> Any:
    """Structured fields arrive as JSON strings in GET and may in POST (§4.2)."""
    value = data.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            if name == "properties":
                raise RequestError("Properties are unparsable!", name) from exc
            raise RequestError(f"'{name}' is not valid JSON: {exc}", name, "parse_error") from exc
        check_nesting(value, name)
    return value


def int_value(value: Any, attr: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (a number or numeric string; an integral float is fine), within the bounds."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if number is None:
        raise RequestError(f"'{_name(attr)}' must be an integer{_range(minimum, maximum)}.", attr)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise RequestError(f"'{_name(attr)}' must be an integer{_range(minimum, maximum)}; got {number}.", attr)
    return number


def int_field(data: dict[str, Any], name: str, default: int | None, minimum: int | None = None,
              maximum: int | None = None) -> int | None:
    """An integer parameter; absent or empty gives the default."""
    value = data.get(name)
    if value is None or value == "":
        return default
    return int_value(value, name, minimum, maximum)


def text_field(data: dict[str, Any], name: str, default: str | None = None) -> str | None:
    """A string parameter; numbers are taken as their text, anything else is refused."""
    value = data.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise RequestError(f"'{name}' must be a string.", name)


def list_field(data: dict[str, Any], name: str, of: type | tuple[type, ...] | None = None) -> list[Any]:
    """A list parameter (JSON-encoded in GET), empty when absent; `of` checks its items' type."""
    value = decode_json_field(data, name, [])
    if not isinstance(value, list):
        raise RequestError(f"'{name}' must be a list.", name)
    if of is not None:
        for i, item in enumerate(value):
            if not isinstance(item, of) or isinstance(item, bool):
                kinds = " or ".join(_KIND.get(k, k.__name__) for k in (of if isinstance(of, tuple) else (of,)))
                raise RequestError(f"each of '{name}' must be a {kinds}.", f"{name}__{i}")
    return value


def date_field(data: dict[str, Any], name: str) -> str | None:
    """A date parameter: a string (absolute or relative, parsed later) or absent."""
    value = data.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RequestError(f"'{name}' must be a date string such as 2024-01-31 or -7d.", name)
    return value


_KIND = {str: "string", dict: "object", int: "integer", float: "number", list: "list"}


def _name(attr: str) -> str:
    return attr.rsplit("__", 1)[-1] if "__" in attr else attr


def _range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of at least {minimum}"
    return f" of at most {maximum}" if maximum is not None else ""
