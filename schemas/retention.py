"""The retention request (spec §10.2) and the state each of its two entities reads.

An entity without filters or breakdown reads the always-on per-day (or per-hour) person bitmaps; one
with filters, an inline action, a breakdown, or a minimum number of returning events reads a trend
definition's state (the same materialization mechanism as trends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.definitions import Breakdown, Definition
from schemas.fields import MAX_BREAKDOWN_LIMIT, date_field, decode_json_field, int_field, refuse_unbuilt, to_bool
from schemas.filters import NO_FILTERS, FilterGroup, all_of
from schemas.trends import Entity, RequestError, _breakdown, _entities, request_filters

PERIODS = {"Hour": "hour", "Day": "day", "Week": "week", "Month": "month"}
TYPES = ("retention_recurring", "retention_first_time")


@dataclass(frozen=True)
class RetentionRequest:
    target: Entity
    returning: Entity
    period: str  # Hour, Day, Week, Month
    total_intervals: int
    first_time: bool
    date_to: str | None
    filters: FilterGroup
    breakdown: Breakdown | None
    breakdown_limit: int
    cumulative: bool
    minimum_occurrences: int
    raw: dict[str, Any]
    refresh: str = ""

    @property
    def interval(self) -> str:
        return PERIODS[self.period]


# What a retention request reads; a cohort's `people_url` repeats these, and nothing else.
PARAMETERS = ("insight", "target_entity", "returning_entity", "period", "total_intervals", "date_to", "date_from",
              "retention_type", "properties", "filter_test_accounts", "breakdown", "breakdown_type", "breakdowns",
              "breakdown_limit", "breakdown_normalize_url", "cumulative", "minimum_occurrences", "display")


def _entity(data: dict[str, Any], name: str, default: dict[str, Any]) -> Entity:
    raw = decode_json_field(data, name, None) or default
    if not isinstance(raw, dict):
        raise RequestError(f"'{name}' must be an entity object", name)
    kind = "actions" if raw.get("type") == "actions" else "events"
    try:
        (entity,) = _entities({kind: [{**raw, "math": None, "order": 0}]})
    except RequestError as exc:
        raise RequestError(exc.detail, name, exc.code) from exc
    return entity


def parse_retention_request(data: dict[str, Any], test_account_filters: list[Any]) -> RetentionRequest:
    refuse_unbuilt(data)
    target = _entity(data, "target_entity", {"id": "$pageview", "type": "events"})
    returning = _entity(data, "returning_entity", decode_json_field(data, "target_entity", None)
                        or {"id": "$pageview", "type": "events"})
    period = data.get("period") or "Day"
    if not isinstance(period, str) or period not in PERIODS:
        raise RequestError(f"Period {period} is unsupported.", "period", "invalid_choice")
    intervals = int_field(data, "total_intervals", 11, 1, 500) or 11
    minimum = int_field(data, "minimum_occurrences", 1, 1) or 1
    kind = data.get("retention_type") or "retention_recurring"
    if not isinstance(kind, str) or kind not in TYPES:
        raise RequestError(f"Unknown retention_type '{kind}'.", "retention_type", "invalid_choice")
    filters = request_filters(data, test_account_filters)
    breakdown = _breakdown(data)
    first_time = kind == "retention_first_time"
    if first_time and (target.id is None or target.steps or not target.filters.empty or not filters.empty
                       or breakdown is not None):
        raise RequestError("First-time retention with a filtered, action or all-events target, or a breakdown, "
                           "is not supported yet.", "retention_type", "unsupported")
    return RetentionRequest(
        target=target, returning=returning, period=period, total_intervals=intervals, first_time=first_time,
        date_to=date_field(data, "date_to"), filters=filters, breakdown=breakdown,
        breakdown_limit=int_field(data, "breakdown_limit", 25, 1, MAX_BREAKDOWN_LIMIT) or 25,
        cumulative=to_bool(data.get("cumulative")), minimum_occurrences=minimum, raw=data,
        refresh=str(data.get("refresh") or "").lower(),
    )


def entity_definition(request: RetentionRequest, entity: Entity, project_id: int, timezone: str,
                      per_actor: bool = False) -> Definition | None:
    """The materialization an entity needs, or None when the always-on bitmaps answer it."""
    filters = all_of(request.filters, entity.filters)
    if filters.empty and request.breakdown is None and not entity.steps and not per_actor:
        return None
    return Definition(project_id=project_id, event=None if entity.steps else entity.id,
                      filters=filters if not filters.empty else NO_FILTERS, breakdown=request.breakdown,
                      per_actor=per_actor, timezone=timezone, steps=entity.steps)
