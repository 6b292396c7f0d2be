"""Connecting to Redis, one server or a Redis Cluster, and the few calls whose form differs.

`INSIGHTFLOW_REDIS_URL` names either one server (`redis://host:port/db`) or a cluster
(`redis+cluster://host:port`, any of its masters). Every key of one project shard carries one hash
tag (state/keys.py), so scripts and multi-key calls stay within one slot; what spans slots (keys of
several projects, global keys with a project's) goes through the helpers here.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from state import keys

Client = redis.Redis | RedisCluster

CLUSTER_SCHEME = "redis+cluster://"


def connect(url: str) -> Client:
    """A client for the URL: a cluster client for `redis+cluster://`, else a plain one."""
    if url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url("redis://" + url.removeprefix(CLUSTER_SCHEME))
    return redis.Redis.from_url(url)


def is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


def pipeline(client: Client, atomic: bool = True) -> Any:
    """A pipeline; `atomic` (MULTI/EXEC) on one server. A cluster cannot run one transaction over
    keys of several slots, so there the commands are sent together but each stands alone: a process
    stopped between two can leave the group half-applied (the registry's writes that mix global keys
    with a project's; everything that counts events runs in scripts within one slot)."""
    return client.pipeline(transaction=atomic and not is_cluster(client))


def mget(client: Client, names: Sequence[str]) -> list[Any]:
    """Values of keys that may sit in different slots."""
    if not names:
        return []
    if is_cluster(client):
        return client.mget_nonatomic(list(names))
    return client.mget(list(names))


def run_scripts(client: Client, script: Script, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
    """Answers of `script` for each (keys, args), in order, in one round trip per server: a cluster
    client cannot pipeline scripts, so calls are grouped by the node that owns their first key and
    pipelined on a plain connection to it."""
    if not calls:
        return []
    if not is_cluster(client):
        return _evalsha(client, script, calls)
    by_node: dict[str, list[int]] = defaultdict(list)
    nodes = {}
    for i, (names, _) in enumerate(calls):
        node = client.get_node_from_key(names[0])
        by_node[node.name].append(i)
        nodes[node.name] = node
    answers: list[Any] = [None] * len(calls)
    for name, indexes in by_node.items():
        sent = [calls[i] for i in indexes]
        for i, answer in zip(indexes, _evalsha(client.get_redis_connection(nodes[name]), script, sent), strict=True):
            answers[i] = answer
    return answers


def _evalsha(server: redis.Redis, script: Script, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
    """`EVALSHA` of each call, pipelined; the script is loaded only when the server says it lacks it
    (after a restart), and the calls it refused are sent again. A pipeline of redis-py's scripts asks
    `SCRIPT EXISTS` first, a round trip before every pipeline that waits behind the scripts running in
    Redis. Any other error is raised, as a pipeline raises it."""
    answers = _pipelined(server, script, calls)
    missing = [i for i, answer in enumerate(answers) if isinstance(answer, redis.exceptions.NoScriptError)]
    if missing:
        server.script_load(script.script)
        for i, answer in zip(missing, _pipelined(server, script, [calls[i] for i in missing]), strict=True):
            answers[i] = answer
    for answer in answers:
        if isinstance(answer, redis.exceptions.RedisError):
            raise answer
    return answers


def _pipelined(server: redis.Redis, script: Script, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
    pipe = server.pipeline(transaction=False)
    for names, args in calls:
        pipe.execute_command("EVALSHA", script.sha, len(names), *names, *args)
    return pipe.execute(raise_on_error=False)


class LayoutMismatch(RuntimeError):
    """The state was written with another number of state shards than configured."""


_claimed: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # client -> state shards, once recorded


def state_shards(client: Client) -> int:
    """State shards per project, as the stored state is written with (1 until the dataflow records
    its number). Once recorded it never changes, so it is read once per client."""
    known = _claimed.get(client)
    if known is not None:
        return known
    raw = client.hget(keys.LAYOUT_KEY, "shards")
    if raw is None:
        return 1
    _claimed[client] = int(raw)
    return int(raw)


class ShardedStore:
    """Base of the stores that read or write a project's state shards: the number given, or the one
    recorded in Redis."""

    redis: Client
    _shards: int | None = None

    @property
    def shards(self) -> int:
        return self._shards or state_shards(self.redis)


def claim_state_shards(client: Client, shards: int) -> int:
    """Fix the number of state shards when the state is first written; afterwards, refuse another
    number (the state would be read in the wrong places: rebuild it into a fresh Redis instead). State
    written before the number was recorded was written with one."""
    if shards < 1:
        raise LayoutMismatch(f"state shards must be at least 1 (got {shards})")
    if client.hget(keys.LAYOUT_KEY, "shards") is None and shards != 1:
        written = [int(p) for p in client.hkeys(keys.PROJECTS) if client.hlen(keys.project_applied(int(p)))]
        if written:
            client.hsetnx(keys.LAYOUT_KEY, "shards", 1)
    client.hsetnx(keys.LAYOUT_KEY, "shards", shards)
    stored = int(client.hget(keys.LAYOUT_KEY, "shards") or 1)
    if stored != shards:
        raise LayoutMismatch(f"this Redis keeps each project's state in {stored} state shard(s), but "
                             f"INSIGHTFLOW_STATE_SHARDS is {shards}: set it back to {stored}, or start on an "
                             f"empty Redis and replay the history into it")
    return stored
