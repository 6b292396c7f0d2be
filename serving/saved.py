"""Saved insights (spec §14), views and `my_last_viewed` (§12), and `timing` (§11).

Saving an insight registers the definitions its filters need, so its result is kept live by the
dataflow; reading it computes the result from that state (or, with `refresh=blocking`, waits for the
backfill). Deliberate difference: PostHog serves `my_last_viewed`, `viewed` and `timing` to browser
sessions only; here personal API keys are the principals, so a key with `insight:read` may call them
and views are recorded per key.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import Histogram

from schemas.dates import DateParseError, iso_instant
from schemas.fields import int_field, to_bool
from schemas.projects import ApiKey, Project
from schemas.saved import DEFAULT_LEVEL, LEVELS, InsightError, owner_of, validate
from schemas.trends import RequestError
from serving.auth import authenticate, authorize
from serving.errors import JSON, ApiError, not_found, validation
from serving.insights import BLOCKING, _now, build_query, query_materialized, request_data
from serving.openapi import SAVED
from state.saved import AccessControls, InsightStore

router = APIRouter(tags=["saved insights"])
TIME_TO_SEE_DATA = Histogram("insightflow_time_to_see_data_seconds", "Client-reported time to see data", ["type"])
BASIC = ("id", "short_id", "name", "derived_name", "filters", "query", "dashboards", "dashboard_tiles", "description",
         "last_refresh", "refreshing", "saved", "tags", "updated_at", "created_by", "created_at", "last_modified_at",
         "favorited", "user_access_level", "last_viewed_at", "search_match_type")


def _saved_query(state: Any, project: Project, filters: dict[str, Any], request: Request) -> Any:
    """The calculation a saved insight's legacy filters describe (TRENDS when they name none)."""
    return build_query(state, project, str(filters.get("insight") or "TRENDS"), filters, _now(request))


async def _principal(request: Request, project_id: str, scope: str) -> tuple[ApiKey, Project, dict, dict]:
    data, body = await request_data(request)
    registry = request.app.state.registry
    key = authenticate(request, registry, body)
    return key, authorize(key, registry, project_id, scope), data, body


def _owner(key: ApiKey) -> dict[str, Any]:
    return owner_of(key.value_hash, key.label)


def access_level(client: Any, project: Project, insight: dict[str, Any], key: ApiKey) -> str:
    """The caller's level on an insight: `*` keys and the creator manage; otherwise its entries."""
    owner = _owner(key)
    if "*" in key.scopes or (insight.get("created_by") or {}).get("uuid") == owner["uuid"]:
        return "manager"
    return AccessControls(client, project.id, insight["id"]).level_for(owner["uuid"])


def _require(level: str, needed: str) -> None:
    if LEVELS.index(level) < LEVELS.index(needed):
        raise ApiError(403, "authentication_error", "permission_denied",
                       f"You do not have {needed} access to this resource.")


async def _serialize(request: Request, project: Project, insight: dict[str, Any], key: ApiKey,
                     refresh: str = "", basic: bool = False, compute: bool = True) -> dict[str, Any]:
    state = request.app.state
    store = InsightStore(state.redis, project.id)
    viewed = {str(i["id"]): t for i, t in store.last_viewed(_owner(key)["distinct_id"], limit=10_000)}
    out = {**insight, "refreshing": False, "user_access_level": access_level(state.redis, project, insight, key),
           "search_match_type": None,
           "last_viewed_at": iso_instant(datetime.fromtimestamp(viewed[str(insight["id"])], UTC))
           if str(insight["id"]) in viewed else None}
    if insight.get("query"):
        out["filters"] = {}
    if basic:
        return {k: out.get(k) for k in BASIC}
    result, last_refresh = None, None
    query_status: dict[str, Any] | None = None
    filters = insight.get("filters") or {}
    if compute and filters and not insight.get("query"):
        try:
            query = _saved_query(state, project, filters, request)
            pending = await query_materialized(state, query, refresh)
            if pending is None:
                shape = orjson.dumps(filters, option=orjson.OPT_SORT_KEYS).decode()
                key = "\x00".join(("saved", str(project.id), shape, request.headers.get("x-insightflow-now", "")))
                result = await state.computations.run(query, "run", key=key)
                last_refresh = iso_instant(datetime.now(UTC))
        except RequestError:
            result = None
        except ApiError as exc:
            if exc.code != "definition_failed":
                raise
            query_status = {"complete": True, "error": True, "error_message": exc.detail}
    out.update({
        "result": result, "last_refresh": last_refresh, "is_cached": False, "timezone": project.timezone,
        "hasMore": None, "columns": None, "cache_target_age": None, "next_allowed_client_refresh": None,
        "query_status": query_status, "hogql": None, "types": None, "resolved_date_range": None, "alerts": [],
        "effective_restriction_level": 21, "effective_privilege_level": 37,
        "filters_hash": hashlib.sha256(orjson.dumps(filters, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32],
    })
    return out


def _checked(request: Request, project: Project, body: dict[str, Any], current: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The fields a write asks for, all checked before anything is written (a 4xx changes nothing):
    the serializer's rules, then the filters as the calculation they describe."""
    try:
        fields = validate(body)
    except InsightError as exc:
        raise _insight_error(exc) from exc
    filters = fields.get("filters") if "filters" in fields else (current or {}).get("filters")
    query = fields.get("query") if "query" in fields else (current or {}).get("query")
    if filters and not query:
        try:
            _saved_query(request.app.state, project, filters, request)
        except RequestError as exc:
            raise validation(f"filters: {exc.detail}", f"filters__{exc.attr}" if exc.attr else "filters") from exc
        except DateParseError as exc:
            raise validation(f"filters: {exc}", f"filters__{exc.attr or 'date_from'}") from exc
    return fields


async def _register(request: Request, project: Project, insight: dict[str, Any]) -> None:
    """Saving an insight registers its definitions, so the dataflow keeps its result live."""
    filters = insight.get("filters") or {}
    if not filters or insight.get("query"):
        return
    state = request.app.state
    query = _saved_query(state, project, filters, request)  # checked before the write
    try:
        await query_materialized(state, query, "")
    except ApiError as exc:
        if exc.code != "definition_failed":  # saved all the same: its result says why it is missing
            raise


def _insight_error(exc: InsightError) -> ApiError:
    return validation(exc.detail, exc.attr)


async def list_or_create(request: Request, project_id: str) -> Response:
    if request.method == "POST":
        key, project, _data, body = await _principal(request, project_id, "insight:write")
        store = InsightStore(request.app.state.redis, project.id)
        insight = store.create(_checked(request, project, body), _owner(key))
        await _register(request, project, insight)
        return JSON(await _serialize(request, project, insight, key), status_code=201)
    key, project, data, _body = await _principal(request, project_id, "insight:read")
    store = InsightStore(request.app.state.redis, project.id)
    owner = _owner(key)
    items = [i for i in store.all() if not i["deleted"]
             and access_level(request.app.state.redis, project, i, key) != "none"]
    for flag in ("saved", "favorited"):
        if data.get(flag) not in (None, ""):
            items = [i for i in items if bool(i[flag]) == to_bool(data[flag])]
    if data.get("short_id"):
        items = [i for i in items if i["short_id"] == data["short_id"]]
    if to_bool(data.get("user")):
        items = [i for i in items if (i.get("created_by") or {}).get("id") == owner["id"]]
    if data.get("insight"):
        wanted = str(data["insight"]).upper()
        items = [i for i in items if str((i.get("filters") or {}).get("insight") or "TRENDS").upper() == wanted]
    if data.get("search"):
        needle = str(data["search"]).lower()
        if len(needle) > 200:
            raise validation("Search is too long.", "search")
        items = [i for i in items if any(needle in str(i.get(f) or "").lower()
                                         for f in ("name", "derived_name", "description"))]
    items.sort(key=lambda i: (i.get("order") is None, i.get("order") or 0, -i["id"]))
    try:
        limit, offset = int_field(data, "limit", 100, 1) or 100, int_field(data, "offset", 0, 0) or 0
    except RequestError as exc:
        raise validation(exc.detail, exc.attr) from exc
    page = items[offset:offset + limit]
    basic = to_bool(data.get("basic"))
    base = str(request.url).split("?")[0]
    params = {k: v for k, v in data.items() if k not in ("limit", "offset")}
    following = f"{base}?{urlencode({**params, 'limit': limit, 'offset': offset + limit})}" \
        if offset + limit < len(items) else None
    previous = f"{base}?{urlencode({**params, 'limit': limit, 'offset': max(0, offset - limit)})}" if offset else None
    results = [await _serialize(request, project, i, key, basic=basic, compute=False) for i in page]
    return JSON({"count": len(items), "next": following, "previous": previous, "results": results})


async def one(request: Request, project_id: str, insight_id: int) -> Response:
    if request.method == "DELETE":
        await _principal(request, project_id, "insight:write")
        return Response(status_code=405)
    writing = request.method in ("PATCH", "PUT")
    key, project, data, body = await _principal(request, project_id, "insight:write" if writing else "insight:read")
    store = InsightStore(request.app.state.redis, project.id)
    current = store.get(insight_id)
    level = access_level(request.app.state.redis, project, current, key) if current else "none"
    if current is None or level == "none":
        raise not_found()
    if current["deleted"] and not (writing and body.get("deleted") is False):
        raise not_found()  # as PostHog: a deleted insight is gone, except to be restored
    if writing:
        _require(level, "editor")
        insight = store.update(insight_id, _checked(request, project, body, current), _owner(key))
        if insight is None:
            raise not_found()
        await _register(request, project, insight)
        return JSON(await _serialize(request, project, insight, key))
    refresh = str(data.get("refresh") or "").lower()
    if refresh and refresh not in BLOCKING:
        refresh = ""
    return JSON(await _serialize(request, project, current, key, refresh, basic=to_bool(data.get("basic"))))


async def access_controls(request: Request, project_id: str, insight_id: int) -> Response:
    """GET and PUT of an insight's access entries (§13)."""
    writing = request.method == "PUT"
    key, project, _data, body = await _principal(request, project_id,
                                                 "access_control:write" if writing else "access_control:read")
    client = request.app.state.redis
    insight = InsightStore(client, project.id).get(insight_id)
    if insight is None:
        raise not_found()
    level = access_level(client, project, insight, key)
    controls = AccessControls(client, project.id, insight_id)
    if writing:
        if level != "manager":
            raise ApiError(403, "authentication_error", "permission_denied",
                           "Must be manager to modify insight permissions.")
        if body.get("resource") not in (None, "insight") or body.get("resource_id") not in (None, str(insight_id)):
            raise validation("Cannot modify access controls for a resource different from the URL target.")
        try:
            entry = controls.put(body.get("access_level"), body.get("organization_member"), body.get("role"),
                                 _owner(key))
        except InsightError as exc:
            raise _insight_error(exc) from exc
        return JSON(entry) if entry is not None else Response(status_code=204)
    if level == "none":
        raise not_found()
    return JSON({"access_controls": controls.entries(), "available_access_levels": list(LEVELS),
                 "default_access_level": DEFAULT_LEVEL, "minimum_access_level": "none",
                 "maximum_access_level": "manager", "user_access_level": level,
                 "user_can_edit_access_levels": level == "manager"})


async def viewed_one(request: Request, project_id: str, insight_id: int) -> Response:
    key, project, _data, _body = await _principal(request, project_id, "insight:read")
    store = InsightStore(request.app.state.redis, project.id)
    if store.get(insight_id) is None:
        raise not_found()
    store.viewed(_owner(key)["distinct_id"], [insight_id])
    return Response(status_code=201)


async def viewed_many(request: Request, project_id: str) -> Response:
    key, project, _data, body = await _principal(request, project_id, "insight:read")
    ids = body.get("insight_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise validation("insight_ids must be a list of insight ids", "insight_ids")
    if len(ids) > 2500:
        raise validation("Ensure this field has no more than 2500 elements.", "insight_ids")
    store = InsightStore(request.app.state.redis, project.id)
    store.viewed(_owner(key)["distinct_id"], [i for i in ids if store.get(i) is not None])
    return Response(status_code=201)


async def my_last_viewed(request: Request, project_id: str) -> Response:
    """The caller's last 5 viewed insights, most recent first, as basic objects (§12)."""
    key, project, _data, _body = await _principal(request, project_id, "insight:read")
    store = InsightStore(request.app.state.redis, project.id)
    out = []
    for insight, _ in store.last_viewed(_owner(key)["distinct_id"]):
        out.append(await _serialize(request, project, insight, key, basic=True))
    return JSON(out)


async def timing(request: Request, project_id: str) -> Response:
    """Front-end time-to-see-data telemetry: recorded as a metric, answered 201 with no body (§11)."""
    _key, _project, _data, body = await _principal(request, project_id, "insight:read")
    value = body.get("time_to_see_data_ms")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        TIME_TO_SEE_DATA.labels(str(body.get("type") or "unknown")[:64]).observe(value / 1000)
    return Response(status_code=201)


for prefix in ("/api/environments/{project_id}/insights", "/api/projects/{project_id}/insights"):
    env = prefix.split("/")[2]
    for suffix, endpoint, methods, name in (
        ("/", list_or_create, ["GET", "POST"], "insights"),
        ("/my_last_viewed/", my_last_viewed, ["GET"], "my_last_viewed"),
        ("/viewed/", viewed_many, ["POST"], "viewed"),
        ("/timing/", timing, ["POST"], "timing"),
        ("/{insight_id:int}/", one, ["GET", "PATCH", "PUT", "DELETE"], "insight"),
        ("/{insight_id:int}/viewed/", viewed_one, ["POST"], "insight_viewed"),
        ("/{insight_id:int}/access_controls/", access_controls, ["GET", "PUT"], "insight_access_controls"),
    ):
        for method in methods:  # one operation id per method (FastAPI would repeat a shared one)
            router.add_api_route(prefix + suffix, endpoint, methods=[method], openapi_extra=SAVED.get(name),
                                 operation_id=f"{name}_{env}" + (f"_{method.lower()}" if len(methods) > 1 else ""))
        if suffix != "/":
            router.add_api_route(prefix + suffix.rstrip("/"), endpoint, methods=methods, include_in_schema=False)
