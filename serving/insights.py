"""Insight calculation endpoints under `/api/environments/{id}/insights/` and `/api/projects/{id}/insights/`."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from prometheus_client import Histogram

from schemas.dates import DateParseError, iso_instant
from schemas.trends import RequestError, parse_trends_request
from serving.auth import authenticate, authorize
from serving.errors import JSON, ApiError, validation
from serving.trends import TrendQuery, resolve_now

router = APIRouter(tags=["insights"])
QUERY_SECONDS = Histogram("insightflow_insight_seconds", "Insight calculation time", ["kind"])


async def request_data(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
    """(query string with the JSON body on top (§4.1), the body alone)."""
    data: dict[str, Any] = dict(request.query_params)
    parsed: dict[str, Any] = {}
    if request.method == "POST":
        body = await request.body()
        if body.strip():
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise ApiError(400, "invalid_request", "parse_error", f"JSON parse error - {exc}") from exc
            if not isinstance(parsed, dict):
                raise ApiError(400, "invalid_request", "parse_error", "The request body must be a JSON object.")
            data.update(parsed)
    return data, parsed


def _now(request: Request) -> datetime:
    settings = request.app.state.settings
    try:
        return resolve_now(request.headers.get("x-insightflow-now"), settings.test_clock, datetime.now(UTC))
    except DateParseError as exc:
        raise validation(f"Invalid X-Insightflow-Now header: {exc}") from exc


async def _trend(request: Request, project_id: str) -> JSON:
    data, body = await request_data(request)
    state = request.app.state
    key = authenticate(request, state.registry, body)
    project = authorize(key, state.registry, project_id, "insight:read")
    started = time.perf_counter()
    now = _now(request)
    try:
        parsed = parse_trends_request(data)
        result = TrendQuery(state.redis, project, parsed, now).run()
    except RequestError as exc:
        raise validation(exc.detail, exc.attr, exc.code) from exc
    except DateParseError as exc:
        raise validation(str(exc), "date_from") from exc
    QUERY_SECONDS.labels("trend").observe(time.perf_counter() - started)
    return JSON({
        "result": result, "timezone": project.timezone, "is_cached": False,
        "last_refresh": iso_instant(datetime.now(UTC)), "timings": [], "next": None,
    })


for prefix in ("/api/environments/{project_id}/insights", "/api/projects/{project_id}/insights"):
    for suffix in ("/trend/", "/trend"):
        router.add_api_route(prefix + suffix, _trend, methods=["GET", "POST"], include_in_schema=suffix.endswith("/"),
                             operation_id=f"trend_{prefix.split('/')[2]}{'_slash' if suffix.endswith('/') else ''}")
