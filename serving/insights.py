"""Insight calculation endpoints under `/api/environments/{id}/insights/` and `/api/projects/{id}/insights/`."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import Histogram

from schemas.dates import DateParseError, iso_instant
from schemas.definitions import Definition
from schemas.fields import MAX_NESTING, decode_json_field, int_field, nesting, text_field
from schemas.funnels import PARAMETERS as FUNNEL_PARAMETERS
from schemas.funnels import parse_funnel_request
from schemas.paths import parse_paths_request
from schemas.projects import Project
from schemas.retention import PARAMETERS as RETENTION_PARAMETERS
from schemas.retention import parse_retention_request
from schemas.trends import RequestError, parse_trends_request
from serving.auth import authenticate, authorize
from serving.errors import JSON, ApiError, validation
from serving.funnels import CorrelationQuery, FunnelQuery, parse_correlation
from serving.openapi import describe
from serving.paths import PathsQuery
from serving.people import person_details
from serving.retention import RetentionQuery
from serving.trends import TrendQuery, resolve_now
from state.registry import DefinitionRegistry

router = APIRouter(tags=["insights"])
QUERY_SECONDS = Histogram("insightflow_insight_seconds", "Insight calculation time", ["kind"])


async def request_data(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
    """(query string with the JSON body on top (§4.1), the body alone)."""
    data: dict[str, Any] = dict(request.query_params)
    parsed: dict[str, Any] = {}
    if request.method in ("POST", "PATCH", "PUT"):
        body = await request.body()
        if body.strip():
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise ApiError(400, "invalid_request", "parse_error", f"JSON parse error - {exc}") from exc
            if not isinstance(parsed, dict):
                raise ApiError(400, "invalid_request", "parse_error", "The request body must be a JSON object.")
            for name, value in parsed.items():
                if nesting(value) > MAX_NESTING:
                    raise validation(f"'{name}' nests more than {MAX_NESTING} levels deep.", name)
            data.update(parsed)
    return data, parsed


BLOCKING = {"blocking", "force_blocking", "true", "1"}


async def materialized(registry: DefinitionRegistry, definitions: list[Definition], refresh: str,
                       timeout: float) -> float | None:
    """Register what the request needs; None once all is built, else the progress (0..1) so far.

    With `refresh=blocking` the request waits for the backfill (up to `timeout` seconds).
    """
    if not definitions:
        return None
    for definition in definitions:
        registry.register(definition)
    deadline = time.monotonic() + (timeout if refresh in BLOCKING else 0)
    while True:
        states = [registry.status(d.project_id, d.hash) for d in definitions]
        for definition, (status, _) in zip(definitions, states, strict=True):
            if status == "failed":
                reason = registry.failure(definition.project_id, definition.hash) or "unknown reason"
                raise ApiError(400, "validation_error", "definition_failed",
                               f"This insight cannot be answered: the state it needs could not be kept "
                               f"({reason}).", "filters")
        if all(status == "ready" for status, _ in states):
            return None
        if time.monotonic() >= deadline:
            return min(progress for _, progress in states)
        await asyncio.sleep(0.05)


async def insight_request(request: Request, project_id: str) -> tuple[dict[str, Any], dict[str, Any], Project]:
    """Parameters, JSON body and the project of an insight request whose key may read insights."""
    data, body = await request_data(request)
    registry = request.app.state.registry
    project = authorize(authenticate(request, registry, body), registry, project_id, "insight:read")
    return data, body, project


async def query_materialized(state: Any, query: Any, refresh: str) -> float | None:
    """What `materialized` says for a query, once the query has made its blocking reads (its archive
    check, off the event loop): None when it can answer. A query the event archive answers (its
    definitions still building, or a backlog's persons pending: serving/compute.py) answers now,
    registered all the same and built in the background; `refresh=blocking` still waits for a
    build, as before."""
    await asyncio.to_thread(query.prepare)
    meanwhile = query.answers_from_archive() and refresh not in BLOCKING
    pending = await materialized(state.definitions, query.definitions(), "" if meanwhile else refresh,
                                 state.settings.blocking_timeout_s)
    return None if meanwhile else pending


async def still_building(request: Request, query: Any, refresh: str) -> Response | None:
    """None once every definition the query reads is built; else the 202 progress answer."""
    pending = await query_materialized(request.app.state, query, refresh)
    if pending is None:
        return None
    return JSON({"status": "materializing", "progress": round(pending, 4)}, status_code=202)


def _now(request: Request) -> datetime:
    settings = request.app.state.settings
    try:
        return resolve_now(request.headers.get("x-insightflow-now"), settings.test_clock, datetime.now(UTC))
    except DateParseError as exc:
        raise validation(f"Invalid X-Insightflow-Now header: {exc}") from exc


def trend_csv(result: list[dict[str, Any]], request: Request, date_range: tuple[str | None, str]) -> Response:
    """CSV as PostHog renders it (§6.13): a `series` column, then one column per bucket label."""
    rows = []
    for item in result:
        row = {"series": (item.get("action") or {}).get("custom_name") or item.get("label")}
        row.update({label: value for label, value in zip(item.get("labels", []), item.get("data", []), strict=False)})
        rows.append(row)
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), extrasaction="ignore", lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    body = out.getvalue()
    insight_id = request.query_params.get("export_insight_id")
    if insight_id:
        body = f"{str(request.base_url).rstrip('/')}/insights/{insight_id}/\n" + body
    name = re.sub(r"[^\w\s-]", "", request.query_params.get("export_name") or "export").strip().lower()
    name = re.sub(r"[-\s]+", "-", name) or "export"
    start, end = date_range
    span = f"{start} -" if start else "up until"
    return Response(body.encode(), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="{name} ({span} {end}) from PostHog.csv"'})


async def _trend(request: Request, project_id: str) -> Response:
    started = time.perf_counter()
    query, data, project, waiting = await calculation(request, project_id, "TRENDS")
    if waiting is not None:
        return waiting
    result = await computed(request, query, "run")
    QUERY_SECONDS.labels("trend").observe(time.perf_counter() - started)
    if request.url.path.endswith(".csv") or data.get("format") == "csv":
        first = query.periods[0].range
        start = None if query.request.date_from == "all" else first.date_from.date().isoformat()
        return trend_csv(result, request, (start, first.date_to.date().isoformat()))
    return JSON({
        "result": result, "timezone": project.timezone, "is_cached": False,
        "last_refresh": iso_instant(datetime.now(UTC)), "timings": [], "next": next_link(request, len(result)),
    })


def next_link(request: Request, results: int) -> str | None:
    """The breakdown pagination link exactly as PostHog builds it (§6.12), quirks included."""
    raw_limit = request.query_params.get("breakdown_limit")
    try:
        limit = int(raw_limit) if raw_limit else 25
    except ValueError:
        limit = 25
    if results < limit:
        return None
    full_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if "offset" in full_path:
        current = request.query_params.get("offset", "0")
        advanced = int(current) + limit if current.isdigit() else limit
        return full_path.replace(f"offset={current}", f"offset={advanced}").lstrip("/")
    separator = "&" if request.url.query else "?"
    return f"{request.url}{separator}offset={limit}"


def build_query(state: Any, project: Project, kind: str, data: dict[str, Any], now: datetime,
                body: dict[str, Any] | None = None) -> Any:
    """The calculation a request, or a saved insight's filters, describes: the one place per kind."""
    kind = kind.upper()
    redis = state.redis
    if kind == "TRENDS":
        return TrendQuery(redis, project, parse_trends_request(data), now)
    if kind in ("FUNNELS", "CORRELATION"):
        wanted = parse_correlation(data) if kind == "CORRELATION" else None
        funnel = {**data, "insight": "FUNNELS", **({"funnel_viz_type": "steps"} if wanted else {})}
        parsed = parse_funnel_request(funnel, project.id, project.timezone, project.test_account_filters, body,
                                      correlation_events=wanted.event_names if wanted else None)
        query = FunnelQuery(redis, project, parsed, now, state.archive, state.settings.archive_backlog_persons)
        return CorrelationQuery(query, wanted, state.archive) if wanted else query
    if kind == "RETENTION":
        return RetentionQuery(redis, project, parse_retention_request(data, project.test_account_filters), now)
    if kind == "PATHS":
        parsed = parse_paths_request(data, project.id, project.timezone, project.test_account_filters,
                                     project.path_cleaning_filters)
        return PathsQuery(redis, project, parsed, now, state.archive, state.settings.archive_backlog_persons)
    raise RequestError(f"Insights of type {kind} cannot be calculated here.", "insight", "unsupported")


async def calculation(request: Request, project_id: str, kind: str, blocking: bool = False
                      ) -> tuple[Any, dict[str, Any], Project, Response | None]:
    """Authenticate, parse and build the query, register what it reads; the last item is the 202
    answer while a definition is still being built (or None)."""
    data, body, project = await insight_request(request, project_id)
    try:
        query = build_query(request.app.state, project, kind, data, _now(request), body)
    except RequestError as exc:
        raise validation(exc.detail, exc.attr, exc.code) from exc
    except DateParseError as exc:
        raise validation(str(exc), exc.attr or "date_from") from exc
    waiting = await still_building(request, query, "blocking" if blocking else query.request.refresh)
    return query, data, project, waiting


async def computed(request: Request, query: Any, method: str, *args: Any) -> Any:
    """`query.method(*args)`, computed off the event loop within the time budget (serving/compute.py);
    identical requests in flight share one computation."""
    key = "\x00".join((request.method, request.url.path, str(sorted(request.query_params.multi_items())),
                       (await request.body()).decode(errors="replace"), request.headers.get("x-insightflow-now", ""),
                       method, repr(args)))
    return await request.app.state.computations.run(query, method, *args, key=key)


def _echoed(data: dict[str, Any], parameters: tuple[str, ...]) -> dict[str, str]:
    """The parameters a people URL repeats: those the calculation reads (JSON-encoded where not strings)."""
    return {k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in data.items() if k in parameters}


@dataclass(frozen=True)
class FunnelPeopleUrl:
    """A step's `converted_people_url`/`dropped_people_url` (picklable: built in a compute worker)."""

    base: str
    shared: dict[str, str]

    def __call__(self, step: int, value: tuple[str, ...]) -> str:
        params: dict[str, Any] = {**self.shared, "funnel_step": step}
        if value:
            params["funnel_step_breakdown"] = orjson.dumps(list(value)).decode()
        return f"{self.base}?{urlencode(params)}"


@dataclass(frozen=True)
class RetentionPeopleUrl:
    """A cohort cell's `people_url` (picklable: built in a compute worker)."""

    base: str
    path: str
    shared: dict[str, str]

    def __call__(self, row: int, _column: int | None, value: str | None, absolute: bool) -> str:
        params = {**self.shared, "selected_interval": row, **({"breakdown_value": value} if value is not None else {})}
        return f"{self.base if absolute else ''}{self.path}?{urlencode(params)}"


def _result(project: Project, result: Any) -> Response:
    return JSON({"result": result, "timezone": project.timezone, "is_cached": False,
                 "last_refresh": iso_instant(datetime.now(UTC)), "timings": []})


async def _funnel(request: Request, project_id: str) -> Response:
    """Funnel steps, trends or time to convert (spec §7)."""
    started = time.perf_counter()
    query, data, project, waiting = await calculation(request, project_id, "FUNNELS")
    if waiting is not None:
        return waiting
    base = f"{str(request.base_url).rstrip('/')}/api/environments/{project.id}/insights/funnel/people/"
    people_url = FunnelPeopleUrl(base, _echoed(data, FUNNEL_PARAMETERS))
    result = await computed(request, query, "run", people_url)
    QUERY_SECONDS.labels("funnel").observe(time.perf_counter() - started)
    return _result(project, result)


async def _funnel_people(request: Request, project_id: str) -> Response:
    """The persons behind a funnel step's count (`converted_people_url` / `dropped_people_url`)."""
    query, data, project, waiting = await calculation(request, project_id, "FUNNELS", blocking=True)
    if waiting is not None:
        return waiting
    steps = len(query.request.definition.steps)
    try:
        step = int_field(data, "funnel_step", 1, -steps, steps) or 1
        limit = min(int_field(data, "limit", 100, 1) or 100, 1000)
        offset = int_field(data, "offset", 0, 0) or 0
        decoded = decode_json_field(data, "funnel_step_breakdown", None)
    except RequestError as exc:
        raise validation(exc.detail, exc.attr) from exc
    value = None
    if decoded is not None:
        parts = decoded if isinstance(decoded, list) else [decoded]
        if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in parts):
            raise validation("'funnel_step_breakdown' must be a breakdown value or a list of them.",
                             "funnel_step_breakdown")
        value = tuple(str(v) for v in parts)
    persons = await computed(request, query, "people", step, value)
    page = persons[offset:offset + limit]
    people = person_details(request.app.state.redis, project.id, page)
    following = None
    if offset + limit < len(persons):
        following = str(request.url.include_query_params(offset=offset + limit, limit=limit))
    return JSON({"results": [{"people": people, "count": len(persons)}], "next": following})


async def _funnel_correlation(request: Request, project_id: str) -> Response:
    """Funnel correlation (spec §8). Unlike PostHog, personal API keys with insight:read may call it."""
    query, _data, _project, waiting = await calculation(request, project_id, "CORRELATION")
    if waiting is not None:
        return waiting
    return JSON({"result": await computed(request, query, "run"), "last_refresh": iso_instant(datetime.now(UTC)),
                 "is_cached": False})


async def _retention(request: Request, project_id: str) -> Response:
    """Retention cohorts (spec §10)."""
    query, data, project, waiting = await calculation(request, project_id, "RETENTION")
    if waiting is not None:
        return waiting
    people_url = RetentionPeopleUrl(str(request.base_url).rstrip("/"),
                                    f"/api/environments/{project.id}/insights/retention/people/",
                                    _echoed(data, RETENTION_PARAMETERS))
    return _result(project, await computed(request, query, "run", people_url))


async def _retention_people(request: Request, project_id: str) -> Response:
    """The persons of one retention cohort row, with the periods they returned in."""
    query, data, project, waiting = await calculation(request, project_id, "RETENTION", blocking=True)
    if waiting is not None:
        return waiting
    try:
        selected = int_field(data, "selected_interval", 0, 0, len(query.periods) - 1) or 0
        value = text_field(data, "breakdown_value")
    except RequestError as exc:
        raise validation(exc.detail, exc.attr) from exc
    rows = await computed(request, query, "people", selected, value)
    details = {str(p["id"]): p for p in person_details(request.app.state.redis, project.id, [p for p, _ in rows])}
    return JSON({"result": [{"person": details[p], "appearances": [int(a) for a in appearances]}
                            for p, appearances in rows], "next": None})


async def _paths(request: Request, project_id: str) -> Response:
    """Path edges (spec §9)."""
    query, _data, project, waiting = await calculation(request, project_id, "PATHS")
    if waiting is not None:
        return waiting
    return _result(project, await computed(request, query, "run"))


for prefix in ("/api/environments/{project_id}/insights", "/api/projects/{project_id}/insights"):
    env = prefix.split("/")[2]
    for suffix, endpoint, kind in (("/funnel/", _funnel, "funnel"),
                                   ("/funnel/correlation/", _funnel_correlation, "funnel_correlation"),
                                   ("/funnel/people/", _funnel_people, "funnel_people"),
                                   ("/path/", _paths, "path"), ("/retention/", _retention, "retention"),
                                   ("/retention/people/", _retention_people, "retention_people")):
        for method in ("GET", "POST"):  # one operation id per method (FastAPI would repeat a shared one)
            router.add_api_route(prefix + suffix, endpoint, methods=[method], openapi_extra=describe(kind),
                                 operation_id=f"{kind}_{env}_{method.lower()}")
        router.add_api_route(prefix + suffix.rstrip("/"), endpoint, methods=["GET", "POST"], include_in_schema=False)
    for suffix in ("/trend/", "/trend", "/trend.csv"):
        variant = {"/trend/": "", "/trend": "_noslash", "/trend.csv": "_csv"}[suffix]
        for method in ("GET", "POST"):
            router.add_api_route(prefix + suffix, _trend, methods=[method], include_in_schema=suffix != "/trend",
                                 operation_id=f"trend_{env}{variant}_{method.lower()}", openapi_extra=describe("trend"),
                                 responses={200: {"content": {"application/json": {}, "text/csv": {}},
                                                  "description": "Trend result (JSON, or CSV with format=csv)"}})
