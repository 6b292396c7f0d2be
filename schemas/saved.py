"""Saved insights and insight views, stored per project in Redis (spec §12, §14)."""

from __future__ import annotations

import hashlib
import secrets
import string
import time
from typing import Any

import orjson
import redis

from schemas import keys

WRITABLE = ("name", "derived_name", "filters", "query", "order", "deleted", "dashboards", "description", "tags",
            "favorited", "saved")
MATERIAL = ("name", "description", "filters", "query")
_ALPHABET = string.ascii_letters + string.digits


class InsightError(ValueError):
    def __init__(self, detail: str, attr: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.attr = detail, attr


def tagify(tags: Any) -> list[str]:
    if not isinstance(tags, list):
        raise InsightError("tags must be a list of strings", "tags")
    return list(dict.fromkeys(str(t).strip().lower() for t in tags if str(t).strip()))


def validate(fields: dict[str, Any]) -> dict[str, Any]:
    """Only the writable fields, each checked as PostHog's serializer does."""
    out = {k: v for k, v in fields.items() if k in WRITABLE}
    for name in ("name", "derived_name", "description"):
        value = out.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 400):
            raise InsightError("Ensure this field has no more than 400 characters and is a string.", name)
    if "filters" in out and not isinstance(out["filters"], dict):
        raise InsightError("filters must be a JSON object", "filters")
    if "query" in out and out["query"] is not None and not isinstance(out["query"], dict):
        raise InsightError("query must be a JSON object", "query")
    if "order" in out and out["order"] is not None and not isinstance(out["order"], int):
        raise InsightError("A valid integer is required.", "order")
    for flag in ("deleted", "favorited", "saved"):
        if flag in out and not isinstance(out[flag], bool):
            raise InsightError("Must be a valid boolean.", flag)
    if "tags" in out:
        out["tags"] = tagify(out["tags"])
    if "dashboards" in out:
        dashboards = out["dashboards"]
        if not isinstance(dashboards, list):
            raise InsightError("dashboards must be a list of dashboard ids", "dashboards")
        if dashboards:
            raise InsightError("Dashboard not found", "dashboards")
    return out


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1_000_000:06d}Z"


class InsightStore:
    def __init__(self, client: redis.Redis, project_id: int) -> None:
        self.redis, self.project_id = client, project_id
        self._hash, self._seq, self._short = keys.saved_insights(project_id)

    def _views(self, owner: str) -> str:
        return keys.insight_views(self.project_id, owner)

    def create(self, fields: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
        data = validate(fields)
        insight_id = int(self.redis.incr(self._seq))
        while True:
            short_id = "".join(secrets.choice(_ALPHABET) for _ in range(8))
            if self.redis.hsetnx(self._short, short_id, insight_id):
                break
        now = iso_now()
        insight = {
            "id": insight_id, "short_id": short_id, "name": None, "derived_name": None, "filters": {}, "query": None,
            "order": None, "deleted": False, "dashboards": [], "dashboard_tiles": [], "description": None,
            "tags": [], "favorited": False, "saved": True, "created_at": now, "created_by": owner,
            "updated_at": now, "last_modified_at": now, "last_modified_by": owner, "is_sample": False,
            **data,
        }
        self._write(insight)
        self.viewed(owner["distinct_id"], [insight_id])
        return insight

    def _write(self, insight: dict[str, Any]) -> None:
        self.redis.hset(self._hash, str(insight["id"]), orjson.dumps(insight))

    def get(self, insight_id: int) -> dict[str, Any] | None:
        raw = self.redis.hget(self._hash, str(insight_id))
        return orjson.loads(raw) if raw else None

    def by_short_id(self, short_id: str) -> dict[str, Any] | None:
        insight_id = self.redis.hget(self._short, short_id)
        return self.get(int(insight_id)) if insight_id else None

    def update(self, insight_id: int, fields: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any] | None:
        insight = self.get(insight_id)
        if insight is None:
            return None
        data = validate(fields)
        now = iso_now()
        if any(k in data and data[k] != insight.get(k) for k in MATERIAL):
            insight["last_modified_at"], insight["last_modified_by"] = now, owner
        insight.update(data)
        insight["updated_at"], insight["is_sample"] = now, False
        self._write(insight)
        return insight

    def all(self) -> list[dict[str, Any]]:
        return sorted((orjson.loads(v) for v in self.redis.hvals(self._hash)), key=lambda i: i["id"])

    def viewed(self, owner: str, insight_ids: list[int]) -> None:
        if insight_ids:
            now = time.time()
            self.redis.zadd(self._views(owner), {str(i): now for i in insight_ids})

    def last_viewed(self, owner: str, limit: int = 5) -> list[tuple[dict[str, Any], float]]:
        out = []
        for member, score in self.redis.zrevrange(self._views(owner), 0, -1, withscores=True):
            insight = self.get(int(member))
            if insight is not None and not insight["deleted"]:
                out.append((insight, score))
                if len(out) == limit:
                    break
        return out


def owner_of(key_hash: str, label: str = "") -> dict[str, Any]:
    """The API key's owner as PostHog's basic user object (keys are the only principals here)."""
    digest = hashlib.sha256(key_hash.encode()).hexdigest()
    return {"id": int(digest[:8], 16), "uuid": f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-"
            f"{digest[20:32]}", "distinct_id": digest[:16], "first_name": label, "last_name": "", "email": "",
            "is_email_verified": False, "hedgehog_config": None, "role_at_organization": None}


LEVELS = ("none", "viewer", "editor", "manager")
DEFAULT_LEVEL = "editor"


class AccessControls:
    """Per-insight access entries (§13): a default entry, and entries per member (key owner) or role."""

    def __init__(self, client: redis.Redis, project_id: int, insight_id: int) -> None:
        self.redis = client
        self.key = keys.insight_access(project_id, insight_id)
        self.insight_id = insight_id

    def entries(self) -> list[dict[str, Any]]:
        return [orjson.loads(v) for _, v in sorted(self.redis.hgetall(self.key).items())]

    def put(self, level: str | None, member: str | None, role: str | None, by: dict[str, Any]) -> dict[str, Any] | None:
        if member and role:
            raise InsightError("You can not scope an access control to both a member and a role.")
        if level is not None and level not in LEVELS:
            raise InsightError(f"Invalid access level. Must be one of: {', '.join(LEVELS)}", "access_level")
        field = f"member:{member}" if member else f"role:{role}" if role else "default"
        if level is None:
            self.redis.hdel(self.key, field)
            return None
        now = iso_now()
        previous = self.redis.hget(self.key, field)
        entry = {"access_level": level, "resource": "insight", "resource_id": str(self.insight_id),
                 "organization_member": member, "role": role, "created_by": by,
                 "created_at": orjson.loads(previous)["created_at"] if previous else now, "updated_at": now}
        self.redis.hset(self.key, field, orjson.dumps(entry))
        return entry

    def level_for(self, member: str) -> str:
        raw = self.redis.hmget(self.key, [f"member:{member}", "default"])
        for value in raw:
            if value:
                return str(orjson.loads(value)["access_level"])
        return DEFAULT_LEVEL
