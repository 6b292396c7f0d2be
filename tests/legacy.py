"""State as an older version wrote it, for the tests of what today's code does when it meets it."""

from __future__ import annotations

import orjson
import redis

from schemas.funnels import parse_funnel_request
from state import keys
from state.registry import DefinitionRegistry


def funnel_definition(project_id: int, steps: int) -> tuple[str, bytes]:
    """(hash, stored JSON) of a funnel definition from before funnels were limited to 32 steps."""
    two = parse_funnel_request({"events": [{"id": "s0", "order": 0}, {"id": "s1", "order": 1}]},
                               project_id, "UTC", []).definition
    body = orjson.loads(two.to_json())
    body["raw"]["steps"] = [[f"s{i}", [], body["raw"]["steps"][0][2]] for i in range(steps)]
    body["steps"] = [[f"s{i}", [], body["steps"][0][2]] for i in range(steps)]
    return f"{steps:016x}", orjson.dumps(body)


def register(client: redis.Redis, project_id: int, h: str, stored: bytes) -> None:
    """Register a stored definition the way registration does, without today's validation."""
    prefix = keys.definition_prefix(project_id, h)
    client.hset(keys.definitions(project_id), h, stored)
    client.hset(keys.definition_meta(prefix), mapping={"status": "backfilling", "registered_at": 0, "summaries": 1})
    client.sadd(DefinitionRegistry.PENDING, f"{project_id}:{h}")
    client.sadd(keys.SUMMARISED, f"{project_id}:{h}")
    client.incr(keys.definitions_generation(project_id))
