"""The trend request (legacy filter, spec §4 and §6.2): parsed and validated once, with PostHog's defaults.

Anything the state cannot answer exactly yet is refused with a 400 that says so, rather than
answered approximately (ARCHITECTURE: exactness first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas.definitions import ActionStep, Breakdown, Definition
from schemas.errors import RequestError
from schemas.fields import (
    MAX_BREAKDOWN_LIMIT,
    MAX_SERIES,
    date_field,
    decode_json_field,
    int_field,
    int_value,
    refuse_unbuilt,
    text_field,
    to_bool,
)
from schemas.filters import NO_FILTERS, FilterError, FilterGroup, all_of, parse_filters
from schemas.formula import Formula, FormulaError

ACTOR_MATHS = ("dau", "weekly_active", "monthly_active")
PROPERTY_MATHS = ("sum", "avg", "min", "max", "median", "p75", "p90", "p95", "p99")
QUANTILES = {"median": 0.5, "p75": 0.75, "p90": 0.9, "p95": 0.95, "p99": 0.99}
PER_ACTOR_MATHS = ("avg_count_per_actor", "min_count_per_actor", "max_count_per_actor", "median_count_per_actor",
                   "p75_count_per_actor", "p90_count_per_actor", "p95_count_per_actor", "p99_count_per_actor")
SUPPORTED_MATHS = ("total", "first_time_for_user", *ACTOR_MATHS, *PROPERTY_MATHS, *PER_ACTOR_MATHS)
DEFAULT_BREAKDOWN_LIMIT = 25
WORLD_MAP_BREAKDOWN_LIMIT = 250
KNOWN_MATHS = (
    "total", "dau", "weekly_active", "monthly_active", "unique_group", "unique_session",
    "first_time_for_user", "first_matching_event_for_user", "sum", "avg", "min", "max", "median",
    "p75", "p90", "p95", "p99", "avg_count_per_actor", "min_count_per_actor", "max_count_per_actor",
    "median_count_per_actor", "p75_count_per_actor", "p90_count_per_actor", "p95_count_per_actor",
    "p99_count_per_actor", "hogql",
)
TIME_SERIES_DISPLAYS = ("ActionsLineGraph", "ActionsBar", "ActionsStackedBar", "ActionsUnstackedBar",
                        "ActionsAreaGraph", "ActionsLineGraphCumulative")
TOTAL_VALUE_DISPLAYS = ("BoldNumber", "ActionsPie", "ActionsBarValue", "ActionsTable", "WorldMap")


def request_filters(data: dict[str, Any], test_account_filters: list[Any]) -> FilterGroup:
    """The global `properties`, ANDed with the project's test-account filters when asked (§4.4)."""
    filters = parse_filters(decode_json_field(data, "properties", []), "properties")
    if to_bool(data.get("filter_test_accounts")) and test_account_filters:
        filters = all_of(filters, parse_filters(test_account_filters, "filter_test_accounts"))
    return filters


@dataclass(frozen=True)
class Entity:
    id: str | None
    type: str
    index: int
    order: int | None
    name: str
    custom_name: str | None
    math: str
    math_property: str | None
    properties: list[Any]
    raw_math: str | None
    filters: FilterGroup = NO_FILTERS
    math_property_type: str = "event"
    steps: tuple[ActionStep, ...] = ()

    @property
    def label(self) -> str:
        return self.name

    def action_dict(self, days: list[str]) -> dict[str, Any]:
        return {
            "days": days, "id": self.id, "type": self.type, "order": self.order, "name": self.name,
            "custom_name": self.custom_name, "math": self.raw_math, "math_property": self.math_property,
            "math_hogql": None, "math_group_type_index": None,
            "properties": {} if not self.properties else self.properties,
        }


@dataclass(frozen=True)
class TrendsRequest:
    entities: list[Entity]
    interval: str
    date_from: str | None
    date_to: str | None
    explicit_date: bool
    display: str
    compare: bool
    properties: Any
    filter_test_accounts: bool
    breakdown: Breakdown | None
    formula: str | None
    raw: dict[str, Any] = field(default_factory=dict)
    filters: FilterGroup = NO_FILTERS
    breakdown_limit: int = DEFAULT_BREAKDOWN_LIMIT
    hide_other: bool = False
    refresh: str = ""
    smoothing: int = 1
    histogram_bins: int | None = None
    compare_to: str | None = None

    @property
    def total_value(self) -> bool:
        return self.display in TOTAL_VALUE_DISPLAYS

    def filter_dict(self) -> dict[str, Any]:
        """The request re-expressed as a legacy filter (informational `filter` field)."""
        out: dict[str, Any] = {
            "insight": "TRENDS", "interval": self.interval, "display": self.display,
            "date_from": self.date_from or "-7d", "date_to": self.date_to,
            "events": [{"id": e.id, "type": e.type, "order": e.order, "name": e.name,
                        "custom_name": e.custom_name, "math": e.raw_math, "math_property": e.math_property}
                       for e in self.entities],
            "properties": [] if not self.properties else self.properties,
            "filter_test_accounts": self.filter_test_accounts,
        }
        if self.compare:
            out["compare"] = True
        if self.formula:
            out["formula"] = self.formula
        return out


def _entities(data: dict[str, Any]) -> list[Entity]:
    collected: list[tuple[str, int, dict[str, Any]]] = []
    for kind in ("events", "actions", "data_warehouse"):
        items = decode_json_field(data, kind, [])
        if not isinstance(items, list):
            raise RequestError(f"'{kind}' must be a list of entities", kind)
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise RequestError(f"each of '{kind}' must be an object", f"{kind}__{i}")
            collected.append((kind, i, item))
    if not collected:
        raise RequestError("At least one of 'events' or 'actions' is required.", "events")
    if len(collected) > MAX_SERIES:
        raise RequestError(f"At most {MAX_SERIES} series (events and actions) can be asked at once; this request has "
                           f"{len(collected)}.", "events")

    def sort_key(entry: tuple[str, int, dict[str, Any]]) -> int:
        order = entry[2].get("order")
        try:
            return int(order) if order not in (None, "") else -1
        except (TypeError, ValueError):
            return -1

    out = []
    for index, (kind, i, item) in enumerate(sorted(collected, key=sort_key)):
        attr = f"{kind}__{i}"
        if kind == "data_warehouse":
            raise RequestError("Data warehouse series are not supported.", attr, "unsupported")
        steps = _action_steps(item, attr) if kind == "actions" else ()
        event_id = item.get("id")
        if event_id is not None and not isinstance(event_id, str):
            event_id = str(event_id)
        raw_math = item.get("math") or None
        math = raw_math or "total"
        if not isinstance(math, str) or math not in KNOWN_MATHS:
            raise RequestError(f"Unknown math '{math}'.", f"{attr}__math", "invalid_choice")
        if math not in SUPPORTED_MATHS:
            raise RequestError(f"Math '{math}' is not supported yet; supported: {', '.join(SUPPORTED_MATHS)}.",
                               f"{attr}__math", "unsupported")
        props = item.get("properties") or []
        filters = parse_filters(props, f"{attr}__properties")
        math_property = text_field(item, "math_property")
        if math in PROPERTY_MATHS and not math_property:
            raise RequestError(f"Math '{math}' needs a math_property.", f"{attr}__math_property")
        property_type = {"event_properties": "event", "person_properties": "person", None: "event",
                         "": "event"}.get(item.get("math_property_type") if not isinstance(
                             item.get("math_property_type"), list | dict) else "?")
        if property_type is None:
            raise RequestError(f"math_property_type '{item.get('math_property_type')}' is not supported yet; use "
                               "event_properties or person_properties.", f"{attr}__math_property_type", "unsupported")
        if math == "first_time_for_user" and (not filters.empty or steps):
            raise RequestError("first_time_for_user with property filters is not supported yet.",
                               f"{attr}__properties", "unsupported")
        custom = item.get("custom_name")
        custom = custom.strip() or None if isinstance(custom, str) else None
        order = item.get("order")
        name = item.get("name") or (event_id if event_id is not None else "All events")
        if kind == "actions":
            name = item.get("name") or f"Action {event_id}"
        out.append(Entity(event_id, kind, index, int(order) if isinstance(order, int) else order,
                          str(name), custom, math, math_property, props, raw_math, filters, property_type, steps))
    return out


_URL_MATCHING = {"contains": "regex", "exact": "exact", "regex": "regex"}


def _action_steps(item: dict[str, Any], attr: str) -> tuple[ActionStep, ...]:
    """An inline action: `steps` of {event, properties, url, url_matching}; any step matches."""
    raw_steps = item.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise RequestError(f"Action {item.get('id')!r} is not defined here: pass it inline with its 'steps' "
                           "(a list of {event, properties, url, url_matching}).", attr, "unsupported")
    steps = []
    for j, step in enumerate(raw_steps):
        where = f"{attr}__steps__{j}"
        if not isinstance(step, dict):
            raise RequestError("each action step must be an object", where)
        for element in ("selector", "tag_name", "text", "href"):
            if step.get(element):
                raise RequestError(f"Action steps matching elements ('{element}') are not supported yet.",
                                   f"{where}__{element}", "unsupported")
        filters = parse_filters(step.get("properties") or [], f"{where}__properties")
        if step.get("url"):
            matching = str(step.get("url_matching") or "contains")
            if matching not in _URL_MATCHING:
                raise RequestError(f"Unknown url_matching '{matching}'.", f"{where}__url_matching", "invalid_choice")
            url = str(step["url"])
            value = re.escape(url) if matching == "contains" else url
            url_filter = parse_filters([{"key": "$current_url", "operator": _URL_MATCHING[matching], "value": value}])
            filters = all_of(filters, url_filter)
        event = step.get("event")
        steps.append(ActionStep(str(event) if event else None, filters))
    return tuple(steps)


def parse_trends_request(data: dict[str, Any]) -> TrendsRequest:
    refuse_unbuilt(data)
    for name, value in (("insight", data.get("insight")), ("shown_as", data.get("shown_as"))):
        if isinstance(value, str) and value.upper() in ("STICKINESS", "LIFECYCLE"):
            raise RequestError(f"{value.capitalize()} insights are not built yet; only volume trends are answered "
                               "here.", name, "unsupported")
    interval = str(data.get("interval") or "day").lower()
    if interval == "minute":
        raise RequestError("Minute intervals are not supported yet: the finest grain kept is the hour.", "interval",
                           "unsupported")
    if interval not in ("hour", "day", "week", "month"):
        raise RequestError(f"Unknown interval '{interval}'; use hour, day, week or month.", "interval",
                           "invalid_choice")
    entities = _entities(data)
    properties = decode_json_field(data, "properties", [])
    filters = parse_filters(properties, "properties")
    filter_test_accounts = to_bool(data.get("filter_test_accounts"))
    display = data.get("display") or "ActionsLineGraph"
    if display == "WorldMap" and not data.get("breakdown") and not data.get("breakdowns"):
        data = {**data, "breakdown": "$geoip_country_code", "breakdown_type": "event"}
    breakdown = _breakdown(data)
    histogram = _histogram_bins(data)
    if histogram is not None and (breakdown is None or len(breakdown.properties) != 1):
        raise RequestError("Histogram breakdowns need exactly one breakdown property.", "breakdown_histogram_bin_count")
    if histogram is not None:
        breakdown = Breakdown(breakdown.properties, breakdown.normalize_url)  # type: ignore[union-attr]
    default_limit = WORLD_MAP_BREAKDOWN_LIMIT if display == "WorldMap" else DEFAULT_BREAKDOWN_LIMIT
    smoothing = int_field(data, "smoothing_intervals", 1, 1, 10_000) or 1
    limit = int_field(data, "breakdown_limit", default_limit, 1, MAX_BREAKDOWN_LIMIT) or default_limit
    formula = data.get("formula") or None
    if formula is not None and not isinstance(formula, str):
        raise RequestError("'formula' must be a string such as A/B.", "formula")
    if formula is not None:
        try:
            Formula(str(formula), len(entities))
        except FormulaError as exc:
            raise RequestError(str(exc), "formula") from exc
    if not isinstance(display, str) or display not in TIME_SERIES_DISPLAYS + TOTAL_VALUE_DISPLAYS:
        display = "ActionsLineGraph"
    compare_to = data.get("compare_to") or None
    if compare_to is not None and not isinstance(compare_to, str):
        raise RequestError("'compare_to' must be a relative date such as -1y", "compare_to")
    compare = to_bool(data.get("compare")) or compare_to is not None
    return TrendsRequest(
        entities=entities, interval=interval, date_from=date_field(data, "date_from"),
        date_to=date_field(data, "date_to"), explicit_date=to_bool(data.get("explicit_date")),
        display=display, compare=compare, properties=properties,
        filter_test_accounts=filter_test_accounts, breakdown=breakdown, formula=formula, raw=data,
        filters=filters, breakdown_limit=limit, hide_other=to_bool(data.get("breakdown_hide_other_aggregation")),
        refresh=str(data.get("refresh") or "").lower(), smoothing=smoothing, histogram_bins=histogram,
        compare_to=compare_to,
    )


def _histogram_bins(data: dict[str, Any]) -> int | None:
    raw = data.get("breakdown_histogram_bin_count")
    listed = decode_json_field(data, "breakdowns", None)
    if raw in (None, "") and isinstance(listed, list) and listed and isinstance(listed[0], dict):
        raw = listed[0].get("histogram_bin_count")
    if raw in (None, ""):
        return None
    return int_value(raw, "breakdown_histogram_bin_count", 1, 1000)


def _breakdown(data: dict[str, Any]) -> Breakdown | None:
    """`breakdowns` (list of {property, type}) or `breakdown` + `breakdown_type` (§4.7)."""
    normalize = to_bool(data.get("breakdown_normalize_url"))
    listed = decode_json_field(data, "breakdowns", None)
    if listed:
        if not isinstance(listed, list) or not all(isinstance(b, dict) and b.get("property") for b in listed):
            raise RequestError("breakdowns must be a list of items, each with property and type", "breakdowns")
        if len(listed) > 3:
            raise RequestError("At most 3 breakdowns are allowed.", "breakdowns")
        props = []
        for i, item in enumerate(listed):
            kind = _breakdown_type(item.get("type"), f"breakdowns__{i}__type")
            props.append((kind, _property_name(item["property"], f"breakdowns__{i}__property")))
            normalize = normalize or to_bool(item.get("normalize_url"))
        return Breakdown(tuple(props), normalize, as_list=True)
    raw = data.get("breakdown")
    if raw in (None, "", []):
        return None
    kind = _breakdown_type(data.get("breakdown_type"), "breakdown_type")
    if isinstance(raw, str) and raw.startswith("["):
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    if isinstance(raw, list):
        if not raw or len(raw) > 3:
            raise RequestError("'breakdown' lists hold 1 to 3 properties.", "breakdown")
        return Breakdown(tuple((kind, _property_name(p, "breakdown")) for p in raw), normalize)
    return Breakdown(((kind, _property_name(raw, "breakdown")),), normalize)


def _property_name(value: Any, attr: str) -> str:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise RequestError("A breakdown names a property: a string.", attr)


def _breakdown_type(value: Any, attr: str) -> str:
    if isinstance(value, list | dict):
        raise RequestError("'breakdown_type' must be event or person.", attr)
    kind = str(value or "event")
    kind = "event" if kind == "events" else kind
    if kind not in ("event", "person"):
        raise RequestError(f"Breakdowns of type '{kind}' are not supported yet; use event or person.", attr,
                           "unsupported")
    return kind


def definition_for(entity: Entity, request: TrendsRequest, project_id: int, timezone: str,
                   test_account_filters: list[Any]) -> Definition | None:
    """The materialization a series needs, or None when the always-on state answers it."""
    extra = NO_FILTERS
    if request.filter_test_accounts and test_account_filters:
        try:
            extra = parse_filters(test_account_filters, "filter_test_accounts")
        except FilterError as exc:
            raise RequestError(f"The project's test account filters are invalid: {exc.detail}",
                               "filter_test_accounts") from exc
    filters = all_of(request.filters, entity.filters, extra)
    needs_values = entity.math in PROPERTY_MATHS
    per_actor = entity.math in PER_ACTOR_MATHS
    if filters.empty and request.breakdown is None and not needs_values and not per_actor and not entity.steps:
        return None
    return Definition(
        project_id=project_id, event=None if entity.steps else entity.id, filters=filters, breakdown=request.breakdown,
        steps=entity.steps,
        value_property=(entity.math_property_type, str(entity.math_property)) if needs_values else None,
        keep_values=entity.math in QUANTILES, per_actor=per_actor, timezone=timezone,
    )
