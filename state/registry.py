"""Projects, personal API keys and registered definitions as stored in Redis, for the API, the CLI
and the dataflow."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict
from typing import Any

import orjson
import redis

from schemas.dates import DateParseError, zone
from schemas.projects import VALID_SCOPES, ApiKey, Project, RegistryError, hash_key
from state import keys, scripts
from state.connection import ShardedStore, mget, pipeline, run_scripts


class Registry:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    # --- projects -------------------------------------------------------------------------
    def get_project(self, project_id: int) -> Project | None:
        raw = self.redis.hget(keys.PROJECTS, str(project_id))
        return Project.from_json(raw) if raw else None

    def projects(self) -> dict[int, Project]:
        return {int(k): Project.from_json(v) for k, v in self.redis.hgetall(keys.PROJECTS).items()}

    def tokens(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(keys.TOKENS).items()}

    def project_for_token(self, token: str) -> Project | None:
        project_id = self.redis.hget(keys.TOKENS, token)
        return self.get_project(int(project_id)) if project_id else None

    def save_project(self, project_id: int, *, name: str | None = None, token: str | None = None,
                     timezone: str | None = None, week_start_day: int | None = None,
                     test_account_filters: list[dict[str, Any]] | None = None,
                     path_cleaning_filters: list[dict[str, Any]] | None = None) -> Project:
        """Create or update a project; unspecified fields keep their value (or the default)."""
        if project_id <= 0:
            raise RegistryError("project id must be a positive integer")
        existing = self.get_project(project_id)
        if timezone is not None:
            try:
                zone(timezone)
            except DateParseError as exc:
                raise RegistryError(str(exc)) from exc
        if week_start_day is not None and week_start_day not in (0, 1):
            raise RegistryError("week start must be 0 (Sunday) or 1 (Monday)")
        if test_account_filters is not None and not isinstance(test_account_filters, list):
            raise RegistryError("test account filters must be a JSON list of property filters")
        new_token = token or (existing.token if existing else "phc_" + secrets.token_urlsafe(24))
        owner = self.redis.hget(keys.TOKENS, new_token)
        if owner is not None and int(owner) != project_id:
            raise RegistryError(f"token already belongs to project {int(owner)}")
        project = Project(
            id=project_id,
            name=name if name is not None else (existing.name if existing else f"Project {project_id}"),
            token=new_token,
            timezone=timezone or (existing.timezone if existing else "UTC"),
            week_start_day=week_start_day if week_start_day is not None else
            (existing.week_start_day if existing else 0),
            test_account_filters=test_account_filters if test_account_filters is not None else
            (existing.test_account_filters if existing else []),
            path_cleaning_filters=path_cleaning_filters if path_cleaning_filters is not None else
            (existing.path_cleaning_filters if existing else []),
        )
        pipe = pipeline(self.redis)
        if existing and existing.token != new_token:
            pipe.hdel(keys.TOKENS, existing.token)
        pipe.hset(keys.PROJECTS, str(project_id), project.to_json())
        pipe.hset(keys.TOKENS, new_token, project_id)
        pipe.execute()
        return project

    # --- personal API keys ----------------------------------------------------------------
    def create_key(self, projects: list[int], scopes: list[str], value: str | None = None,
                   label: str = "") -> tuple[str, ApiKey]:
        unknown = [s for s in scopes if s not in VALID_SCOPES]
        if unknown or not scopes:
            raise RegistryError(f"unknown scope(s): {', '.join(unknown) or '(none given)'}; "
                                f"valid: {', '.join(sorted(VALID_SCOPES))}")
        for project_id in projects:
            if self.get_project(project_id) is None:
                raise RegistryError(f"project {project_id} does not exist")
        value = value or "phx_" + secrets.token_urlsafe(32)
        if value.startswith("pha_"):
            raise RegistryError("keys starting with pha_ are OAuth tokens, not personal API keys")
        key = ApiKey(hash_key(value), projects, scopes, label)
        self.redis.hset(keys.API_KEYS, key.value_hash, orjson.dumps(asdict(key)))
        return value, key

    def find_key(self, value: str) -> ApiKey | None:
        raw = self.redis.hget(keys.API_KEYS, hash_key(value))
        return ApiKey(**orjson.loads(raw)) if raw else None

    def count_request(self, key_hash: str, window: int) -> int:
        """Count one request of a key in a minute window; the requests so far in it (rate limit)."""
        counter = keys.throttle(key_hash, window)
        pipe = pipeline(self.redis)
        pipe.incr(counter)
        pipe.expire(counter, 120)
        return int(pipe.execute()[0])


class ProjectCache:
    """Projects by id and token for the hot path; refreshed at most every `ttl` seconds."""

    def __init__(self, registry: Registry, ttl: float = 2.0) -> None:
        self.registry = registry
        self.ttl = ttl
        self._by_id: dict[int, Project] = {}
        self._by_token: dict[str, int] = {}
        self._loaded = 0.0

    def _refresh(self) -> None:
        if time.monotonic() - self._loaded > self.ttl:
            try:
                self._by_id = self.registry.projects()
            except redis.ConnectionError:
                if not self._loaded:
                    raise
                return  # Redis is away: projects seldom change, so the last copy keeps capture going
            self._by_token = {p.token: p.id for p in self._by_id.values()}
            self._loaded = time.monotonic()

    def by_id(self, project_id: int) -> Project | None:
        self._refresh()
        project = self._by_id.get(project_id)
        if project is None:  # created since the last refresh: ask Redis directly
            project = self.registry.get_project(project_id)
            if project is not None:
                self._by_id[project.id], self._by_token[project.token] = project, project.id
        return project

    def by_token(self, token: str) -> Project | None:
        self._refresh()
        project_id = self._by_token.get(token)
        if project_id is not None:
            return self._by_id.get(project_id)
        project = self.registry.project_for_token(token)
        if project is not None:
            self._by_id[project.id], self._by_token[project.token] = project, project.id
        return project


class DefinitionRegistry(ShardedStore):
    """Registered insight definitions and the state of their backfills.

    Per definition (hash h) in the project's home: `defs` (h -> definition JSON), the definition's
    meta and finished partitions; per state shard: its backfill bounds and fences (state/keys.py).
    `keys.BACKFILLS` lists definitions still building.
    """

    PENDING = keys.BACKFILLS

    def __init__(self, client: redis.Redis, shards: int | None = None) -> None:
        self.redis = client
        self._shards = shards
        self._fix_bound = client.register_script(scripts.FIX_BOUND.source)

    _d = staticmethod(keys.definition_prefix)
    defs_key = staticmethod(keys.definitions)

    def register(self, definition: Any) -> bool:
        """Idempotent; True when this call registered it (and queued its backfill)."""
        h = definition.hash
        if not self.redis.hsetnx(self.defs_key(definition.project_id), h, definition.to_json()):
            return False
        pipe = pipeline(self.redis)
        summaries = int(definition.summaries)
        # kept: "log": its kept events go to the persons' kept logs only (state/summaries.py reads no
        # string kept per definition beside them, as it must for definitions older than the logs).
        pipe.hset(keys.definition_meta(self._d(definition.project_id, h)), mapping={
            "status": "backfilling", "registered_at": int(time.time() * 1000), "summaries": summaries,
            "kept": "log"})
        pipe.incr(keys.definitions_generation(definition.project_id))
        pipe.sadd(self.PENDING, f"{definition.project_id}:{h}")
        if summaries:
            pipe.sadd(keys.SUMMARISED, f"{definition.project_id}:{h}")
        pipe.execute()
        return True

    def generations(self, project_ids: list[int]) -> dict[int, int]:
        values = mget(self.redis, [keys.definitions_generation(p) for p in project_ids])
        return {p: int(v or 0) for p, v in zip(project_ids, values, strict=True)}

    def for_project(self, project_id: int) -> dict[str, bytes]:
        """The definitions the dataflow keeps up to date (failed ones are left out)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.defs_key(project_id))
        pipe.hkeys(keys.failed_definitions(project_id))
        found, failed = pipe.execute()
        gone = {h.decode() for h in failed}
        return {k.decode(): v for k, v in found.items() if k.decode() not in gone}

    def fail(self, project_id: int, h: str, reason: str) -> bool:
        """Stop keeping a definition whose state cannot be kept, and remember why: its requests answer
        the reason instead of a number, and ingestion goes on without it. True if newly failed."""
        d = self._d(project_id, h)
        pipe = pipeline(self.redis)
        pipe.hsetnx(keys.failed_definitions(project_id), h, reason[:2000])
        pipe.hset(keys.definition_meta(d), mapping={"status": "failed", "reason": reason[:2000]})
        pipe.srem(self.PENDING, f"{project_id}:{h}")
        pipe.srem(keys.SUMMARISED, f"{project_id}:{h}")
        pipe.incr(keys.definitions_generation(project_id))  # live sinks re-plan without it
        newly = bool(pipe.execute()[0])
        return newly

    def failure(self, project_id: int, h: str) -> str | None:
        raw = self.redis.hget(keys.failed_definitions(project_id), h)
        return raw.decode() if raw is not None else None

    def get(self, project_id: int, h: str) -> bytes | None:
        return self.redis.hget(self.defs_key(project_id), h)

    def pending(self) -> list[tuple[int, str]]:
        out = []
        for member in sorted(self.redis.smembers(self.PENDING)):
            project_id, _, h = member.decode().partition(":")
            out.append((int(project_id), h))
        return out

    def _in_shards(self, key: str) -> list[str]:
        return keys.in_shards(key, self.shards)

    def fence(self, project_id: int, h: str, name: str) -> int:
        """The last offset of the topic partition `name` (`tag:partition`) every state shard has taken
        the backfill through."""
        pipe = self.redis.pipeline(transaction=False)
        for key in self._in_shards(keys.backfill_fence(self._d(project_id, h))):
            pipe.hget(key, name)
        return min(int(raw) if raw is not None else -1 for raw in pipe.execute())

    def applied_fences(self, project_id: int) -> set[str]:
        """Every topic partition (`tag:partition`) the project's state holds events of, from the
        current topic and from topics since recreated."""
        pipe = self.redis.pipeline(transaction=False)
        for s in range(self.shards):
            pipe.hkeys(keys.shard_applied(project_id, s))
        return {field.decode() for fields in pipe.execute() for field in fields}

    def bounds(self, project_id: int, h: str, name: str) -> list[int]:
        """Where the backfill of topic partition `name` (`tag:partition`) stops in each state shard,
        fixed the first time it is asked (fix_bound.lua): what the shard had applied then. Everything
        below was applied without the definition; everything from there on is applied live with it."""
        generation = int(self.redis.get(keys.definitions_generation(project_id)) or 0)
        calls = [([keys.shard_applied(project_id, s)], [keys.shard_prefix(project_id, s), h, name, generation])
                 for s in range(self.shards)]
        return [int(b) for b in run_scripts(self.redis, self._fix_bound, calls)]

    def done(self, project_id: int, h: str) -> set[str]:
        """Topic partitions (`tag:partition`) whose backfill is finished."""
        return {m.decode() for m in self.redis.smembers(keys.backfill_done(self._d(project_id, h)))}

    def partition_done(self, project_id: int, h: str, name: str, names: int) -> bool:
        """Mark a topic partition finished; when all `names` are, the definition is ready (or, when it
        keeps attempt summaries, summarising until the persons the backfill marked are summarised).
        True if so."""
        d = self._d(project_id, h)
        self.redis.sadd(keys.backfill_done(d), name)
        if self.redis.hget(keys.definition_meta(d), "status") == b"failed":
            return False
        if self.redis.scard(keys.backfill_done(d)) >= names:
            summaries = self.redis.hget(keys.definition_meta(d), "summaries") == b"1"
            dirty = sum(self.redis.scard(k) for k in self._in_shards(keys.summary_dirty(d))) if summaries else 0
            pipe = pipeline(self.redis)
            if summaries:
                pipe.hset(keys.definition_meta(d), mapping={"status": "summarising", "to_summarise": max(1, dirty)})
            else:
                pipe.hset(keys.definition_meta(d), "status", "ready")
            pipe.srem(self.PENDING, f"{project_id}:{h}")
            pipe.execute()
            return True
        return False

    def summarised(self) -> list[tuple[int, str]]:
        """Definitions that keep attempt summaries, for the summariser."""
        return [(int(p), h) for p, _, h in (m.decode().partition(":") for m in self.redis.smembers(keys.SUMMARISED))]

    def summaries_built(self, project_id: int, h: str) -> bool:
        """The backfill's persons are summarised: a summarising definition becomes ready (True if it
        was summarising)."""
        d = self._d(project_id, h)
        if self.redis.hget(keys.definition_meta(d), "status") == b"summarising":
            self.redis.hset(keys.definition_meta(d), "status", "ready")
            return True
        return False

    def status(self, project_id: int, h: str) -> tuple[str | None, float]:
        """(status, progress 0..1) of a definition; status None when never registered."""
        d = self._d(project_id, h)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.definition_meta(d), "status")
        pipe.hmget(keys.definition_meta(d), "to_summarise", "summaries")
        for s in range(self.shards):
            pipe.hgetall(keys.in_shard(keys.backfill_bound(d), s))
            pipe.hgetall(keys.in_shard(keys.backfill_fence(d), s))
            pipe.scard(keys.in_shard(keys.summary_dirty(d), s))
        status, (to_summarise, summaries), *per_shard = pipe.execute()
        if status is None:
            return None, 0.0
        if status == b"ready":
            return "ready", 1.0
        dirty = sum(per_shard[2::3])
        if status == b"summarising":
            return "summarising", 0.9 + 0.1 * max(0.0, 1 - dirty / max(1, int(to_summarise or 1)))
        total = done = 0
        for bounds, fences in zip(per_shard[0::3], per_shard[1::3], strict=True):
            total += sum(int(v) for v in bounds.values())
            done += sum(min(int(fences.get(k, -1)) + 1, int(v)) for k, v in bounds.items())
        share = 0.9 if summaries == b"1" else 1.0  # the last tenth is the summariser's
        return status.decode(), share * (done / total if total else 0.0)
