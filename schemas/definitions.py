"""Insight definitions: the state a request needs beyond the always-on buckets (ARCHITECTURE).

A definition names an event, the property filters its events must pass, an optional breakdown, and
what else to keep (a property's values, per-actor counts). Its hash keys its state, so a different
definition never mixes with this one. `contribution` is the pure rule the live dataflow and the
backfill both apply to each event.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import orjson

from schemas.filters import FilterGroup, as_number, as_text, parse_filters

BREAKDOWN_NULL = "$$_posthog_breakdown_null_$$"
BREAKDOWN_OTHER = "$$_posthog_breakdown_other_$$"
NO_BREAKDOWN = ""
DEFINITION_VERSION = 1
_URL_TAIL = re.compile(r"/?\??#?$")


@dataclass(frozen=True)
class Breakdown:
    properties: tuple[tuple[str, str], ...]  # (type, key): type is "event" or "person"
    normalize_url: bool = False
    as_list: bool = False  # the `breakdowns` form: values are lists even for one property

    @property
    def multiple(self) -> bool:
        return self.as_list or len(self.properties) > 1

    def canonical(self) -> list[Any]:
        return [[list(p) for p in self.properties], self.normalize_url, self.multiple]

    @classmethod
    def from_canonical(cls, value: list[Any] | None) -> Breakdown | None:
        if not value:
            return None
        props, normalize, as_list = value
        return cls(tuple((kind, key) for kind, key in props), normalize, as_list)

    def parts(self, value: str) -> tuple[str, ...]:
        """A stored value as its parts, "" for a missing one (funnels' boxed breakdown values); the
        empty string is the null group, whatever the number of properties."""
        if value == "":
            return tuple("" for _ in self.properties)
        parts = orjson.loads(value) if self.multiple else [value]
        return tuple("" if p in (BREAKDOWN_NULL, None) else str(p) for p in parts)

    def value(self, event_props: dict[str, Any], person_props: dict[str, Any]) -> str:
        parts = []
        for kind, key in self.properties:
            raw = (event_props if kind == "event" else person_props).get(key)
            if raw is None or raw == "":
                parts.append(BREAKDOWN_NULL)
                continue
            text = as_text(raw)
            if self.normalize_url:
                text = _URL_TAIL.sub("", text) or "/"
            parts.append(text)
        return orjson.dumps(parts).decode() if self.multiple else parts[0]


@dataclass(frozen=True)
class ActionStep:
    """One matcher of an action: an event name (None = any) and the filters its events must pass."""

    event: str | None
    filters: FilterGroup

    def matches(self, event_name: str, event_props: dict[str, Any], person_props: dict[str, Any],
                now: datetime) -> bool:
        return (self.event is None or self.event == event_name) and self.filters.matches(event_props, person_props, now)


@dataclass(frozen=True)
class Definition:
    project_id: int
    event: str | None
    filters: FilterGroup
    breakdown: Breakdown | None = None
    value_property: tuple[str, str] | None = None  # (type, key) of a property to aggregate
    keep_values: bool = False  # quantile maths need every value
    per_actor: bool = False    # count-per-actor maths need counts per person
    timezone: str = "UTC"
    steps: tuple[ActionStep, ...] = ()  # an action: the event matches any step (then `event` is None)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    summaries = False  # no per-person summaries (funnels and paths keep them: state/summaries.py)

    def canonical(self) -> dict[str, Any]:
        return {
            "v": DEFINITION_VERSION, "event": self.event, "filters": self.filters.canonical(),
            "breakdown": self.breakdown.canonical() if self.breakdown else None,
            "value_property": list(self.value_property) if self.value_property else None,
            "keep_values": self.keep_values, "per_actor": self.per_actor, "timezone": self.timezone,
            **({"steps": [[s.event, s.filters.canonical()] for s in self.steps]} if self.steps else {}),
        }

    @cached_property
    def hash(self) -> str:
        """The definition's identity (its state's key part); computed once, the definition is frozen."""
        return hashlib.sha256(orjson.dumps(self.canonical(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    @property
    def flags(self) -> str:
        """What the apply script keeps beyond counts and person bitmaps: `l` every property value
        (quantiles), `a` events per person (count-per-actor maths)."""
        return ("l" if self.keep_values else "") + ("a" if self.per_actor else "")

    @property
    def uses_person(self) -> bool:
        person_breakdown = bool(self.breakdown and any(k == "person" for k, _ in self.breakdown.properties))
        person_value = bool(self.value_property and self.value_property[0] == "person")
        return (self.filters.uses_person() or person_breakdown or person_value
                or any(s.filters.uses_person() for s in self.steps))

    @property
    def columnar(self) -> bool:
        """Its contribution depends on the event's name and `event_keys` properties alone (as for
        funnels and paths): a live batch evaluates it once per distinct (name, values), and a backfill
        from the archive too, summing what it keeps per bucket over columns (history.py)."""
        return not self.uses_person

    def event_names(self) -> list[str] | None:
        """The event names that can count (None: any)."""
        if self.event is not None:
            return [self.event]
        if self.steps and all(s.event is not None for s in self.steps):
            return sorted({s.event for s in self.steps if s.event is not None})
        return None

    def keys_of(self, kind: str) -> set[str]:
        """The properties of `kind` ("event" or "person") `contribution` reads."""
        keys = self.filters.keys_of(kind).union(*(s.filters.keys_of(kind) for s in self.steps))
        if self.breakdown:
            keys |= {key for k, key in self.breakdown.properties if k == kind}
        if self.value_property and self.value_property[0] == kind:
            keys.add(self.value_property[1])
        return keys

    def event_keys(self) -> set[str]:
        return self.keys_of("event")

    def person_keys(self) -> set[str]:
        return self.keys_of("person")

    def to_json(self) -> bytes:
        raw = {**self.raw, "filters": self.filters.to_raw(),
               "steps": [[s.event, s.filters.to_raw()] for s in self.steps]}
        return orjson.dumps({"project_id": self.project_id, "raw": raw, **self.canonical()})

    @classmethod
    def from_json(cls, data: bytes | str) -> Definition:
        body = orjson.loads(data)
        return cls(
            project_id=body["project_id"], event=body["event"], filters=parse_filters(body["raw"].get("filters")),
            breakdown=Breakdown.from_canonical(body["breakdown"]),
            value_property=tuple(body["value_property"]) if body["value_property"] else None,
            keep_values=body["keep_values"], per_actor=body["per_actor"], timezone=body["timezone"], raw=body["raw"],
            steps=tuple(ActionStep(e, parse_filters(f)) for e, f in body["raw"].get("steps", [])),
        )

    def contribution(self, event_name: str, event_props: dict[str, Any], person_props: dict[str, Any],
                     now: datetime) -> tuple[str, float | None] | None:
        """(breakdown value, property value) if the event counts for this definition, else None."""
        if self.event is not None and event_name != self.event:
            return None
        if self.steps and not any(s.matches(event_name, event_props, person_props, now) for s in self.steps):
            return None
        if not self.filters.matches(event_props, person_props, now):
            return None
        value = None
        if self.value_property is not None:
            kind, key = self.value_property
            value = as_number((event_props if kind == "event" else person_props).get(key))
        bv = self.breakdown.value(event_props, person_props) if self.breakdown else NO_BREAKDOWN
        return bv, value
