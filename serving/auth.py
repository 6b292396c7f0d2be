"""Personal API keys with scopes, and project access (spec §2)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request

from schemas.projects import ApiKey, Project
from serving.errors import ApiError, not_found
from state.registry import Registry


def _key_from_request(request: Request, body: dict[str, Any] | None) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip() and not value.strip().startswith("pha_"):
        return value.strip(), "Authorization header"
    if body and isinstance(body.get("personal_api_key"), str):
        return body["personal_api_key"], "body"
    if request.query_params.get("personal_api_key"):
        return request.query_params["personal_api_key"], "query string"
    return None


def throttle(request: Request, key: ApiKey) -> None:
    """Fixed one-minute window per key; over the limit answers PostHog's 429 with Retry-After (§2.7)."""
    limit = request.app.state.settings.rate_limit_per_minute
    now = time.time()
    window = int(now // 60)
    used = request.app.state.registry.count_request(key.value_hash, window)
    if used > limit:
        wait = max(1, int((window + 1) * 60 - now))
        raise ApiError(429, "throttled_error", "throttled",
                       f"Request was throttled. Expected available in {wait} seconds.",
                       headers={"Retry-After": str(wait)})


def authenticate(request: Request, registry: Registry, body: dict[str, Any] | None = None) -> ApiKey:
    found = _key_from_request(request, body)
    if found is None:
        raise ApiError(403, "authentication_error", "not_authenticated",
                       "Authentication credentials were not provided.")
    value, source = found
    key = registry.find_key(value)
    if key is None:
        raise ApiError(401, "authentication_error", "authentication_failed",
                       f"Personal API key found in request {source} is invalid.",
                       headers={"WWW-Authenticate": "Bearer"})
    throttle(request, key)
    return key


def authorize(key: ApiKey, registry: Registry, project_id: str, scope: str) -> Project:
    """The key must carry `scope` and be allowed on the project; the project must exist."""
    if not key.allows(scope):
        raise ApiError(403, "authentication_error", "permission_denied", f"API key missing required scope '{scope}'")
    try:
        pid = int(project_id)
    except ValueError:
        if project_id == "@current" and len(key.projects) == 1:
            pid = key.projects[0]
        else:
            raise not_found("Project not found.") from None
    if key.projects and pid not in key.projects:
        raise ApiError(403, "authentication_error", "permission_denied",
                       f"API key does not have access to the requested project: ID {pid}.")
    project = registry.get_project(pid)
    if project is None:
        raise not_found("Project not found.")
    return project
