"""The paths request (spec §9.2) and the paths definition whose state the dataflow keeps.

The definition fixes which events are path events (types, custom events, global filters) and keeps
each one's raw item (URL without one trailing slash, screen name or event name) per day. Cleaning
rules, groupings, exclusions, start/end points and limits are query-time choices over that state.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import orjson

from schemas.definitions import DEFINITION_VERSION
from schemas.fields import date_field, int_field, list_field, refuse_unbuilt, text_field, to_bool
from schemas.filters import NO_FILTERS, FilterGroup, parse_filters
from schemas.trends import RequestError, request_filters

EVENT_TYPES = ("$pageview", "$screen", "custom_event")


def without_trailing_slash(text: str) -> str:
    """URLs are path items without one trailing slash (§9.3); start/end points are read the same way."""
    return text[:-1] if len(text) > 1 and text.endswith("/") else text


def path_item(event_name: str, props: dict[str, Any]) -> str | None:
    if event_name == "$pageview":
        url = props.get("$current_url")
        return None if url is None else without_trailing_slash(str(url))
    if event_name == "$screen":
        name = props.get("$screen_name")
        return None if name is None else str(name)
    return event_name


@dataclass(frozen=True)
class PathDefinition:
    project_id: int
    event_types: tuple[str, ...]      # empty = every event
    custom_events: tuple[str, ...]
    filters: FilterGroup = NO_FILTERS
    timezone: str = "UTC"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    kind = "paths"
    keep_values = False
    per_actor = False
    flags = "s"  # the apply script keeps each person's path events, for the summariser
    summaries = True
    summary_kind = "ps"  # sessions (state/summaries.py)
    breakdown = None

    def canonical(self) -> dict[str, Any]:
        return {"v": DEFINITION_VERSION, "kind": "paths", "event_types": sorted(self.event_types),
                "custom_events": sorted(self.custom_events), "filters": self.filters.canonical(),
                "timezone": self.timezone, "summaries": True}

    @cached_property
    def hash(self) -> str:
        """The definition's identity (its state's key part); computed once, the definition is frozen."""
        return hashlib.sha256(orjson.dumps(self.canonical(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    @property
    def uses_person(self) -> bool:
        return self.filters.uses_person()

    @property
    def columnar(self) -> bool:
        """Its contribution depends on the event's name and `event_keys` properties alone (see
        FunnelDefinition.columnar)."""
        return not self.uses_person

    def event_names(self) -> list[str] | None:
        """The event names it keeps (None: any)."""
        if (not self.event_types and not self.custom_events) or "custom_event" in self.event_types:
            return None
        return sorted({*self.custom_events, *(t for t in self.event_types if t in ("$pageview", "$screen"))})

    def event_keys(self) -> set[str]:
        """The event properties `contribution` reads: its filters', and what a path item is named by."""
        return self.filters.event_keys() | {"$current_url", "$screen_name"}

    def person_keys(self) -> set[str]:
        """The person properties `contribution` reads."""
        return self.filters.keys_of("person")

    def to_json(self) -> bytes:
        return orjson.dumps({"project_id": self.project_id, "raw": {"filters": self.filters.to_raw()},
                             **self.canonical()})

    @classmethod
    def from_json(cls, data: bytes | str) -> PathDefinition:
        body = orjson.loads(data)
        return cls(body["project_id"], tuple(body["event_types"]), tuple(body["custom_events"]),
                   parse_filters(body["raw"]["filters"]), body["timezone"], body["raw"])

    def _wanted(self, event_name: str) -> bool:
        if not self.event_types and not self.custom_events:
            return True
        if event_name in self.custom_events:
            return True
        if event_name in ("$pageview", "$screen"):
            return event_name in self.event_types
        return "custom_event" in self.event_types and not event_name.startswith("$")

    def contribution(self, event_name: str, event_props: dict[str, Any], person_props: dict[str, Any],
                     now: datetime) -> tuple[str, str] | None:
        if not self._wanted(event_name) or not self.filters.matches(event_props, person_props, now):
            return None
        item = path_item(event_name, event_props)
        return None if item is None else ("", orjson.dumps([item]).decode())


@dataclass(frozen=True)
class PathsRequest:
    definition: PathDefinition
    date_from: str | None
    date_to: str | None
    start_point: str | None
    end_point: str | None
    step_limit: int
    edge_limit: int
    min_weight: int | None
    max_weight: int | None
    exclude: frozenset[str]
    groupings: tuple[tuple[str, re.Pattern[str]], ...]
    cleaning: tuple[tuple[re.Pattern[str], str], ...]
    refresh: str = ""


def _strip(point: Any) -> str | None:
    return None if point in (None, "") else without_trailing_slash(str(point))


def parse_paths_request(data: dict[str, Any], project_id: int, timezone: str, test_account_filters: list[Any],
                        path_cleaning_filters: list[Any]) -> PathsRequest:
    refuse_unbuilt(data)
    types = list_field(data, "include_event_types")
    if data.get("path_type"):
        types = [data["path_type"]]
    for kind in types:
        if not isinstance(kind, str) or kind not in EVENT_TYPES:
            raise RequestError(f"Path event type '{kind}' is not supported yet; use {', '.join(EVENT_TYPES)}.",
                               "include_event_types", "unsupported")
    custom = list_field(data, "include_custom_events", (str, int, float))
    if custom and "custom_event" in types:
        raise RequestError("Cannot include all custom events and specific custom events in the same query")
    if data.get("funnel_paths") or data.get("funnel_filter"):
        raise RequestError("Funnel paths are not supported yet.", "funnel_paths", "unsupported")
    filters = request_filters(data, test_account_filters)
    low, high = int_field(data, "min_edge_weight", None, 0), int_field(data, "max_edge_weight", None, 0)
    if low is not None and high is not None and high < low:
        raise RequestError("Max Edge weight can't be lower than min edge weight")
    rules = list(path_cleaning_filters) if to_bool(data.get("path_replacements")) else []
    rules += list_field(data, "local_path_cleaning_filters", dict)
    try:
        cleaning = tuple((re.compile(str(r["regex"])), str(r.get("alias", ""))) for r in rules)
    except (re.error, KeyError, TypeError) as exc:
        raise RequestError(f"Invalid path cleaning rule: {exc}", "local_path_cleaning_filters") from exc
    groupings = tuple((str(g), re.compile(".*".join(re.escape(p) for p in str(g).split("*"))))
                      for g in list_field(data, "path_groupings", (str, int, float)))
    definition = PathDefinition(project_id, tuple(types), tuple(str(c) for c in custom), filters, timezone)
    return PathsRequest(
        definition=definition, date_from=date_field(data, "date_from"), date_to=date_field(data, "date_to"),
        start_point=_strip(text_field(data, "start_point")), end_point=_strip(text_field(data, "end_point")),
        step_limit=int_field(data, "step_limit", 5, 1, 1000) or 5,
        edge_limit=int_field(data, "edge_limit", 50, 1, 100_000) or 50, min_weight=low, max_weight=high,
        exclude=frozenset(str(e) for e in list_field(data, "exclude_events", (str, int, float))),
        groupings=groupings, cleaning=cleaning, refresh=str(data.get("refresh") or "").lower(),
    )
