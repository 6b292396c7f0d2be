"""The funnel request (spec §7.2) and the funnel definition whose state the dataflow keeps.

A funnel definition fixes what decides which events matter: the steps (events or inline actions with
their filters), the exclusions, the global and test-account filters and the breakdown property. The
window, order type, viz type, date range and attribution are query-time choices, so they reuse the
same state. Each matching event is kept (per project-zone day) as person, time, uuid, the steps and
exclusion ranges it matches and its breakdown value; strict funnels keep every event of the person.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, NamedTuple

import orjson

from schemas.definitions import DEFINITION_VERSION, ActionStep, Breakdown
from schemas.fields import (
    MAX_BREAKDOWN_LIMIT,
    MAX_WINDOW_S,
    date_field,
    decode_json_field,
    int_field,
    refuse_unbuilt,
    to_bool,
)
from schemas.filters import NO_FILTERS, FilterGroup, parse_filters
from schemas.trends import Entity, RequestError, _breakdown, _entities, request_filters

WINDOW_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400, "month": 30 * 86400}
ORDER_TYPES = ("ordered", "strict", "unordered")
VIZ_TYPES = ("steps", "trends", "time_to_convert")
ATTRIBUTIONS = ("first_touch", "last_touch", "all_events", "step")
MAX_FUNNEL_STEPS = 32
# What a funnel request reads; a step's people URL repeats these, and nothing else.
PARAMETERS = ("insight", "events", "actions", "exclusions", "properties", "filter_test_accounts", "date_from",
              "date_to", "explicit_date", "interval", "display", "funnel_window_interval",
              "funnel_window_interval_unit", "funnel_window_days", "funnel_order_type", "funnel_viz_type",
              "funnel_from_step", "funnel_to_step", "breakdown", "breakdown_type", "breakdowns", "breakdown_limit",
              "breakdown_normalize_url", "breakdown_attribution_type", "breakdown_attribution_value", "bin_count")


@dataclass(frozen=True)
class FunnelStep:
    event: str | None
    actions: tuple[ActionStep, ...]
    filters: FilterGroup

    def matches(self, event_name: str, event_props: dict[str, Any], person_props: dict[str, Any],
                now: datetime) -> bool:
        if self.actions:
            if not any(a.matches(event_name, event_props, person_props, now) for a in self.actions):
                return False
        elif self.event is not None and self.event != event_name:
            return False
        return self.filters.matches(event_props, person_props, now)

    def canonical(self) -> list[Any]:
        return [self.event, [[a.event, a.filters.canonical()] for a in self.actions], self.filters.canonical()]

    def to_raw(self) -> list[Any]:
        return [self.event, [[a.event, a.filters.to_raw()] for a in self.actions], self.filters.to_raw()]

    @classmethod
    def from_raw(cls, raw: list[Any]) -> FunnelStep:
        event, actions, filters = raw
        return cls(event, tuple(ActionStep(e, parse_filters(f)) for e, f in actions), parse_filters(filters))


@dataclass(frozen=True)
class Exclusion:
    step: FunnelStep
    from_step: int  # 0-based
    to_step: int    # 0-based

    @property
    def tags(self) -> tuple[int, ...]:
        """PostHog's exclusion tags: k (1-based) for "between step k-1 and step k"."""
        return tuple(range(self.from_step + 2, self.to_step + 2))


@dataclass(frozen=True)
class FunnelDefinition:
    project_id: int
    steps: tuple[FunnelStep, ...]
    exclusions: tuple[Exclusion, ...] = ()
    filters: FilterGroup = NO_FILTERS
    breakdown: Breakdown | None = None
    every_event: bool = False  # strict funnels (and correlation) see all of the person's events
    timezone: str = "UTC"
    keep_names: bool = False   # correlation: the event name of every kept event
    property_events: tuple[str, ...] = ()  # correlation: keep the properties of these events
    # Ordered funnels without exclusions or first-time steps (broken down, if at all, by first or last
    # touch) keep attempt summaries per person (state/summaries.py): their queries read attempts.
    summaries: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    kind = "funnel"
    keep_values = False

    def __post_init__(self) -> None:
        # PostHog's limit (its UDF reports reached steps in 32 bits); the step masks kept here are
        # integers the apply script and the summaries store in 64-bit fields.
        if len(self.steps) > MAX_FUNNEL_STEPS:
            raise RequestError(f"Funnels can have at most {MAX_FUNNEL_STEPS} steps; this one has "
                               f"{len(self.steps)}.", "events")
    per_actor = False
    summary_kind = "fa"  # attempt rows (state/summaries.py)

    @property
    def flags(self) -> str:
        """'s': the apply script keeps each person's step events for attempt summaries; 'f': it keeps
        the matching events per day for the event path (which a broken-down funnel still takes for
        ranges that do not start and end on day boundaries)."""
        if self.summaries:
            return "s" if self.breakdown is None else "fs"
        return "f"

    def canonical(self) -> dict[str, Any]:
        return {
            "v": DEFINITION_VERSION, "kind": "funnel", "steps": [s.canonical() for s in self.steps],
            "exclusions": [[x.step.canonical(), x.from_step, x.to_step] for x in self.exclusions],
            "filters": self.filters.canonical(),
            "breakdown": self.breakdown.canonical() if self.breakdown else None,
            "every_event": self.every_event, "timezone": self.timezone,
            **({"keep_names": True, "property_events": sorted(self.property_events)} if self.keep_names else {}),
            **({"summaries": 2} if self.summaries else {}),  # 2: the layout of the attempt rows
        }

    @cached_property
    def hash(self) -> str:
        """The definition's identity (its state's key part); computed once, the definition is frozen."""
        return hashlib.sha256(orjson.dumps(self.canonical(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    @property
    def uses_person(self) -> bool:
        groups = [self.filters] + [s.filters for s in self.steps] + [x.step.filters for x in self.exclusions]
        groups += [a.filters for s in self.steps for a in s.actions]
        person_breakdown = bool(self.breakdown and any(k == "person" for k, _ in self.breakdown.properties))
        return person_breakdown or any(g.uses_person() for g in groups)

    @property
    def columnar(self) -> bool:
        """Its contribution depends on the event's name and `event_keys` properties alone, so a
        backfill may evaluate it once per distinct (name, values) (dataflows/operators/history.py):
        not when it reads the person, nor the whole properties (correlation's property events)."""
        return not self.uses_person and not self.property_events

    def _matchers(self) -> list[FunnelStep]:
        return [*self.steps, *(x.step for x in self.exclusions)]

    def event_names(self) -> list[str] | None:
        """The event names it keeps (None: any)."""
        if self.every_event:
            return None
        names: set[str] = set()
        for step in self._matchers():
            wanted = [a.event for a in step.actions] if step.actions else [step.event]
            if any(name is None for name in wanted):
                return None
            names.update(name for name in wanted if name is not None)
        return sorted(names)

    def keys_of(self, kind: str) -> set[str]:
        """The properties of `kind` ("event" or "person") `contribution` reads (correlation's property
        events keep all of theirs besides)."""
        groups = [self.filters, *(s.filters for s in self._matchers()),
                  *(a.filters for s in self._matchers() for a in s.actions)]
        found = set().union(*(g.keys_of(kind) for g in groups))
        if self.breakdown:
            found |= {key for k, key in self.breakdown.properties if k == kind}
        return found

    def event_keys(self) -> set[str]:
        return self.keys_of("event")

    def person_keys(self) -> set[str]:
        return self.keys_of("person")

    def to_json(self) -> bytes:
        raw = {"steps": [s.to_raw() for s in self.steps],
               "exclusions": [[x.step.to_raw(), x.from_step, x.to_step] for x in self.exclusions],
               "filters": self.filters.to_raw()}
        return orjson.dumps({"project_id": self.project_id, "raw": raw, **self.canonical()})

    @classmethod
    def from_json(cls, data: bytes | str) -> FunnelDefinition:
        body = orjson.loads(data)
        raw = body["raw"]
        return cls(
            project_id=body["project_id"], steps=tuple(FunnelStep.from_raw(s) for s in raw["steps"]),
            exclusions=tuple(Exclusion(FunnelStep.from_raw(s), f, t) for s, f, t in raw["exclusions"]),
            filters=parse_filters(raw["filters"]), breakdown=Breakdown.from_canonical(body["breakdown"]),
            every_event=body["every_event"],
            timezone=body["timezone"], raw=raw, keep_names=body.get("keep_names", False),
            property_events=tuple(body.get("property_events", ())), summaries=bool(body.get("summaries")),
        )

    def contribution(self, event_name: str, event_props: dict[str, Any], person_props: dict[str, Any],
                     now: datetime) -> tuple[str, str] | None:
        """("", JSON of a `KeptEvent`) for an event this funnel keeps: steps mask, exclusion mask,
        breakdown value, and event name and properties only where correlation needs them."""
        names = self.kept_names
        if names is not None and event_name not in names:  # most events: no step is theirs
            return None
        if not self.filters.matches(event_props, person_props, now):
            return None
        steps = 0
        for k, step in enumerate(self.steps, 1):
            if step.matches(event_name, event_props, person_props, now):
                steps |= 1 << k
        excluded = 0
        for exclusion in self.exclusions:
            if exclusion.step.matches(event_name, event_props, person_props, now):
                for k in exclusion.tags:
                    excluded |= 1 << k
        if not steps and not excluded and not self.every_event:
            return None
        payload: list[Any] = [steps, excluded, self._bv(event_props, person_props)]
        if self.keep_names:
            payload += [event_name, event_props if event_name in self.property_events else None]
        return "", orjson.dumps(payload).decode()

    @cached_property
    def kept_names(self) -> frozenset[str] | None:
        """`event_names`, looked up once per event by `contribution`."""
        names = self.event_names()
        return None if names is None else frozenset(names)

    def _bv(self, event_props: dict[str, Any], person_props: dict[str, Any]) -> str:
        return self.breakdown.value(event_props, person_props) if self.breakdown else ""


class KeptEvent(NamedTuple):
    """What a funnel keeps of an event, as `FunnelDefinition.contribution` writes it."""

    steps: int          # bit k: matches 1-based step k
    excluded: int       # bit k: hits the exclusion between step k-1 and step k
    breakdown: str      # the breakdown value ("" without a breakdown)
    name: str = ""      # correlation only
    properties: dict[str, Any] | None = None  # correlation's event_with_properties only


def read_kept(payload: str | bytes) -> KeptEvent:
    return KeptEvent(*orjson.loads(payload))


@dataclass(frozen=True)
class FunnelRequest:
    definition: FunnelDefinition
    entities: list[Entity]
    order: str
    viz: str
    window_s: float
    date_from: str | None
    date_to: str | None
    interval: str
    from_step: int
    to_step: int
    attribution: str
    attribution_step: int | None
    breakdown_limit: int
    bin_count: int | None
    unbox: bool
    raw: dict[str, Any]
    refresh: str = ""
    first_time_steps: tuple[int, ...] = ()  # 1-based steps whose event must be the person's first ever
    explicit_date: bool = False  # the range is taken as given, not widened to whole intervals


def _window(data: dict[str, Any]) -> float:
    name, unit = "funnel_window_interval", data.get("funnel_window_interval_unit")
    if data.get(name) in (None, "") and data.get("funnel_window_days") not in (None, ""):
        name, unit = "funnel_window_days", "day"
    if isinstance(unit, list | dict):
        raise RequestError("'funnel_window_interval_unit' must be a string.", "funnel_window_interval_unit")
    unit = str(unit or "day").lower().rstrip("s")
    if unit not in WINDOW_UNITS:
        raise RequestError(f"Unknown funnel_window_interval_unit '{unit}'; use one of {', '.join(WINDOW_UNITS)}.",
                           "funnel_window_interval_unit", "invalid_choice")
    amount = int_field(data, name, 14, 1, MAX_WINDOW_S // WINDOW_UNITS[unit]) or 14
    return float(amount * WINDOW_UNITS[unit])


def _interval(data: dict[str, Any]) -> str:
    interval = data.get("interval") or "day"
    if not isinstance(interval, str) or interval.lower() not in ("minute", "hour", "day", "week", "month"):
        raise RequestError(f"Unknown interval {interval!r}; use hour, day, week or month.", "interval",
                           "invalid_choice")
    return interval.lower()


def _step(entity: Entity) -> FunnelStep:
    return FunnelStep(None if entity.steps else entity.id, entity.steps, entity.filters)


def parse_funnel_request(data: dict[str, Any], project_id: int, timezone: str, test_account_filters: list[Any],
                         body: dict[str, Any] | None = None,
                         correlation_events: tuple[str, ...] | None = None) -> FunnelRequest:
    """`correlation_events` set (possibly empty): the definition also keeps every event's name, and
    the properties of those events, for funnel correlation."""
    refuse_unbuilt(data)
    items = {k: decode_json_field(data, k, []) for k in ("events", "actions")}
    first_time_names: set[str] = set()
    for kind, value in items.items():
        if not isinstance(value, list):
            raise RequestError(f"'{kind}' must be a list of entities", kind)
        for i, item in enumerate(value):
            if isinstance(item, dict) and item.get("math") == "first_time_for_user":
                if kind != "events" or item.get("id") is None:
                    raise RequestError("first_time_for_user funnel steps need a named event.",
                                       f"{kind}__{i}__math", "unsupported")
                first_time_names.add(str(item["id"]))
    # The only math a funnel step keeps (§4.3): its step event must be the person's first ever.
    first_time = [(e.get("order"), str(e.get("id"))) for e in items["events"]
                  if isinstance(e, dict) and e.get("math") == "first_time_for_user"]
    stripped = {**data, **{k: [{**i, "math": None} if isinstance(i, dict) else i for i in v] for k, v in items.items()}}
    entities = _entities(stripped) if any(items.values()) else []
    if len(entities) < 2:
        raise RequestError("Funnels require at least two steps.", "events")
    first_time_steps = tuple(i + 1 for i, e in enumerate(entities) if e.type == "events"
                             and (e.order, e.id) in first_time and e.id in first_time_names)
    global_filters = request_filters(data, test_account_filters)
    steps = tuple(_step(e) for e in entities)
    order = data.get("funnel_order_type") or "ordered"
    if not isinstance(order, str) or order not in ORDER_TYPES:
        raise RequestError(f"Unknown funnel_order_type '{order}'.", "funnel_order_type", "invalid_choice")
    viz = data.get("funnel_viz_type")
    if not viz:
        viz = "trends" if data.get("display") == "ActionsLineGraph" else "steps"
    if not isinstance(viz, str) or viz not in VIZ_TYPES:
        raise RequestError(f"Unknown funnel_viz_type '{viz}'.", "funnel_viz_type", "invalid_choice")
    exclusions = _exclusions(data, entities, steps, order)
    breakdown = _breakdown(data)
    listed = decode_json_field(data, "breakdowns", None)
    if isinstance(listed, list) and len(listed) > 1:
        raise RequestError("Funnels support only one breakdown.", "breakdowns")
    attribution = data.get("breakdown_attribution_type") or "first_touch"
    if not isinstance(attribution, str) or attribution not in ATTRIBUTIONS:
        raise RequestError(f"Unknown breakdown_attribution_type '{attribution}'.", "breakdown_attribution_type",
                           "invalid_choice")
    attribution_step = int_field(data, "breakdown_attribution_value", None, 0, MAX_FUNNEL_STEPS - 1)
    if attribution == "step" and attribution_step is None:
        raise RequestError("breakdown_attribution_value is required with step attribution.",
                           "breakdown_attribution_value")
    n = len(steps)
    from_step = int_field(data, "funnel_from_step", 0) or 0
    to_step = int_field(data, "funnel_to_step", n - 1)
    assert to_step is not None
    if viz == "time_to_convert" and not 1 <= to_step <= n - 1:
        allowed = ", ".join(str(i) for i in range(1, n))
        raise RequestError(f"Filter parameter funnel_to_step can only be one of {allowed} for time to convert!",
                           "funnel_to_step")
    if not 0 <= from_step < to_step <= n - 1:
        raise RequestError(f"funnel_from_step and funnel_to_step must satisfy 0 <= from < to <= {n - 1}.",
                           "funnel_from_step")
    definition = FunnelDefinition(
        project_id=project_id, steps=steps, exclusions=exclusions, filters=global_filters,
        breakdown=breakdown, every_event=order == "strict" or correlation_events is not None, timezone=timezone,
        keep_names=correlation_events is not None, property_events=tuple(correlation_events or ()),
        summaries=(order == "ordered" and not exclusions and correlation_events is None and not first_time_steps
                   and (breakdown is None or attribution in ("first_touch", "last_touch"))),
    )
    bins = int_field(data, "bin_count", None, 1)
    body = body or {}
    unbox = (body.get("insight") == "FUNNELS" and body.get("breakdown_type") in ("person", "event")
             and isinstance(body.get("breakdown"), str))
    return FunnelRequest(
        definition=definition, entities=entities, order=order, viz=viz, window_s=_window(data),
        date_from=date_field(data, "date_from"), date_to=date_field(data, "date_to"),
        interval=_interval(data), from_step=from_step, to_step=to_step,
        attribution=attribution, attribution_step=attribution_step,
        breakdown_limit=int_field(data, "breakdown_limit", 25, 1, MAX_BREAKDOWN_LIMIT) or 25,
        bin_count=min(90, bins) if bins is not None else None, unbox=unbox, raw=data,
        refresh=str(data.get("refresh") or "").lower(), first_time_steps=first_time_steps,
        explicit_date=to_bool(data.get("explicit_date")),
    )


def _exclusions(data: dict[str, Any], entities: list[Entity], steps: tuple[FunnelStep, ...],
                order: str) -> tuple[Exclusion, ...]:
    raw = decode_json_field(data, "exclusions", [])
    if not isinstance(raw, list):
        raise RequestError("'exclusions' must be a list of entities", "exclusions")
    n = len(steps)
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RequestError("each exclusion must be an object", f"exclusions__{i}")
        start = int_field(item, "funnel_from_step", 0, 0) or 0
        end = int_field(item, "funnel_to_step", n - 1, 0)
        assert end is not None
        if end <= start:
            raise RequestError("Exclusion event range is invalid. End of range should be greater than start.")
        if start >= n - 1:
            raise RequestError("Exclusion event range is invalid. Start of range is greater than number of steps.")
        if end > n - 1:
            raise RequestError("Exclusion event range is invalid. End of range is greater than number of steps.")
        if order == "unordered" and (start != 0 or end != n - 1):
            raise RequestError("Partial Exclusions not allowed in unordered funnels")
        kind = "actions" if item.get("type") == "actions" else "events"
        (entity,) = _entities({kind: [{**item, "math": None, "order": 0}]})
        for j in range(start, end + 1):
            other = entities[j]
            if (other.id == entity.id and other.type == entity.type and not item.get("properties")
                    and not other.properties):
                raise RequestError("Exclusion steps cannot contain an event that's part of funnel steps.")
        out.append(Exclusion(_step(entity), start, end))
    return tuple(out)
