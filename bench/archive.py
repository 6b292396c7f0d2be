"""Archive benchmark (issue 15): `make bench-archive ARGS="--events 5000000 --persons 200000"`.

In one run, over the same synthetic history (bench/run.py's events, time order), each on a fresh
Redis and broker: the dataflow's ingest rate over the backlog with the event archive off and on
(`--pairs N`: off and on alternated N times, each pair's ratio and their median, since the machine's
speed drifts within minutes); the archive's bytes per event; then, with the archive on, the embedded
broker restarted empty (its topic and every event in it gone, as after a restart of `up`) and the
time until each new definition is queryable (first 200 of a blocking request), built from the
archive alone: an ordered 3-step funnel, a filtered trend broken down by a property, the sum and
average of a property, a trend filtered on a person property, 5-step paths and the funnel's event
correlation. chdb answers the same
questions from scratch over the same events, side by side, and the run checks the numbers are equal
where it computes them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.run import (
    END,
    FUNNEL_STEPS,
    PROJECT,
    backlog_arguments,
    bench_funnel,
    bench_paths,
    chdb_correlation_sql,
    chdb_session,
    ingest_backlog,
    median_ms,
    synthetic,
)
from serving import stack
from serving.funnels import correlation_rows
from state.archive import Archive
from state.registry import DefinitionRegistry
from state.stream import Stream
from state.topics import ensure_topics


def _until_ready(http: httpx.Client, url: str, query: dict[str, Any], headers: dict[str, str]) -> tuple[float, Any]:
    started = time.perf_counter()
    while True:
        reply = http.post(url, json={**query, "refresh": "blocking"}, headers=headers, timeout=600)
        if reply.status_code == 200:
            return round(time.perf_counter() - started, 2), reply.json()
        if reply.status_code != 202:
            raise RuntimeError(f"{url}: {reply.status_code} {reply.text}")


def _filtered_breakdown(http: httpx.Client, url: str, headers: dict[str, str], chdb: Any, date_from: str,
                        date_to: str) -> dict[str, Any]:
    """$pageview without Edge, per day, broken down by `$current_url`, against chdb."""
    query = {"events": [{"id": "$pageview", "properties": [
        {"key": "$browser", "value": ["Edge"], "operator": "is_not", "type": "event"}]}],
        "breakdown": "$current_url", "breakdown_type": "event", "breakdown_limit": 100,
        "date_from": date_from, "date_to": date_to}
    build_s, body = _until_ready(http, url, query, headers)
    ours = {r["breakdown_value"]: {d: v for d, v in zip(r["days"], r["data"], strict=True) if v}
            for r in body["result"]}
    sql = (f"SELECT JSONExtractString(properties, '$current_url') AS u, toDate(timestamp) AS d, count() FROM events "
           f"WHERE event = '$pageview' AND JSONExtractString(properties, '$browser') != 'Edge' AND timestamp >= "
           f"'{date_from} 00:00:00' AND timestamp < toDateTime64('{date_to} 00:00:00', 6) + INTERVAL 1 DAY "
           f"GROUP BY u, d")
    theirs: dict[str, dict[str, int]] = {}
    for line in str(chdb.query(sql, "CSV")).strip().splitlines():
        u, d, c = line.replace('"', "").rsplit(",", 2)
        theirs.setdefault(u, {})[d] = int(c)
    http_ms = median_ms(lambda: http.post(url, json=query, headers=headers).raise_for_status(), 5)
    chdb_ms = median_ms(lambda: chdb.query(sql, "CSV"), 5)
    return {"build_s": build_s, "insightflow_http_ms": round(http_ms, 1), "chdb_ms": round(chdb_ms, 1),
            "chdb_over_insightflow_http": round(chdb_ms / http_ms, 2), "same_numbers": ours == theirs}


def _property_sum(http: httpx.Client, url: str, headers: dict[str, str], chdb: Any, date_from: str,
                  date_to: str) -> dict[str, Any]:
    """Sum and average of `amount` (in the JSON, no column of its own) over purchases per day, against chdb."""
    query = {"events": [{"id": "purchase", "math": "sum", "math_property": "amount"},
                        {"id": "purchase", "math": "avg", "math_property": "amount"}],
             "date_from": date_from, "date_to": date_to}
    build_s, body = _until_ready(http, url, query, headers)
    ours = [{d: v for d, v in zip(r["days"], r["data"], strict=True) if v} for r in body["result"]]
    sql = (f"SELECT toDate(timestamp) AS d, sum(JSONExtractFloat(properties, 'amount')), "
           f"avg(JSONExtractFloat(properties, 'amount')) FROM events WHERE event = 'purchase' AND timestamp >= "
           f"'{date_from} 00:00:00' AND timestamp < toDateTime64('{date_to} 00:00:00', 6) + INTERVAL 1 DAY "
           f"GROUP BY d")
    theirs: list[dict[str, float]] = [{}, {}]
    for line in str(chdb.query(sql, "CSV")).strip().splitlines():
        d, total, mean = line.replace('"', "").split(",")
        theirs[0][d], theirs[1][d] = float(total), float(mean)
    same = all(ours[i].keys() == theirs[i].keys() and all(abs(ours[i][d] - theirs[i][d]) <= 1e-9 * abs(theirs[i][d])
                                                        for d in theirs[i]) for i in range(2))
    http_ms = median_ms(lambda: http.post(url, json=query, headers=headers).raise_for_status(), 5)
    chdb_ms = median_ms(lambda: chdb.query(sql, "CSV"), 5)
    return {"build_s": build_s, "insightflow_http_ms": round(http_ms, 1), "chdb_ms": round(chdb_ms, 1),
            "chdb_over_insightflow_http": round(chdb_ms / http_ms, 2), "same_numbers": same}


def _person_filtered(http: httpx.Client, url: str, headers: dict[str, str], chdb: Any, date_from: str,
                     date_to: str) -> dict[str, Any]:
    """$pageview of persons without a `plan` (every person here: none has properties), per day: a
    definition reading person properties, so its backfill reads every person's properties."""
    query = {"events": [{"id": "$pageview", "properties": [
        {"key": "plan", "operator": "is_not_set", "type": "person"}]}], "date_from": date_from, "date_to": date_to}
    build_s, body = _until_ready(http, url, query, headers)
    ours = {d: v for d, v in zip(body["result"][0]["days"], body["result"][0]["data"], strict=True) if v}
    sql = (f"SELECT toDate(timestamp) AS d, count() FROM events WHERE event = '$pageview' AND timestamp >= "
           f"'{date_from} 00:00:00' AND timestamp < toDateTime64('{date_to} 00:00:00', 6) + INTERVAL 1 DAY "
           f"GROUP BY d")
    theirs = {d: int(n) for d, n in (line.replace('"', "").split(",")
                                     for line in str(chdb.query(sql, "CSV")).strip().splitlines())}
    http_ms = median_ms(lambda: http.post(url, json=query, headers=headers).raise_for_status(), 5)
    return {"build_s": build_s, "insightflow_http_ms": round(http_ms, 1), "same_numbers": ours == theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    backlog_arguments(parser, 1_000_000, 50_000)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, archive) and print it")
    parser.add_argument("--ingest-only", action="store_true", help="only the ingest rates with the archive off and on")
    parser.add_argument("--builds-only", action="store_true",
                        help="skip the ingest with the archive off (no ratio): only the builds and their queries")
    parser.add_argument("--pairs", type=int, default=1,
                        help="ingest with the archive off then on this many times, alternating (the machine's "
                             "speed drifts): each pair's ratio and their median")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="insightflow-archive-"))
    report: dict[str, Any] = {"events": args.events, "persons": args.persons}
    events = synthetic(args.events, args.persons)
    procs: list[stack.Managed] = []
    try:
        pairs = [] if args.builds_only else list(range(max(1, args.pairs)))
        ratios = []
        for pair in pairs:
            off = ingest_backlog(workdir / f"off{pair}", events, args.partitions, {"INSIGHTFLOW_ARCHIVE_DIR": ""})
            for managed in off.procs:
                managed.stop()
            archive = workdir / f"on{pair}" / "archive"
            on = ingest_backlog(workdir / f"on{pair}", events, args.partitions,
                                {"INSIGHTFLOW_ARCHIVE_DIR": str(archive)})
            ratios.append(round(on.events_per_s / off.events_per_s, 3))
            report.setdefault("pairs", []).append({"archive_off": off.events_per_s, "archive_on": on.events_per_s,
                                                   "on_over_off": ratios[-1]})
            if pair < len(pairs) - 1:
                for managed in on.procs:
                    managed.stop()
        if not pairs:
            archive = workdir / "on" / "archive"
            on = ingest_backlog(workdir / "on", events, args.partitions, {"INSIGHTFLOW_ARCHIVE_DIR": str(archive)})
        procs, env, client, key = on.procs, on.env, on.client, on.key
        workdir_on = archive.parent
        report["archive_on"] = {"dataflow_events_per_s": on.events_per_s}
        if ratios:
            report["archive_off"] = {"dataflow_events_per_s": off.events_per_s}
            report["archive_on_over_off"] = ratios[-1] if len(ratios) == 1 else statistics.median(ratios)
        coverage = Archive(archive).coverage(PROJECT)
        report["archive"] = {"events": coverage.events, "bytes": coverage.bytes, "segments": coverage.segments,
                             "bytes_per_event": round(coverage.bytes / max(1, coverage.events), 1)}
        if args.ingest_only:
            return
        # The broker comes back empty: every definition below is built from the archive alone.
        broker = procs[1]
        broker.stop()
        port = int(env["INSIGHTFLOW_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1])
        procs[1], _ = stack.start_tansu(workdir_on / "logs", port)
        ensure_topics(env["INSIGHTFLOW_KAFKA_BOOTSTRAP"], ["events", "events_dlq"], args.partitions)
        procs[0].stop()
        procs[0] = stack.start_dataflow(workdir_on / "recovery", workdir_on / "logs", env)
        api_port = stack.free_port()
        procs.append(stack.start_api(api_port, workdir_on / "logs", env))
        url = f"http://127.0.0.1:{api_port}/api/environments/{PROJECT}/insights/trend/"
        headers = {"Authorization": f"Bearer {key}", "X-Insightflow-Now": END.isoformat()}
        date_from = (END - timedelta(days=30)).date().isoformat()
        date_to = (END - timedelta(days=1)).date().isoformat()
        chdb = chdb_session(events, workdir)
        del events
        with httpx.Client(timeout=600) as http:
            funnel_url = url.replace("/trend/", "/funnel/")
            report["funnel_3_steps_30d"] = bench_funnel(http, funnel_url, headers, client, chdb, date_from, date_to)
            report["trend_filtered_by_url_30d"] = _filtered_breakdown(http, url, headers, chdb, date_from, date_to)
            report["trend_sum_of_amount_30d"] = _property_sum(http, url, headers, chdb, date_from, date_to)
            report["trend_person_filtered_30d"] = _person_filtered(http, url, headers, chdb, date_from, date_to)
            report.update(bench_paths(http, url, headers, chdb, client))
            correlation = {"events": [{"id": e, "order": i} for i, e in enumerate(FUNNEL_STEPS)],
                           "date_from": date_from, "date_to": date_to, "funnel_window_interval": 14,
                           "funnel_window_interval_unit": "day", "funnel_correlation_type": "events"}
            correlation_url = url.replace("/trend/", "/funnel/correlation/")
            before = len(DefinitionRegistry(client).for_project(PROJECT))
            build_s, body = _until_ready(http, correlation_url, correlation, headers)
            query_ms = median_ms(lambda: http.post(correlation_url, json=correlation, headers=headers), 3)
            sql = chdb_correlation_sql(list(FUNNEL_STEPS), date_from, date_to, 14 * 86400)
            counted = [line.rsplit(",", 2) for line in str(chdb.query(sql, "CSV")).strip().splitlines()]
            totals = next((int(s), int(f)) for name, s, f in counted if name == '""')
            # PostHog's selection of the rows (§8.3 steps 6-9) over chdb's counts: the product's own
            theirs = [row[:3] for row in correlation_rows(*totals, {name.strip('"'): (int(s), int(f))
                                                                    for name, s, f in counted if name != '""'})]
            ours = [(r["event"]["event"], r["success_count"], r["failure_count"]) for r in body["result"]["events"]]
            chdb_ms = median_ms(lambda: chdb.query(sql, "CSV"), 3)
            report["funnel_correlation_events"] = {
                "build_s": build_s, "events": len(body["result"]["events"]), "query_ms": round(query_ms),
                "chdb_ms": round(chdb_ms), "chdb_over_insightflow_http": round(chdb_ms / query_ms, 3),
                "chdb_over_first_answer": round(chdb_ms / 1000 / build_s, 3), "same_numbers": ours == theirs,
                "rows": ours, "chdb_rows": theirs,
                # 0: answered from the archive's columns; 1: its definition was registered and built
                "definitions_registered": len(DefinitionRegistry(client).for_project(PROJECT)) - before}
        report["topic_recreated"] = Stream(client, "events").progress().previous_topic_id is not None
    finally:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        for managed in procs:
            managed.stop()
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    main()
