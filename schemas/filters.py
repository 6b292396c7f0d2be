"""Property filters (spec §4.4): parsed once, matched against an event and its person's properties.

The dataflow matches with these objects when it builds a definition's state; the API parses the
request with the same code to name the definition. Nothing else decides what a filter means.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.dates import DateParseError, relative_date_parse, zone
from schemas.errors import RequestError

OPERATORS = {
    "exact", "is_not", "icontains", "not_icontains", "regex", "not_regex", "gt", "gte", "lt", "lte", "is_set",
    "is_not_set", "is_date_exact", "is_date_before", "is_date_after", "between", "not_between", "min", "max",
    "in", "not_in",
}
SUPPORTED_TYPES = {"event", "person"}
_NEGATIVE = {"is_not", "not_icontains", "not_regex", "is_not_set", "not_in", "not_between"}


FilterError = RequestError  # what a filter parser raises is a request error like any other


def as_text(value: Any) -> str:
    """A property value's string form, as PostHog compares it (`true`, `1`, `1.5`, raw strings)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return orjson.dumps(value).decode()


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        if isinstance(value, int | float):
            return float(value) if math.isfinite(value) else None
        number = float(str(value).strip())
    except (ValueError, OverflowError):  # an integer beyond a float is no finite number either
        return None
    return number if math.isfinite(number) else None


def _as_instant(value: Any) -> datetime | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        seconds = value / 1000 if value > 1e11 else value
        return datetime.fromtimestamp(seconds, UTC)
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class PropertyFilter:
    key: str
    operator: str
    value: Any
    type: str

    def canonical(self) -> list[Any]:
        return [self.type, self.key, self.operator, self.value]

    def uses_person(self) -> bool:
        return self.type == "person"

    def keys_of(self, kind: str) -> set[str]:
        """The properties of `kind` ("event" or "person") the filter reads."""
        return {self.key} if self.type == kind else set()

    def event_keys(self) -> set[str]:
        return self.keys_of("event")

    def to_raw(self) -> dict[str, Any]:
        return {"key": self.key, "operator": self.operator, "value": self.value, "type": self.type}

    def matches(self, event_props: dict[str, Any], person_props: dict[str, Any], now: datetime) -> bool:
        props = event_props if self.type == "event" else person_props
        present = self.key in props and props[self.key] is not None
        actual = props.get(self.key)
        op = self.operator
        if op == "is_set":
            return present
        if op == "is_not_set":
            return not present
        if not present:
            return op in _NEGATIVE
        if op in ("exact", "in", "is_not", "not_in"):
            wanted = self.value if isinstance(self.value, list) else [self.value]
            hit = as_text(actual) in {as_text(v) for v in wanted}
            return hit if op in ("exact", "in") else not hit
        if op in ("icontains", "not_icontains"):
            hit = as_text(self.value).lower() in as_text(actual).lower()
            return hit if op == "icontains" else not hit
        if op in ("regex", "not_regex"):
            try:
                hit = re.search(as_text(self.value), as_text(actual)) is not None
            except re.error:
                return False
            return hit if op == "regex" else not hit
        if op in ("gt", "gte", "lt", "lte", "min", "max", "between", "not_between"):
            number = as_number(actual)
            if number is None:
                return op == "not_between"
            if op in ("between", "not_between"):
                low, high = (as_number(v) for v in self.value)
                inside = low is not None and high is not None and low <= number <= high
                return inside if op == "between" else not inside
            bound = as_number(self.value)
            if bound is None:
                return False
            return {"gt": number > bound, "gte": number >= bound, "lt": number < bound, "lte": number <= bound,
                    "min": number >= bound, "max": number <= bound}[op]
        if op in ("is_date_exact", "is_date_before", "is_date_after"):
            moment, bound = _as_instant(actual), self._date_bound(now)
            if moment is None or bound is None:
                return False
            if op == "is_date_exact":
                return moment == bound
            return moment < bound if op == "is_date_before" else moment > bound
        return False

    def _date_bound(self, now: datetime) -> datetime | None:
        try:
            moment, _ = relative_date_parse(as_text(self.value), zone("UTC"), now)
        except DateParseError:
            return None
        return moment


@dataclass(frozen=True)
class FilterGroup:
    """AND/OR of filters and nested groups."""

    kind: str
    items: tuple[PropertyFilter | FilterGroup, ...]

    def canonical(self) -> list[Any]:
        return [self.kind, [item.canonical() for item in self.items]]

    def matches(self, event_props: dict[str, Any], person_props: dict[str, Any], now: datetime) -> bool:
        if not self.items:
            return True
        results = (item.matches(event_props, person_props, now) for item in self.items)
        return all(results) if self.kind == "AND" else any(results)

    def uses_person(self) -> bool:
        return any(item.uses_person() for item in self.items)

    def keys_of(self, kind: str) -> set[str]:
        """The properties of `kind` ("event" or "person") the filters read (what `matches` depends on,
        with `now`)."""
        return set().union(*(item.keys_of(kind) for item in self.items))

    def event_keys(self) -> set[str]:
        return self.keys_of("event")

    def to_raw(self) -> dict[str, Any]:
        return {"type": self.kind, "values": [item.to_raw() for item in self.items]}

    @property
    def empty(self) -> bool:
        return not self.items


NO_FILTERS = FilterGroup("AND", ())


def _one(raw: Any, attr: str) -> PropertyFilter | FilterGroup | None:
    if not isinstance(raw, dict):
        raise FilterError("each property filter must be an object", attr)
    if "values" in raw and isinstance(raw.get("type"), str) and raw["type"] in ("AND", "OR"):
        return parse_filters(raw, attr)
    key = raw.get("key")
    if key is None or key == "":
        raise FilterError("A property filter needs a 'key' (the property to compare).", f"{attr}__key")
    if not isinstance(key, str | int | float) or isinstance(key, bool):
        raise FilterError("A property filter's 'key' must be a string.", f"{attr}__key")
    kind = raw.get("type") or "event"
    if not isinstance(kind, str) or kind not in SUPPORTED_TYPES:
        raise FilterError(f"Property filters of type {kind!r} are not supported yet; use event or person.",
                          f"{attr}__type", "unsupported")
    operator = raw.get("operator") or "exact"
    if not isinstance(operator, str) or operator not in OPERATORS:
        raise FilterError(f"Unknown property filter operator {operator!r}.", f"{attr}__operator", "invalid_choice")
    value = raw.get("value")
    if operator in ("between", "not_between") and not (isinstance(value, list) and len(value) == 2):
        raise FilterError(f"Operator '{operator}' needs a [min, max] value.", f"{attr}__value")
    if operator in ("regex", "not_regex"):
        try:
            re.compile(as_text(value))
        except re.error as exc:
            raise FilterError(f"Invalid regular expression {as_text(value)!r}: {exc}.", f"{attr}__value") from exc
    if operator not in ("is_set", "is_not_set") and value is None:
        raise FilterError(f"Property filter on '{key}' with operator '{operator}' needs a value.",
                          f"{attr}__value")
    return PropertyFilter(str(key), operator, value, kind)


def parse_filters(raw: Any, attr: str = "properties") -> FilterGroup:
    """A list (AND), an old-style dict `{key: value, "key__op": value}`, or an AND/OR group."""
    if raw is None or raw == "" or raw == []:
        return FilterGroup("AND", ())
    if isinstance(raw, dict) and isinstance(raw.get("type"), str) and raw["type"] in ("AND", "OR") and "values" in raw:
        values = raw.get("values") or []
        if not isinstance(values, list):
            raise FilterError("a property group's 'values' must be a list", attr)
        items = [_one(v, f"{attr}__{i}") for i, v in enumerate(values)]
        return FilterGroup(raw["type"], tuple(i for i in items if i is not None and not _empty(i)))
    if isinstance(raw, dict):
        items = []
        for key, value in raw.items():
            name, _, operator = str(key).partition("__")
            items.append(_one({"key": name, "value": value, "operator": operator or "exact", "type": "event"},
                              f"{attr}__{key}"))
        return FilterGroup("AND", tuple(i for i in items if i is not None))
    if isinstance(raw, list):
        items = [_one(v, f"{attr}__{i}") for i, v in enumerate(raw)]
        return FilterGroup("AND", tuple(i for i in items if i is not None and not _empty(i)))
    raise FilterError("Properties are unparsable!", attr)


def _empty(item: PropertyFilter | FilterGroup) -> bool:
    return isinstance(item, FilterGroup) and item.empty


def all_of(*groups: FilterGroup) -> FilterGroup:
    kept = tuple(g for g in groups if not g.empty)
    if len(kept) == 1:
        return kept[0]
    return FilterGroup("AND", kept)

