"""The parameters of each insight endpoint, as published in /openapi.json (spec §4–§10).

The handlers read one merged dict of query string and JSON body (PostHog's legacy filter), so every
parameter is listed twice from the same table: as a query parameter (lists and objects JSON-encoded
in a string) and as a property of the JSON body. Unknown parameters are ignored, as PostHog does.
"""

from __future__ import annotations

from typing import Any

Param = tuple[str, dict[str, Any], str]

_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_LIST: dict[str, Any] = {"type": "array", "items": {}}
_OBJ: dict[str, Any] = {"type": "object"}


def _choice(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


COMMON: list[Param] = [
    ("events", _LIST, "Series or steps: event entities {id, order, name, custom_name, math, properties, ...}"),
    ("actions", _LIST, "Series or steps: inline action entities (id, steps)"),
    ("properties", {}, "Global property filters: a list, or a group {type: AND|OR, values: [...]} (§4.4)"),
    ("filter_test_accounts", _BOOL, "Apply the project's test-account filters"),
    ("date_from", _STR, "Start: absolute date/time, relative (-7d, -2w, -1m, -1y, -24h, mStart...) or 'all'"),
    ("date_to", _STR, "End: absolute or relative; default now"),
    ("explicit_date", _BOOL, "Use date_from/date_to exactly, without rounding to the interval"),
    ("breakdown", {}, "Breakdown property name (or a list of names)"),
    ("breakdown_type", _choice("event", "person"), "Where the breakdown property is read"),
    ("breakdowns", _LIST, "Several breakdowns [{property, type}]"),
    ("breakdown_limit", _INT, "Breakdown values kept before the rest is folded into 'Other'"),
    ("refresh", _STR, "'blocking' waits for a new definition to be built instead of answering 202"),
]
TRENDS: list[Param] = [
    ("interval", _choice("hour", "day", "week", "month"), "Bucket size (default day)"),
    ("display", _STR, "ActionsLineGraph, ActionsLineGraphCumulative, ActionsBarValue, ActionsTable, ..."),
    ("compare", _BOOL, "Also answer the previous period"),
    ("compare_to", _STR, "Relative offset of the compared period (e.g. -1w)"),
    ("formula", _STR, "Formula over the series letters A, B, ... (e.g. A/B*100)"),
    ("smoothing_intervals", _INT, "Moving average over this many buckets"),
    ("breakdown_histogram_bin_count", _INT, "Bins for a numeric breakdown"),
    ("breakdown_normalize_url", _BOOL, "Strip query strings, fragments and trailing slashes of URL values"),
    ("breakdown_hide_other_aggregation", _BOOL, "Drop the 'Other' series"),
    ("format", _choice("json", "csv"), "Answer as CSV"),
]
FUNNELS: list[Param] = [
    ("interval", _choice("hour", "day", "week", "month"), "Entrance period size for funnel_viz_type=trends"),
    ("funnel_viz_type", _choice("steps", "trends", "time_to_convert"), "Which view"),
    ("funnel_order_type", _choice("ordered", "strict", "unordered"), "How steps must follow each other"),
    ("funnel_window_interval", _INT, "Conversion window length (default 14)"),
    ("funnel_window_interval_unit", _choice("second", "minute", "hour", "day", "week", "month"),
     "Conversion window unit (default day)"),
    ("funnel_window_days", _INT, "Deprecated conversion window in days"),
    ("exclusions", _LIST, "Exclusion steps {id, funnel_from_step, funnel_to_step}"),
    ("funnel_from_step", _INT, "From step (0-based) for trends and time_to_convert"),
    ("funnel_to_step", _INT, "To step (0-based) for trends and time_to_convert"),
    ("breakdown_attribution_type", _choice("first_touch", "last_touch", "all_events", "step"),
     "Which step event's breakdown value the actor gets"),
    ("breakdown_attribution_value", _INT, "The step (0-based) for step attribution"),
    ("bin_count", _INT, "Bins of the time_to_convert histogram"),
]
CORRELATION: list[Param] = [
    ("funnel_correlation_type", _choice("events", "properties", "event_with_properties"), "What is correlated"),
    ("funnel_correlation_names", _LIST, "Person properties to analyse ($all for every one)"),
    ("funnel_correlation_exclude_names", _LIST, "Person properties to leave out"),
    ("funnel_correlation_event_names", _LIST, "Events whose properties are analysed"),
    ("funnel_correlation_exclude_event_names", _LIST, "Events to leave out"),
    ("funnel_correlation_event_exclude_property_names", _LIST, "Event properties to leave out"),
]
FUNNEL_PEOPLE: list[Param] = [
    ("funnel_step", _INT, "Persons who reached this 1-based step; negative: dropped before it"),
    ("funnel_step_breakdown", {}, "Only the persons of this breakdown value"),
    ("limit", _INT, "Page size (default 100, at most 1000)"),
    ("offset", _INT, "Page start"),
]
RETENTION: list[Param] = [
    ("target_entity", _OBJ, "Cohorting event or action {id, type, properties}"),
    ("returning_entity", _OBJ, "Returning event or action {id, type, properties}"),
    ("period", _choice("Hour", "Day", "Week", "Month"), "Interval of the cohorts"),
    ("total_intervals", _INT, "Number of cohorts and of intervals per cohort (default 11)"),
    ("retention_type", _choice("retention_recurring", "retention_first_time"), "Recurring or first time"),
    ("cumulative", _BOOL, "Count a person in every interval up to their last return"),
    ("minimum_occurrences", _INT, "Returning events needed in an interval"),
]
RETENTION_PEOPLE: list[Param] = [
    ("selected_interval", _INT, "The cohort (0-based) whose persons are listed"),
    ("limit", _INT, "Page size"), ("offset", _INT, "Page start"),
]
PATHS: list[Param] = [
    ("include_event_types", _LIST, "$pageview, $screen and/or custom_event"),
    ("path_type", _choice("$pageview", "$screen", "custom_event"), "One event type (deprecated)"),
    ("include_custom_events", _LIST, "Named custom events"),
    ("exclude_events", _LIST, "Path items to drop"),
    ("start_point", _STR, "Paths start at this item"),
    ("end_point", _STR, "Paths end at this item"),
    ("step_limit", _INT, "Steps per path (default 5)"),
    ("edge_limit", _INT, "Edges returned (default 50)"),
    ("min_edge_weight", _INT, "Drop edges with fewer sessions"),
    ("max_edge_weight", _INT, "Drop edges with more sessions"),
    ("path_groupings", _LIST, "Wildcard patterns whose matches become one item"),
    ("path_replacements", _BOOL, "Apply the project's path cleaning rules"),
    ("local_path_cleaning_filters", _LIST, "Extra cleaning rules {regex, alias}"),
]

KINDS: dict[str, list[Param]] = {
    "trend": COMMON + TRENDS,
    "funnel": COMMON + FUNNELS,
    "funnel_correlation": COMMON + FUNNELS + CORRELATION,
    "funnel_people": COMMON + FUNNELS + FUNNEL_PEOPLE,
    "retention": COMMON + RETENTION,
    "retention_people": COMMON + RETENTION + RETENTION_PEOPLE,
    "path": COMMON + PATHS,
}


def _query_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """In a query string, lists, objects and free-form values travel JSON-encoded."""
    if schema.get("type") in ("integer", "boolean") or "enum" in schema:
        return schema
    return {"type": "string"}


def describe(kind: str) -> dict[str, Any]:
    """openapi_extra for an insight endpoint: its query parameters and JSON body properties."""
    params = KINDS[kind]
    return {
        "parameters": [{"name": name, "in": "query", "required": False, "description": text,
                        "schema": _query_schema(schema)} for name, schema, text in params],
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": True,
            "properties": {name: {**schema, "description": text} for name, schema, text in params},
        }}}},
    }


INSIGHT_FIELDS: list[Param] = [
    ("name", _STR, "Name"), ("description", _STR, "Description"),
    ("filters", _OBJ, "The legacy filter (§4): its `insight` says which calculation"),
    ("query", _OBJ, "An InsightVizNode query (stored; its source kind picks the calculation)"),
    ("tags", {"type": "array", "items": {"type": "string"}}, "Tags"),
    ("favorited", _BOOL, "Favorited"), ("saved", _BOOL, "Saved (not a draft)"),
    ("deleted", _BOOL, "Soft delete (true) or restore (false)"),
    ("dashboards", {"type": "array", "items": {"type": "integer"}}, "Deprecated: dashboard ids"),
    ("order", _INT, "Order on a dashboard"),
]
SAVED: dict[str, dict[str, Any]] = {
    "insights": {"parameters": [
        {"name": name, "in": "query", "required": False, "description": text, "schema": schema}
        for name, schema, text in (
            ("saved", _BOOL, "Only saved insights"), ("favorited", _BOOL, "Only favorited insights"),
            ("search", _STR, "Name or description contains"), ("short_id", _STR, "The insight with this short id"),
            ("basic", _BOOL, "Leave out results"), ("refresh", _STR, "Compute results"),
            ("limit", _INT, "Page size (default 100)"), ("offset", _INT, "Page start"))],
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": True,
            "properties": {name: {**schema, "description": text} for name, schema, text in INSIGHT_FIELDS}}}}}},
    "viewed": {"requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"insight_ids": {"type": "array", "items": {"type": "integer"},
                                                         "description": "Insights viewed"}}}}}}},
    "timing": {"requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": True,
        "properties": {"insight_id": {"type": "integer"}, "type": {"type": "string"},
                       "time_to_see_data_ms": {"type": "number", "description": "Recorded as a metric"}}}}}}},
    "insight_access_controls": {"requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": True,
        "properties": {"access_level": {"type": "string", "enum": ["none", "viewer", "editor", "manager"]},
                       "organization_member": {"type": "string"}, "role": {"type": "string"}}}}}}},
}
SAVED["insight"] = {"requestBody": SAVED["insights"]["requestBody"]}
