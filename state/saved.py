"""Saved insights, their views and access entries as stored per project in Redis (spec §12, §13, §14)."""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson
import redis

from schemas.saved import DEFAULT_LEVEL, LEVELS, MATERIAL, SHORT_ID_ALPHABET, InsightError, iso_now, validate
from state import keys


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
            short_id = "".join(secrets.choice(SHORT_ID_ALPHABET) for _ in range(8))
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
