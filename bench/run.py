"""Benchmarks, separate from the tests: `make bench ARGS="--events 1000000"`.

Everything is measured in one run on one machine and reported as ratios (these machines are noisy):

- dataflow throughput: a backlog of synthetic events on the topic, read and applied to Redis
  (events/s), against a raw confluent-kafka consumer reading the same backlog;
- capture -> queryable latency (p50, p99) under background capture load;
- trend query latency (30-day daily total and DAU, through HTTP and in-process) against chdb
  (embedded ClickHouse, PostHog's engine) answering the same question on the same events.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.trends import parse_trends_request
from serving import stack
from serving.trends import TrendQuery
from state.connection import connect
from state.registry import DefinitionRegistry, Registry
from state.stream import Stream
from state.topics import ensure_topics

PROJECT = 1
EVENTS = ("$pageview", "$pageview", "$pageview", "click", "signed up", "purchase")
BROWSERS = ("Chrome", "Firefox", "Safari", "Edge")
URLS = tuple(f"https://shop.example/{p}" for p in ("", "docs", "pricing", "signup", "blog", "cart", "checkout"))
END = datetime(2024, 6, 30, tzinfo=UTC)


def synthetic(n: int, persons: int, days: int = 30, seed: int = 1, merged: float = 0.0) -> list[dict[str, Any]]:
    """`n` events of `persons` persons over `days` days, in random time order (a replay of history).
    `merged`: that share of the persons starts anonymous (`anon-p<i>`) and signs up at a random moment
    with posthog-python's `alias(previous_id=anon, distinct_id=user)` (a `$create_alias` event): their
    events before it carry the anonymous id."""
    rng = random.Random(seed)
    start = END - timedelta(days=days)
    span = days * 86400
    every = round(1 / merged) if merged else 0
    signed_up = {p: start + timedelta(seconds=rng.randrange(span)) for p in range(0, persons, every)} if every else {}
    out = []
    for i in range(n):
        ts = start + timedelta(seconds=rng.randrange(span))
        event_uuid, name, person = str(uuid.UUID(int=rng.getrandbits(128), version=4)), rng.choice(EVENTS), \
            rng.randrange(persons)  # drawn in this order, so `merged=0` gives the same events as before
        alias_at = signed_up.get(person)
        did = f"anon-p{person}" if alias_at is not None and ts < alias_at else f"p{person}"
        out.append({"uuid": event_uuid, "event": name, "distinct_id": did, "project_id": PROJECT,
                    "timestamp": ts.isoformat().replace("+00:00", "Z"),
                    "properties": {"$browser": rng.choice(BROWSERS), "amount": rng.randrange(1, 500), "i": i,
                                   "$current_url": rng.choice(URLS)}})
    for person, ts in signed_up.items():
        out.insert(rng.randrange(len(out) + 1), {
            "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "event": "$create_alias",
            "distinct_id": f"anon-p{person}", "project_id": PROJECT, "timestamp": ts.isoformat().replace("+00:00", "Z"),
            "properties": {"distinct_id": f"anon-p{person}", "alias": f"p{person}"}})
    return out


def backlog_arguments(parser: argparse.ArgumentParser, events: int, persons: int) -> None:
    """The synthetic backlog every benchmark takes: its size, its persons, the topic's partitions."""
    parser.add_argument("--events", type=int, default=events)
    parser.add_argument("--persons", type=int, default=persons)
    parser.add_argument("--partitions", type=int, default=4)


def bench_project(client: redis.Redis, bootstrap: str, partitions: int, topic: str = "events") -> tuple[Any, str]:
    """The benchmarks' project (token `phc_bench`), a personal API key to read it, and the topic with its
    dead-letter topic: (project, key)."""
    registry = Registry(client)
    project = registry.save_project(PROJECT, token="phc_bench")
    key, _ = registry.create_key([PROJECT], ["insight:read"], "phx_bench")
    ensure_topics(bootstrap, [topic, f"{topic}_dlq"], partitions)
    return project, key


def produce(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 100, "batch.num.messages": 10_000,
                         "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000})
    started = time.perf_counter()
    for event in events:
        value = orjson.dumps(event)
        while True:
            try:
                producer.produce(topic, key=f"{PROJECT}:{event['distinct_id']}".encode(), value=value)
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(120)
    return time.perf_counter() - started


def raw_consume(bootstrap: str, topic: str, partitions: int, total: int) -> float:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-raw", "enable.auto.commit": False,
                         "queued.min.messages": 1_000_000})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    seen = 0
    started = time.perf_counter()
    while seen < total and time.perf_counter() - started < 300:
        for message in consumer.consume(10_000, timeout=0.5):
            if not message.error():
                orjson.loads(message.value())
                seen += 1
    consumer.close()
    return time.perf_counter() - started


def applied(client: redis.Redis, topic: str) -> int:
    return sum(Stream(client, topic).progress().applied.values())


@dataclass
class Backlog:
    """A fresh Redis and broker with the backlog applied by one dataflow (processes left running)."""

    events_per_s: int
    procs: list[stack.Managed]  # dataflow, broker, Redis
    env: dict[str, str]
    client: redis.Redis
    key: str


def ingest_backlog(workdir: Path, events: list[dict[str, Any]], partitions: int,
                   extra_env: dict[str, str] | None = None) -> Backlog:
    """Produce the backlog, then run the dataflow over it: the rate it applied events at."""
    logs = workdir / "logs"
    redis_proc, redis_url = stack.start_redis(workdir / "redis", logs)
    broker, bootstrap = stack.start_tansu(logs)
    procs: list[stack.Managed] = [broker, redis_proc]
    env = {"INSIGHTFLOW_REDIS_URL": redis_url, "INSIGHTFLOW_KAFKA_BOOTSTRAP": bootstrap, "INSIGHTFLOW_TOPIC": "events",
           "INSIGHTFLOW_TEST_CLOCK": "1", **(extra_env or {})}
    try:
        client = connect(redis_url)
        _, key = bench_project(client, bootstrap, partitions)
        produce(bootstrap, "events", events)
        dataflow = stack.start_dataflow(workdir / "recovery", logs, env)
        procs.insert(0, dataflow)
        while applied(client, "events") == 0:
            time.sleep(0.01)
        started, first = time.perf_counter(), applied(client, "events")
        while applied(client, "events") < len(events):
            if not dataflow.alive():
                raise RuntimeError(f"dataflow died; see {dataflow.log_path}")
            time.sleep(0.05)
    except BaseException:
        for managed in procs:
            managed.stop()
        raise
    rate = round((len(events) - first) / (time.perf_counter() - started))
    return Backlog(rate, procs, env, client, key)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median_ms(fn: Any, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def chdb_session(events: list[dict[str, Any]], workdir: Path) -> Any:
    from chdb import session

    path = workdir / "events.ndjson"
    with path.open("wb") as out:
        for e in events:
            # Persons as PostHog counts them once merges are applied (overrides): an anonymous id's
            # person is the user it was aliased to.
            person = e["distinct_id"].removeprefix("anon-")
            out.write(orjson.dumps({"uuid": e["uuid"], "event": e["event"], "distinct_id": e["distinct_id"],
                                    "person_id": person, "timestamp": e["timestamp"][:-1],
                                    "properties": orjson.dumps(e["properties"]).decode()}) + b"\n")
    sess = session.Session(str(workdir / "chdb"))
    sess.query("CREATE TABLE events (uuid UUID, event String, distinct_id String, person_id String, "
               "timestamp DateTime64(6, 'UTC'), properties String) ENGINE = MergeTree "
               "ORDER BY (event, toDate(timestamp), distinct_id)")
    sess.query(f"INSERT INTO events SELECT * FROM file('{path}', JSONEachRow)")
    # Its parts merged now, not in the background while Insightflow's side is timed on the same cores
    # (and chdb then answers from the steady state a ClickHouse server keeps).
    sess.query("OPTIMIZE TABLE events FINAL")
    return sess


FUNNEL_STEPS = ["$pageview", "signed up", "purchase"]


def bench_retention_paths(http: httpx.Client, url: str, headers: dict[str, str], chdb: Any) -> dict[str, Any]:
    """Weekly recurring retention over 8 weeks and 5-step $pageview paths, against chdb."""
    return {**bench_retention(http, url, headers, chdb), **bench_paths(http, url, headers, chdb)}


def bench_retention(http: httpx.Client, url: str, headers: dict[str, str], chdb: Any) -> dict[str, Any]:
    """Weekly recurring retention of $pageview over 8 weeks, against chdb."""
    out: dict[str, Any] = {}
    retention_url = url.replace("/trend/", "/retention/")
    query = {"period": "Week", "total_intervals": 8, "date_to": END.date().isoformat()}
    rows = http.post(retention_url, json=query, headers=headers, timeout=600).json()["result"]
    start, end = rows[0]["date"][:10], (END + timedelta(days=1)).date().isoformat()
    weeks = f"""(SELECT DISTINCT person_id, toStartOfWeek(timestamp, 0) AS w FROM events
                WHERE event = '$pageview' AND timestamp >= '{start} 00:00:00' AND timestamp < '{end} 00:00:00')"""
    sql = (f"SELECT c.w, dateDiff('week', c.w, r.w) AS k, count() FROM {weeks} AS c INNER JOIN {weeks} AS r "
           f"ON c.person_id = r.person_id AND r.w >= c.w GROUP BY c.w, k ORDER BY c.w, k")
    theirs: dict[tuple[str, int], int] = {}
    for line in str(chdb.query(sql, "CSV")).strip().splitlines():
        w, k, c = line.replace('"', "").split(",")
        theirs[(w, int(k))] = int(c)
    ours = {(r["date"][:10], k): v["count"] for r in rows for k, v in enumerate(r["values"]) if v["count"]}
    http_ms = median_ms(lambda: http.post(retention_url, json=query, headers=headers).raise_for_status(), 10)
    chdb_ms = median_ms(lambda: chdb.query(sql, "CSV"), 5)
    out["query_weekly_retention_8w"] = {"insightflow_http_ms": round(http_ms, 2), "chdb_ms": round(chdb_ms, 2),
                                        "chdb_over_insightflow_http": round(chdb_ms / http_ms, 2),
                                        "same_numbers": ours == theirs}
    return out


def bench_paths(http: httpx.Client, url: str, headers: dict[str, str], chdb: Any,
                client: redis.Redis | None = None) -> dict[str, Any]:
    """5-step $pageview paths over 30 days (and the build of their definition), against chdb. With
    `client`: the first answer is timed (from the event archive while the definition builds, if the
    API has one), then the definition's build, and both answers must be equal."""
    out: dict[str, Any] = {}
    end = (END + timedelta(days=1)).date().isoformat()
    path_url = url.replace("/trend/", "/path/")
    date_from = (END - timedelta(days=30)).date().isoformat()
    paths = {"include_event_types": ["$pageview"], "date_from": date_from, "date_to": END.date().isoformat(),
             "step_limit": 5, "edge_limit": 1000}
    started = time.perf_counter()
    if client is None:
        while http.post(path_url, json={**paths, "refresh": "blocking"}, headers=headers,
                        timeout=600).status_code != 200:
            pass
        out["paths_definition_build_s"] = round(time.perf_counter() - started, 2)
    else:
        while (answer := http.post(path_url, json=paths, headers=headers, timeout=600)).status_code != 200:
            time.sleep(0.05)  # 202 while it builds, unless the event archive answers meanwhile
        out["paths_first_answer_s"] = round(time.perf_counter() - started, 2)
        registry = DefinitionRegistry(client)
        while not all(registry.status(PROJECT, h)[0] == "ready" for h in registry.for_project(PROJECT)):
            time.sleep(0.05)
        out["paths_definition_build_s"] = round(time.perf_counter() - started, 2)
    edges = {(e["source"], e["target"]): e["value"]
             for e in http.post(path_url, json=paths, headers=headers, timeout=600).json()["result"]}
    if client is not None:
        out["paths_first_answer_same"] = edges == {(e["source"], e["target"]): e["value"]
                                                   for e in answer.json()["result"]}
    items = "arrayMap(x -> x.3, s)"
    dedup = f"arrayFilter((x, i) -> i = 1 OR x != {items}[i - 1], {items}, arrayEnumerate({items}))"
    sql = f"""
        SELECT concat(toString(i), '_', a) AS source, concat(toString(i + 1), '_', b) AS target, count()
        FROM (
          SELECT arraySlice({dedup}, 1, 5) AS p FROM (
            SELECT arrayJoin(arraySplit((x, y) -> y, evs, arrayMap((x, i) -> i > 1 AND
                   x.1 - evs[i - 1].1 >= 1800, evs, arrayEnumerate(evs)))) AS s
            FROM (SELECT person_id, arraySort(x -> (x.1, x.2), groupArray((toUnixTimestamp(timestamp), toString(uuid),
                         replaceRegexpOne(JSONExtractString(properties, '$current_url'), '(.)/$', '\\1')))) AS evs
                  FROM events WHERE event = '$pageview' AND timestamp >= '{date_from} 00:00:00'
                  AND timestamp < '{end} 00:00:00' GROUP BY person_id)))
        ARRAY JOIN arrayEnumerate(arrayPopBack(p)) AS i, arrayPopBack(p) AS a, arrayPopFront(p) AS b
        GROUP BY source, target"""
    theirs_edges = {}
    for line in str(chdb.query(sql, "CSV")).strip().splitlines():
        s, t, c = line.replace('"', "").rsplit(",", 2)
        theirs_edges[(s, t)] = int(c)
    http_ms = median_ms(lambda: http.post(path_url, json=paths, headers=headers, timeout=600).raise_for_status(), 3)
    chdb_ms = median_ms(lambda: chdb.query(sql, "CSV"), 3)
    out["query_paths_5_steps_30d"] = {"insightflow_http_ms": round(http_ms, 1), "chdb_ms": round(chdb_ms, 1),
                                      "chdb_over_insightflow_http": round(chdb_ms / http_ms, 3),
                                      "edges": len(edges), "same_numbers": edges == theirs_edges}
    return out


def bench_funnel(http: httpx.Client, url: str, headers: dict[str, str], client: redis.Redis, chdb: Any,
                 date_from: str, date_to: str) -> dict[str, Any]:
    """Build time of a new 3-step funnel over every event, its state per person, and query latency
    against chdb's windowFunnel over the same events (14-day window)."""
    query = {"events": [{"id": e, "order": i} for i, e in enumerate(FUNNEL_STEPS)], "date_from": date_from,
             "date_to": date_to, "funnel_window_interval": 14, "funnel_window_interval_unit": "day"}
    started = time.perf_counter()
    while (answer := http.post(url, json=query, headers=headers, timeout=600)).status_code != 200:
        time.sleep(0.05)  # 202 while it builds, unless the event archive answers meanwhile
    build_s = time.perf_counter() - started  # first answered
    first_answer = [s["count"] for s in answer.json()["result"]]
    registry = DefinitionRegistry(client)
    while not all(registry.status(PROJECT, h)[0] == "ready" for h in registry.for_project(PROJECT)):
        time.sleep(0.05)
    ready_s = time.perf_counter() - started  # its definition built: its summaries answer from now on
    started = time.perf_counter()
    ours = [s["count"] for s in http.post(url, json=query, headers=headers, timeout=600).json()["result"]]
    first_ms = (time.perf_counter() - started) * 1000  # the API process reads the day rows once
    conditions = ", ".join(f"event = '{e}'" for e in FUNNEL_STEPS)
    sql = (f"SELECT level, count() FROM (SELECT person_id, windowFunnel(1209600)(toDateTime(timestamp), "
           f"{conditions}) AS level FROM events WHERE timestamp >= '{date_from} 00:00:00' AND timestamp < "
           f"toDateTime64('{date_to} 00:00:00', 6) + INTERVAL 1 DAY GROUP BY person_id) GROUP BY level")
    levels = {int(a): int(b) for a, b in (line.split(",") for line in str(chdb.query(sql, "CSV")).strip().splitlines())}
    theirs = [sum(c for lvl, c in levels.items() if lvl >= k) for k in range(1, len(FUNNEL_STEPS) + 1)]
    state = {}
    for name, pattern in (("events_per_day", "d:*:fe:*"), ("events_per_person", "pk:*"), ("attempt_rows", "d:*:fa:*")):
        total, cursor = 0, 0
        while True:
            cursor, found = client.scan(cursor, match="{p1}:v1:" + pattern, count=5000)
            pipe = client.pipeline(transaction=False)
            for key in found:
                pipe.memory_usage(key)
            total += sum(v or 0 for v in pipe.execute())
            if cursor == 0:
                break
        state[name] = round(total / max(1, ours[0]))
    http_ms = median_ms(lambda: http.post(url, json=query, headers=headers, timeout=600).raise_for_status(), 3)
    chdb_ms = median_ms(lambda: chdb.query(sql, "CSV"), 5)
    return {"build_s": round(build_s, 2), "definition_ready_s": round(ready_s, 2),
            "first_answer_same": first_answer == ours, "first_query_ms": round(first_ms, 1),
            "insightflow_http_ms": round(http_ms, 1), "chdb_ms": round(chdb_ms, 1),
            "chdb_over_insightflow_http": round(chdb_ms / http_ms, 3), "counts": ours, "chdb_counts": theirs,
            "same_numbers": ours == theirs, "state_bytes_per_person": state}


def bench_funnel_breakdown(http: httpx.Client, url: str, headers: dict[str, str], chdb: Any, date_from: str,
                           date_to: str) -> dict[str, Any]:
    """The same funnel broken down by `$browser` with first-touch attribution (each person valued by its
    first step event with a browser in the range), against chdb: windowFunnel plus argMinIf."""
    query = {"events": [{"id": e, "order": i} for i, e in enumerate(FUNNEL_STEPS)], "date_from": date_from,
             "date_to": date_to, "funnel_window_interval": 14, "funnel_window_interval_unit": "day",
             "breakdown": "$browser", "breakdown_type": "event"}
    started = time.perf_counter()
    while http.post(url, json={**query, "refresh": "blocking"}, headers=headers, timeout=600).status_code != 200:
        pass
    build_s = time.perf_counter() - started
    result = http.post(url, json=query, headers=headers, timeout=600).json()["result"]
    ours = {group[0]["breakdown_value"][0]: [s["count"] for s in group] for group in result}
    steps = ", ".join(f"'{e}'" for e in FUNNEL_STEPS)
    conditions = ", ".join(f"event = '{e}'" for e in FUNNEL_STEPS)
    browser = "JSONExtractString(properties, '$browser')"
    sql = (f"SELECT b, level, count() FROM (SELECT person_id, windowFunnel(1209600)(toDateTime(timestamp), "
           f"{conditions}) AS level, argMinIf({browser}, (timestamp, uuid), event IN ({steps}) AND {browser} != '') "
           f"AS b FROM events WHERE timestamp >= '{date_from} 00:00:00' AND timestamp < "
           f"toDateTime64('{date_to} 00:00:00', 6) + INTERVAL 1 DAY GROUP BY person_id) WHERE level > 0 "
           f"GROUP BY b, level")
    levels: dict[str, dict[int, int]] = {}
    for line in str(chdb.query(sql, "CSV")).strip().splitlines():
        value, level, count = line.rsplit(",", 2)
        levels.setdefault(value.strip('"'), {})[int(level)] = int(count)
    theirs = {b: [sum(c for lvl, c in by.items() if lvl >= k) for k in range(1, len(FUNNEL_STEPS) + 1)]
              for b, by in levels.items()}
    http_ms = median_ms(lambda: http.post(url, json=query, headers=headers, timeout=600).raise_for_status(), 3)
    chdb_ms = median_ms(lambda: chdb.query(sql, "CSV"), 5)
    return {"build_s": round(build_s, 2), "insightflow_http_ms": round(http_ms, 1), "chdb_ms": round(chdb_ms, 1),
            "chdb_over_insightflow_http": round(chdb_ms / http_ms, 3), "counts": ours, "chdb_counts": theirs,
            "same_numbers": ours == theirs}


def chdb_correlation_sql(steps: list[str], date_from: str, date_to: str, window_s: int) -> str:
    """PostHog's event correlation of an ordered funnel (spec 8.3) as one ClickHouse query over the
    events table: the funnel's attempt rule (spec 7.4: a step-1 event starts a new attempt, a step-k
    event extends the newest attempt that reached step k-1 within the window, and the first time the
    furthest step is reached is the one reported) folded over each person's step events in time
    order, then, per other event name, the converted and the other actors who did it strictly
    between their attempt's first step and its last step (not converted: the window's end or
    `date_to`). Rows: ('', converted actors, others), then (event, converted, others)."""
    n = len(steps)
    names = ", ".join(f"'{e}'" for e in steps)
    step_of = "multiIf(" + ", ".join(f"event = '{e}', {i + 1}" for i, e in enumerate(steps[:-1])) + f", {n})"
    lo = f"toDateTime64('{date_from} 00:00:00', 6, 'UTC')"
    hi = f"(toDateTime64('{date_to} 00:00:00', 6, 'UTC') + INTERVAL 1 DAY - INTERVAL 1 MICROSECOND)"
    w = window_s * 1_000_000
    # The fold's state: (start, time) of the attempt that reached each step, then the best (step,
    # start, time); -1: none. Tuple fields count from 1.
    def start(k: int) -> str:
        return f"acc.{2 * k - 1}"

    best_k, best_start, best_at = f"acc.{2 * n + 1}", f"acc.{2 * n + 2}", f"acc.{2 * n + 3}"

    def moved(k: int, begun: str) -> str:
        fields = [f if j // 2 + 1 != k else (begun if j % 2 == 0 else "x.1") for j, f in
                  enumerate(f"acc.{i}" for i in range(1, 2 * n + 1))]
        return (f"({', '.join(fields)}, greatest({best_k}, toInt64({k})), if({best_k} < {k}, {begun}, {best_start}), "
                f"if({best_k} < {k}, x.1, {best_at}))")

    branches = []
    for k in range(n, 1, -1):
        branches.append(f"x.2 = {k}, if({start(k - 1)} >= 0 AND x.1 - {start(k - 1)} <= {w} AND "
                        f"{start(k)} != {start(k - 1)}, {moved(k, start(k - 1))}, acc)")
    fold = (f"arrayFold((acc, x) -> multiIf({', '.join(branches)}, {moved(1, 'x.1')}), "
            f"arraySort(groupArray((toUnixTimestamp64Micro(timestamp), toInt64({step_of})))), "
            f"({', '.join(['toInt64(-1)'] * (2 * n))}, toInt64(0), toInt64(-1), toInt64(-1)))")
    return f"""
WITH actors AS (
  SELECT person_id, s.{2 * n + 1} = {n} AS success, s.{2 * n + 2} AS first,
         if(s.{2 * n + 1} = {n}, s.{2 * n + 3}, least(s.{2 * n + 2} + {w}, toUnixTimestamp64Micro({hi}))) AS last
  FROM (SELECT person_id, {fold} AS s FROM events
        WHERE event IN ({names}) AND timestamp >= {lo} AND timestamp <= {hi} GROUP BY person_id)
  WHERE s.{2 * n + 1} >= 1)
SELECT '', countIf(success), countIf(NOT success) FROM actors
UNION ALL
SELECT e.event, uniqExactIf(e.person_id, a.success), uniqExactIf(e.person_id, NOT a.success)
FROM events AS e INNER JOIN actors AS a ON e.person_id = a.person_id
WHERE e.event NOT IN ({names}) AND e.timestamp >= {lo} AND e.timestamp <= {hi}
  AND toUnixTimestamp64Micro(e.timestamp) > a.first AND toUnixTimestamp64Micro(e.timestamp) < a.last
GROUP BY e.event"""


def funnel_freshness(http: httpx.Client, capture_url: str, url: str, headers: dict[str, str], date_from: str,
                     date_to: str, probes: int) -> dict[str, Any]:
    """A new person converts (three step events, inside the range): how long until the funnel the
    dashboard polls counts it. Includes the apply, summarising the person and re-reading its day."""
    query = {"events": [{"id": e, "order": i} for i, e in enumerate(FUNNEL_STEPS)], "date_from": date_from,
             "date_to": date_to, "funnel_window_interval": 14, "funnel_window_interval_unit": "day"}
    latencies = []
    for i in range(probes):
        before = http.post(url, json=query, headers=headers, timeout=600).json()["result"][-1]["count"]
        moment = END - timedelta(days=2, minutes=i)
        started = time.perf_counter()
        http.post(capture_url, json={"api_key": "phc_bench", "batch": [
            {"event": e, "distinct_id": f"fresh-{i}", "timestamp": (moment + timedelta(seconds=k)).isoformat()}
            for k, e in enumerate(FUNNEL_STEPS)]}).raise_for_status()
        while http.post(url, json=query, headers=headers, timeout=600).json()["result"][-1]["count"] != before + 1:
            time.sleep(0.005)
        latencies.append((time.perf_counter() - started) * 1000)
    return {"p50": round(percentile(latencies, 0.5), 1), "max": round(max(latencies), 1), "probes": probes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    backlog_arguments(parser, 500_000, 50_000)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--load", type=int, default=1000, help="background capture events/s during probes")
    parser.add_argument("--funnel", action="store_true", help="also benchmark a 3-step funnel against windowFunnel")
    parser.add_argument("--retention-paths", action="store_true", help="also benchmark retention and paths")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="insightflow-bench-"))
    logs = workdir / "logs"
    redis_proc, redis_url = stack.start_redis(workdir / "redis", logs)
    broker_proc, bootstrap = stack.start_tansu(logs)
    procs = [broker_proc, redis_proc]
    topic = "events"
    env = {"INSIGHTFLOW_REDIS_URL": redis_url, "INSIGHTFLOW_KAFKA_BOOTSTRAP": bootstrap, "INSIGHTFLOW_TOPIC": topic,
           "INSIGHTFLOW_TEST_CLOCK": "1"}
    report: dict[str, Any] = {"events": args.events, "persons": args.persons, "partitions": args.partitions}
    try:
        client = connect(redis_url)
        project, key = bench_project(client, bootstrap, args.partitions, topic)
        events = synthetic(args.events, args.persons)
        produce_s = produce(bootstrap, topic, events)
        report["produce_events_per_s"] = round(args.events / produce_s)
        raw_s = raw_consume(bootstrap, topic, args.partitions, args.events)
        report["raw_consumer_events_per_s"] = round(args.events / raw_s)

        # Dataflow throughput on the backlog.
        dataflow = stack.start_dataflow(workdir / "recovery", logs, env)
        procs.insert(0, dataflow)
        while applied(client, topic) == 0:
            time.sleep(0.01)
        first_at, first = time.perf_counter(), applied(client, topic)
        while applied(client, topic) < args.events:
            if not dataflow.alive():
                raise RuntimeError(f"dataflow died; see {dataflow.log_path}")
            time.sleep(0.05)
        elapsed = time.perf_counter() - first_at
        report["dataflow_events_per_s"] = round((args.events - first) / elapsed)
        report["dataflow_vs_raw_consumer"] = round(
            report["dataflow_events_per_s"] / report["raw_consumer_events_per_s"], 3)

        # Query latency: ours (HTTP and in-process) against chdb, same events, same question.
        port = stack.free_port()
        api = stack.start_api(port, logs, env)
        procs.insert(0, api)
        url = f"http://127.0.0.1:{port}/api/environments/{PROJECT}/insights/trend/"
        headers = {"Authorization": f"Bearer {key}", "X-Insightflow-Now": END.isoformat()}
        date_from = (END - timedelta(days=30)).date().isoformat()
        date_to = (END - timedelta(days=1)).date().isoformat()
        chdb = chdb_session(events, workdir)
        http = httpx.Client(timeout=30)
        # The breakdown needs a definition: time its build (backfill over every event) first.
        breakdown_query = {"events": [{"id": "$pageview"}], "date_from": date_from, "date_to": date_to,
                           "breakdown": "$browser", "refresh": "blocking"}
        started = time.perf_counter()
        while True:
            reply = http.post(url, json=breakdown_query, headers=headers, timeout=600)
            if reply.status_code == 200:
                break
        report["definition_build_s"] = round(time.perf_counter() - started, 2)
        report["definition_build_events_per_s"] = round(args.events / report["definition_build_s"])
        window = f"'{date_from} 00:00:00'"
        end = f"toDateTime64('{date_to} 00:00:00', 6) + INTERVAL 1 DAY"
        questions = {
            "total_30d": ({"events": [{"id": "$pageview"}]},
                          f"SELECT toDate(timestamp) AS d, count() FROM events WHERE event = '$pageview' "
                          f"AND timestamp >= {window} AND timestamp < {end} GROUP BY d ORDER BY d"),
            "dau_30d": ({"events": [{"id": "$pageview", "math": "dau"}]},
                        f"SELECT toDate(timestamp) AS d, uniqExact(person_id) FROM events WHERE event = '$pageview' "
                        f"AND timestamp >= {window} AND timestamp < {end} GROUP BY d ORDER BY d"),
            "breakdown_browser_30d": ({"events": [{"id": "$pageview"}], "breakdown": "$browser"},
                                      f"SELECT JSONExtractString(properties, '$browser') AS b, toDate(timestamp) AS d, "
                                      f"count() FROM events WHERE event = '$pageview' AND timestamp >= {window} "
                                      f"AND timestamp < {end} GROUP BY b, d ORDER BY b, d"),
            "weekly_active_30d": ({"events": [{"id": "$pageview", "math": "weekly_active"}]},
                                  f"SELECT d, uniqExact(person_id) FROM (SELECT arrayJoin(arrayMap(i -> "
                                  f"toDate(timestamp) + i, range(7))) AS d, person_id FROM events WHERE "
                                  f"event = '$pageview' AND timestamp >= toDateTime64({window}, 6) - INTERVAL 6 DAY "
                                  f"AND timestamp < {end}) WHERE d >= '{date_from}' AND d <= '{date_to}' "
                                  f"GROUP BY d ORDER BY d"),
        }
        for name, (series, sql) in questions.items():
            query = {**series, "date_from": date_from, "date_to": date_to}
            result = http.post(url, json=query, headers=headers).json()["result"]
            lines = [line.replace('"', "").split(",") for line in str(chdb.query(sql, "CSV")).strip().splitlines()]
            if "breakdown" in series:
                ours = {(r["breakdown_value"], day): v for r in result for day, v in zip(r["days"], r["data"],
                                                                                        strict=True) if v}
                theirs = {(b, d): int(c) for b, d, c in lines}
            else:
                ours = dict(zip(result[0]["days"], result[0]["data"], strict=True))
                theirs = {d: int(c) for d, c in lines}
            assert ours == theirs, (name, list(ours.items())[:4], list(theirs.items())[:4])
            parsed = parse_trends_request(query)
            http_ms = median_ms(lambda q=query: http.post(url, json=q, headers=headers).raise_for_status(), 20)
            inproc_ms = median_ms(lambda p=parsed: TrendQuery(client, project, p, END).run(), 20)
            chdb_ms = median_ms(lambda s=sql: chdb.query(s, "CSV"), 20)
            report[f"query_{name}"] = {"insightflow_http_ms": round(http_ms, 2),
                                       "insightflow_inprocess_ms": round(inproc_ms, 2),
                                       "chdb_ms": round(chdb_ms, 2),
                                       "chdb_over_insightflow_http": round(chdb_ms / http_ms, 2),
                                       "same_numbers": True}

        if args.retention_paths:
            report.update(bench_retention_paths(http, url, headers, chdb))
        if args.funnel:
            report["funnel_3_steps_30d"] = bench_funnel(http, url.replace("/trend/", "/funnel/"), headers, client,
                                                        chdb, date_from, date_to)
            report["funnel_3_steps_by_browser_30d"] = bench_funnel_breakdown(
                http, url.replace("/trend/", "/funnel/"), headers, chdb, date_from, date_to)
            if args.probes:
                report["funnel_capture_to_queryable_ms"] = funnel_freshness(
                    http, f"http://127.0.0.1:{port}/batch/", url.replace("/trend/", "/funnel/"), headers, date_from,
                    date_to, min(args.probes, 20))
        if args.probes == 0:
            return print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        # Capture -> queryable latency under background load.
        stop = threading.Event()

        def load() -> None:
            batch = max(1, args.load // 20)
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    t = time.perf_counter()
                    c.post(f"http://127.0.0.1:{port}/batch/", json={"api_key": "phc_bench", "batch": [
                        {"event": "load", "distinct_id": f"l{random.randrange(1000)}"} for _ in range(batch)]})
                    time.sleep(max(0.0, 0.05 - (time.perf_counter() - t)))

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        today = datetime.now(UTC).date().isoformat()
        latencies = []
        for i in range(args.probes):
            name = f"probe-{i}"
            query = {"events": [{"id": name}], "date_from": today, "date_to": today}
            started = time.perf_counter()
            http.post(f"http://127.0.0.1:{port}/capture/", json={"api_key": "phc_bench", "event": name,
                                                                 "distinct_id": "prober"}).raise_for_status()
            auth = {"Authorization": f"Bearer {key}"}
            while http.post(url, json=query, headers=auth).json()["result"][0]["data"] != [1]:
                time.sleep(0.002)
            latencies.append((time.perf_counter() - started) * 1000)
        stop.set()
        loader.join(5)
        report["capture_to_queryable_ms"] = {"p50": round(percentile(latencies, 0.5), 1),
                                             "p99": round(percentile(latencies, 0.99), 1),
                                             "background_events_per_s": args.load, "probes": args.probes}
    finally:
        for managed in procs:
            managed.stop()
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
