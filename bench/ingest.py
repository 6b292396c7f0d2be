"""Ingest benchmark (issue 13): `make bench-ingest ARGS="--events 1000000"`.

In one run, on one synthetic backlog (bench/run.py's events; `--order time` sorts them by timestamp
as a live topic is, `random` is a replay of shuffled history):

- the bare pipeline (bench/bare.py: stock `KafkaSource` -> orjson -> count per (event, hour) ->
  pipelined Redis writes), events/s;
- the dataflow with every always-on state and `--definitions` registered first (three ordered
  funnels, a filtered trend, a filtered retention, paths), with 1 and with 2 processes: events/s,
  the ratio to the bare pipeline, Redis CPU per applied event (from INFO) and dataflow CPU per event
  (from /proc), and whether the 2-process state equals the 1-process state (counts, person sets);
- then the same until every funnel and paths summary is written as well, and a funnel's query time
  at both moments, and whether both gave the same answer (queries are exact either way: with a
  backlog's persons pending the archive answers, with a few the query summarises them in memory).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from bench.bare import DONE
from bench.run import END, PROJECT, applied, backlog_arguments, bench_project, produce, synthetic
from serving import stack
from state import keys
from state.connection import connect
from state.registry import DefinitionRegistry
from state.summaries import SummaryStore
from state.topics import ensure_topics

DEFINITIONS = [
    ("funnel/", {"events": [{"id": "$pageview", "order": 0}, {"id": "signed up", "order": 1},
                            {"id": "purchase", "order": 2}], "funnel_window_days": 14}),
    ("funnel/", {"events": [{"id": "$pageview", "order": 0}, {"id": "click", "order": 1},
                            {"id": "purchase", "order": 2}], "funnel_window_days": 7}),
    ("funnel/", {"events": [{"id": "click", "order": 0}, {"id": "signed up", "order": 1}],
                 "funnel_window_days": 1, "breakdown": "$browser", "breakdown_type": "event"}),
    ("trend/", {"events": [{"id": "$pageview", "math": "dau"}],
                "properties": [{"key": "$browser", "value": ["Chrome"], "operator": "exact", "type": "event"}]}),
    ("retention/", {"period": "Week", "total_intervals": 4, "target_entity": {"id": "signed up", "type": "events"},
                    "returning_entity": {"id": "purchase", "type": "events"},
                    "properties": [{"key": "$browser", "value": ["Safari"], "operator": "exact", "type": "event"}]}),
    ("path/", {"include_event_types": ["$pageview"], "step_limit": 5}),
]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _wait(done: Any, what: str, procs: list[stack.Managed], timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not finish within {timeout} s")
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} died; see {p.log_path}")
        time.sleep(0.02)


def bare(workdir: Path, bootstrap: str, topic: str, total: int, partitions: int) -> dict[str, Any]:
    redis_proc, url = stack.start_redis(workdir / "redis-bare", workdir / "logs")
    try:
        client = connect(url)
        env = {"BARE_BOOTSTRAP": bootstrap, "BARE_TOPIC": topic, "BARE_REDIS": url}
        proc = stack.spawn("bare", [sys.executable, "-m", "bytewax.run", "bench.bare:flow", "-b", "10"],
                           workdir / "logs", env)
        try:
            _wait(lambda: int(client.get(DONE) or 0) > 0, "the bare pipeline's first batch", [proc])
            start, first, cpu0 = time.perf_counter(), int(client.get(DONE) or 0), _cpu_s(proc.proc.pid)
            _wait(lambda: int(client.get(DONE) or 0) >= total, "the bare pipeline", [proc])
            elapsed = time.perf_counter() - start
            return {"events_per_s": round((total - first) / elapsed),
                    "cpu_us_per_event": round((_cpu_s(proc.proc.pid) - cpu0) / (total - first) * 1e6, 1)}
        finally:
            proc.stop()
    finally:
        redis_proc.stop()


def _ask(port: int, key: str, client: redis.Redis, path: str, body: dict[str, Any]) -> tuple[float, Any]:
    """Ask the API for one insight as a dashboard does; returns the seconds it took, and its result.
    A refusal is reported with Redis's slow log (what held Redis when the API gave up on it)."""
    headers = {"Authorization": f"Bearer {key}", "X-Insightflow-Now": END.isoformat()}
    started = time.perf_counter()
    reply = httpx.post(f"http://127.0.0.1:{port}/api/environments/{PROJECT}/insights/{path}",
                       json={**body, "date_from": "-30d", "refresh": "blocking"}, headers=headers, timeout=600)
    if reply.status_code != 200:
        slow = [(e["duration"], e["command"][:160]) for e in client.slowlog_get(10)]
        raise AssertionError(f"{reply.status_code} {reply.text}; Redis's slow log (µs, command): {slow}")
    return time.perf_counter() - started, reply.json()["result"]


def _summaries_pending(client: redis.Redis) -> int:
    """Dirty persons of every definition that keeps summaries, and definitions not ready yet (each
    counted as one): 0 once every funnel and paths summary is written."""
    registry, store = DefinitionRegistry(client), SummaryStore(client)
    pending = 0
    for project_id, h in registry.summarised():
        pending += store.pending(project_id, h) + (registry.status(project_id, h)[0] != "ready")
    return pending


def _canonical(client: redis.Redis) -> dict[str, Any]:
    """State that does not depend on which person ids were handed out."""
    names = sorted(n.decode() for n in client.smembers(keys.event_names(PROJECT)))
    out: dict[str, Any] = {"persons": client.hlen(keys.distinct_ids(PROJECT))}
    for name in names:
        out[f"day:{name}"] = client.hgetall(keys.day_counts(PROJECT, name))
        out[f"hour:{name}"] = client.hgetall(keys.hour_counts(PROJECT, name))
        out[f"first:{name}"] = client.hgetall(keys.first_time_day_counts(PROJECT, name))
        days = sorted(d.decode() for d in out[f"day:{name}"])
        out[f"dau:{name}"] = [client.bitcount(keys.day_persons(PROJECT, name, d)) for d in days]
    return out


def dataflow(workdir: Path, events_path: Path, total: int, partitions: int, processes: int,
             definitions: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A fresh Redis and broker; definitions registered through the API on an empty topic (as a
    dashboard's first request does, so their builds finish at once); then the backlog produced and
    applied by `processes` dataflow processes. Measured twice: until every event is applied, and
    until every funnel and paths summary is written too (queries are exact either way; summaries
    make them fast), with the first funnel's query time at both moments."""
    run = workdir / f"dataflow-{processes}"
    logs = run / "logs"
    redis_proc, url = stack.start_redis(run / "redis", logs)
    broker, bootstrap = stack.start_tansu(logs)
    procs: list[stack.Managed] = []
    api: stack.Managed | None = None
    try:
        client = connect(url)
        _, key = bench_project(client, bootstrap, partitions)
        env = {"INSIGHTFLOW_REDIS_URL": url, "INSIGHTFLOW_KAFKA_BOOTSTRAP": bootstrap, "INSIGHTFLOW_TOPIC": "events",
               "INSIGHTFLOW_TEST_CLOCK": "1"}
        procs = stack.start_dataflow_cluster(run / "recovery", logs, env, processes)
        port = stack.free_port()
        api = stack.start_api(port, logs, stack.archive_env(run / "recovery", env))  # the dataflow's archive, as `up`
        for path, body in DEFINITIONS[:definitions]:
            _ask(port, key, client, path, body)
        events = orjson.loads(events_path.read_bytes())
        produce(bootstrap, "events", events)
        del events
        _wait(lambda: applied(client, "events") > 0, "the first applied batch", procs)
        start, first = time.perf_counter(), applied(client, "events")
        cpu0, redis0 = sum(_cpu_s(p.proc.pid) for p in procs), _redis_cpu_s(client)
        _wait(lambda: applied(client, "events") >= total, "the dataflow", procs)
        elapsed = time.perf_counter() - start
        cpu1, redis1 = sum(_cpu_s(p.proc.pid) for p in procs), _redis_cpu_s(client)
        n = total - first
        stats = client.info("commandstats")
        busiest = sorted(stats, key=lambda k: -stats[k]["usec"])[:6]
        report: dict[str, Any] = {
            "events_per_s": round(n / elapsed),
            "redis_busiest_commands_us_per_event": {
                k.removeprefix("cmdstat_"): round(stats[k]["usec"] / n, 2) for k in busiest},
            "redis_cpu_us_per_event": round((redis1 - redis0) / n * 1e6, 2),
            "dataflow_cpu_us_per_event": round((cpu1 - cpu0) / n * 1e6, 1)}
        funnel = [d for d in DEFINITIONS[:definitions] if d[0] == "funnel/"][:1]
        if definitions:
            report["summaries_pending_when_applied"] = _summaries_pending(client)
            if funnel:  # pending persons: a backlog's are many, so the archive answers (serving/compute.py)
                took, when_applied = _ask(port, key, client, *funnel[0])
                report["funnel_query_ms_when_applied"] = round(took * 1000, 1)
            _wait(lambda: _summaries_pending(client) == 0, "the summaries", procs)
            whole = time.perf_counter() - start
            report["summarised"] = {
                "seconds_after_applied": round(whole - elapsed, 1),
                "events_per_s": round(n / whole),
                "redis_cpu_us_per_event": round((_redis_cpu_s(client) - redis0) / n * 1e6, 2),
                "dataflow_cpu_us_per_event": round((sum(_cpu_s(p.proc.pid) for p in procs) - cpu0) / n * 1e6, 1)}
            if funnel:
                took, once_summarised = _ask(port, key, client, *funnel[0])
                report["summarised"]["funnel_query_ms"] = round(took * 1000, 1)
                report["summarised"]["funnel_same_answer"] = once_summarised == when_applied
        return report, _canonical(client)
    finally:
        if api is not None:
            api.stop()
        for p in procs:
            p.stop()
        broker.stop()
        redis_proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    backlog_arguments(parser, 1_000_000, 200_000)
    parser.add_argument("--order", choices=("time", "random"), default="time")
    parser.add_argument("--definitions", type=int, default=len(DEFINITIONS), help="how many of the six to register")
    parser.add_argument("--processes", default="1,2", help="dataflow process counts to run, comma-separated")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="insightflow-ingest-"))
    events = synthetic(args.events, args.persons)
    if args.order == "time":
        events.sort(key=lambda e: e["timestamp"])
    events_path = workdir / "events.json"
    events_path.write_bytes(orjson.dumps(events))
    report: dict[str, Any] = {"events": args.events, "persons": args.persons, "partitions": args.partitions,
                              "order": args.order, "definitions": [p.strip("/") for p, _ in
                                                                   DEFINITIONS[:args.definitions]]}
    broker, bootstrap = stack.start_tansu(workdir / "logs")
    try:
        ensure_topics(bootstrap, ["events"], args.partitions)
        produce(bootstrap, "events", events)
        del events
        report["bare_pipeline"] = bare(workdir, bootstrap, "events", args.events, args.partitions)
    finally:
        broker.stop()
    states = {}
    for processes in sorted({int(n) for n in args.processes.split(",")}):
        result, states[processes] = dataflow(workdir, events_path, args.events, args.partitions, processes,
                                             args.definitions)
        result["ratio_to_bare"] = round(result["events_per_s"] / report["bare_pipeline"]["events_per_s"], 3)
        report[f"dataflow_{processes}_process{'es' if processes > 1 else ''}"] = result
    if 1 in states and 2 in states:
        report["two_processes_state_equals_one"] = states[1] == states[2]
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    main()
