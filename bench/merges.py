"""Merges benchmark (issue 14): `make bench-merges ARGS="--events 5000000 --persons 200000"`.

In one run, the same synthetic history twice (bench/run.py's events, in random time order as a replay
of history is): as is, and with `--merged` of the persons (5 % by default) anonymous until they sign
up through posthog-python's alias flow (their earlier events carry an anonymous id, then one
`$create_alias`). For each, on a fresh Redis and broker: the dataflow's ingest rate over the backlog,
then through HTTP the 30-day DAU, a new 3-step ordered funnel (its build and its query) and 8-week
weekly retention, each next to chdb answering the same question over the same events with every
event's person resolved (as PostHog counts once its overrides are applied). The run checks that the
numbers are equal, and reports how much the merges cost.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.run import (
    END,
    PROJECT,
    backlog_arguments,
    bench_funnel,
    bench_retention,
    chdb_session,
    ingest_backlog,
    median_ms,
    synthetic,
)
from serving import stack
from state import keys


def _dau(http: httpx.Client, url: str, headers: dict[str, str], chdb: Any, date_from: str, date_to: str
         ) -> dict[str, Any]:
    query = {"events": [{"id": "$pageview", "math": "dau"}], "date_from": date_from, "date_to": date_to}
    sql = (f"SELECT toDate(timestamp) AS d, uniqExact(person_id) FROM events WHERE event = '$pageview' "
           f"AND timestamp >= '{date_from} 00:00:00' AND timestamp < toDateTime64('{date_to} 00:00:00', 6) "
           f"+ INTERVAL 1 DAY GROUP BY d ORDER BY d")
    result = http.post(url, json=query, headers=headers).json()["result"][0]
    ours = {d: v for d, v in zip(result["days"], result["data"], strict=True) if v}
    theirs = {d: int(c) for d, c in (line.replace('"', "").split(",")
                                     for line in str(chdb.query(sql, "CSV")).strip().splitlines())}
    http_ms = median_ms(lambda: http.post(url, json=query, headers=headers).raise_for_status(), 20)
    chdb_ms = median_ms(lambda: chdb.query(sql, "CSV"), 10)
    return {"insightflow_http_ms": round(http_ms, 2), "chdb_ms": round(chdb_ms, 2),
            "chdb_over_insightflow_http": round(chdb_ms / http_ms, 2), "same_numbers": ours == theirs}


def variant(workdir: Path, events: list[dict[str, Any]], partitions: int) -> dict[str, Any]:
    report: dict[str, Any] = {"events": len(events),
                              "create_alias_events": sum(1 for e in events if e["event"] == "$create_alias")}
    backlog = ingest_backlog(workdir, events, partitions)
    procs, env, client, key, logs = backlog.procs, backlog.env, backlog.client, backlog.key, workdir / "logs"
    try:
        report["dataflow_events_per_s"] = backlog.events_per_s
        report["persons_merged"] = client.hlen(keys.merged(PROJECT))
        port = stack.free_port()
        procs.insert(0, stack.start_api(port, logs, env))
        url = f"http://127.0.0.1:{port}/api/environments/{PROJECT}/insights/trend/"
        headers = {"Authorization": f"Bearer {key}", "X-Insightflow-Now": END.isoformat()}
        date_from = (END - timedelta(days=30)).date().isoformat()
        date_to = (END - timedelta(days=1)).date().isoformat()
        chdb = chdb_session(events, workdir)
        with httpx.Client(timeout=600) as http:
            report["query_dau_30d"] = _dau(http, url, headers, chdb, date_from, date_to)
            report["funnel_3_steps_30d"] = bench_funnel(http, url.replace("/trend/", "/funnel/"), headers, client,
                                                        chdb, date_from, date_to)
            report.update(bench_retention(http, url, headers, chdb))
        return report
    finally:
        for managed in procs:
            managed.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    backlog_arguments(parser, 1_000_000, 50_000)
    parser.add_argument("--merged", type=float, default=0.05, help="share of persons signing up through alias")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="insightflow-merges-"))
    report: dict[str, Any] = {"events": args.events, "persons": args.persons, "merged": args.merged}
    try:
        for name, share in (("without_merges", 0.0), ("with_merges", args.merged)):
            events = synthetic(args.events, args.persons, merged=share)
            report[name] = variant(workdir / name, events, args.partitions)
            del events
        plain, merged = report["without_merges"], report["with_merges"]
        report["with_over_without"] = {
            "dataflow_events_per_s": round(merged["dataflow_events_per_s"] / plain["dataflow_events_per_s"], 3),
            "query_dau_30d_ms": round(merged["query_dau_30d"]["insightflow_http_ms"]
                                      / plain["query_dau_30d"]["insightflow_http_ms"], 2),
            "funnel_build_s": round(merged["funnel_3_steps_30d"]["build_s"]
                                    / plain["funnel_3_steps_30d"]["build_s"], 2),
            "funnel_query_ms": round(merged["funnel_3_steps_30d"]["insightflow_http_ms"]
                                     / plain["funnel_3_steps_30d"]["insightflow_http_ms"], 2),
            "retention_query_ms": round(merged["query_weekly_retention_8w"]["insightflow_http_ms"]
                                        / plain["query_weekly_retention_8w"]["insightflow_http_ms"], 2)}
    finally:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    main()
