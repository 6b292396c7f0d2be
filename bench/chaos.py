"""Kill -9 rounds against a running `insightflow up` while capturing with SDK-style resends, then the
state is compared with a batch computation over every acknowledged event.

    .venv/bin/python -m bench.chaos --rounds 60

Each round kills one of the dataflow, the API and Redis, or two of them at once, waits until `up`
has restarted them, and lets capture run a little. Senders resend a batch with the same uuids after
any 5xx or broken connection, until it is acknowledged. At the end: per (event, day) counts and
distinct persons from Redis, and a 2-step ordered funnel through the API, against the same figures
computed directly from the acknowledged events (each uuid once). Reports lost and double counts.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from dataflows.operators.funnels import StepEvent, funnel
from state import keys
from state.registry import Registry
from tests.upstack import Up

PROJECT = 77
TOKEN = "phc_chaos"
NAMES = ("view", "buy", "other")
START = datetime(2024, 5, 1, tzinfo=UTC)
DAYS = 5
VICTIMS = (("dataflow",), ("api",), ("redis",), ("dataflow", "redis"), ("api", "redis"), ("dataflow", "api"))


class Senders:
    """Threads capturing fresh batches; a batch is resent, same uuids, until acknowledged."""

    def __init__(self, url: str, threads: int, batch: int, seed: int, rate: float) -> None:
        self.url, self.batch = url, batch
        self.interval = batch * threads / rate  # seconds between one thread's batches
        self.events: dict[str, dict[str, Any]] = {}  # uuid -> event, once acknowledged
        self.statuses: Counter[str] = Counter()
        self.resends = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(seed + i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        client = httpx.Client(timeout=15)
        while not self._stop.is_set():
            due = time.monotonic() + self.interval
            events = [{"event": rng.choice(NAMES), "distinct_id": f"u{rng.randrange(20_000)}",
                       "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                       "timestamp": (START + timedelta(seconds=rng.randrange(DAYS * 86400))).isoformat()}
                      for _ in range(self.batch)]
            tries = 0
            while True:  # until acknowledged, even after stop(): what was sent must be accounted for
                tries += 1
                try:
                    reply = client.post(f"{self.url}/batch/", json={"api_key": TOKEN, "batch": events})
                    status = str(reply.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with self._lock:
                    self.statuses[status] += 1
                    self.resends += tries > 1
                if status == "200":
                    with self._lock:
                        self.events.update((e["uuid"], e) for e in events)
                    break
                if status.startswith("4"):
                    raise AssertionError(f"capture refused a valid batch: {status}")
                time.sleep(0.2)
            self._stop.wait(max(0.0, due - time.monotonic()))
        client.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)


def _expected(events: dict[str, dict[str, Any]]) -> tuple[Counter[tuple[str, str]], dict[tuple[str, str], int],
                                                          list[int]]:
    counts: Counter[tuple[str, str]] = Counter()
    persons: dict[tuple[str, str], set[str]] = defaultdict(set)
    steps: dict[str, list[StepEvent]] = defaultdict(list)
    for e in events.values():
        ts = datetime.fromisoformat(e["timestamp"])
        day = ts.strftime("%Y%m%d")
        counts[(e["event"], day)] += 1
        persons[(e["event"], day)].add(e["distinct_id"])
        if e["event"] in ("view", "buy"):
            step = ("view", "buy").index(e["event"]) + 1
            steps[e["distinct_id"]].append(StepEvent(ts.timestamp(), e["uuid"], (step,)))
    funnel_counts = [0, 0]
    for evs in steps.values():
        result = funnel(evs, 2, 14 * 86400, "ordered")
        for k in range(result.steps_reached if result else 0):
            funnel_counts[k] += 1
    return counts, {k: len(v) for k, v in persons.items()}, funnel_counts


FUNNEL = {"events": [{"id": "view", "order": 0}, {"id": "buy", "order": 1}], "date_from": START.date().isoformat(),
          "date_to": (START + timedelta(days=DAYS)).date().isoformat(), "funnel_window_interval": 14,
          "funnel_window_interval_unit": "day"}


def _register_funnel(up: Up, key: str) -> None:
    """Ask for the funnel once (it registers and starts its backfill), whatever is being killed."""
    for _ in range(60):
        try:
            if httpx.post(f"{up.url}/api/environments/{PROJECT}/insights/funnel/", json=FUNNEL, timeout=10,
                          headers={"Authorization": f"Bearer {key}"}).status_code in (200, 202):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)


def _state(up: Up, key: str) -> tuple[Counter[tuple[str, str]], dict[tuple[str, str], int], list[int]]:
    client = up.redis
    counts: Counter[tuple[str, str]] = Counter()
    persons: dict[tuple[str, str], int] = {}
    for name in NAMES:
        for day, value in client.hgetall(keys.day_counts(PROJECT, name)).items():
            counts[(name, day.decode())] = int(value)
            persons[(name, day.decode())] = int(client.bitcount(keys.day_persons(PROJECT, name, day.decode())))
    reply = httpx.post(f"{up.url}/api/environments/{PROJECT}/insights/funnel/", timeout=120,
                       headers={"Authorization": f"Bearer {key}"}, json={**FUNNEL, "refresh": "blocking"})
    reply.raise_for_status()
    return counts, persons, [s["count"] for s in reply.json()["result"]]


def _kill(up: Up, names: tuple[str, ...]) -> None:
    before = up.pids()
    for name in names:
        try:
            os.kill(before[name], signal.SIGKILL)
        except (KeyError, ProcessLookupError):
            pass
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = up.pids()
        if all(now.get(n) not in (None, before.get(n)) for n in names) and up.readyz().get("redis"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{names} not restarted within 90 s; output: {up.seen[-10:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=3000, help="events per second captured, in total")
    parser.add_argument("--processes", type=int, default=1,
                        help="dataflow processes `up` runs (a kill of the dataflow kills the first of them)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        up = Up.start(Path(tmp) / "data", env={"INSIGHTFLOW_DATAFLOW_PROCESSES": str(args.processes)})
        try:
            registry = Registry(up.redis)
            registry.save_project(PROJECT, token=TOKEN)
            key, _ = registry.create_key([PROJECT], ["insight:read"])
            senders = Senders(up.url, args.threads, args.batch, args.seed, args.rate)
            time.sleep(2)
            # the funnel is registered while capture goes on: its backfill and live path are killed too
            threading.Thread(target=_register_funnel, args=(up, key), daemon=True).start()
            kills: Counter[str] = Counter()
            started = time.monotonic()
            for number in range(1, args.rounds + 1):
                victims = rng.choice(VICTIMS)
                _kill(up, victims)
                kills.update(victims)
                kills["+".join(victims)] += len(victims) > 1
                print(f"round {number}: killed {'+'.join(victims)}; {len(senders.events)} events acknowledged",
                      flush=True)
                time.sleep(rng.uniform(0.5, 3.0))
            senders.stop()
            up.wait_applied(900)
            expected = _expected(senders.events)
            got = _state(up, key)
            elapsed = time.monotonic() - started
            log = (up.data_dir / "logs" / "dataflow.log").read_text(errors="replace")
            rewinds = log.count("Redis came back without applied offsets")
            resumed = log.count("state holds events up to offset")
        finally:
            code = up.stop(signal.SIGINT) if up.proc.poll() is None else up.proc.returncode
            up.kill()
    counts_e, persons_e, funnel_e = expected
    counts_g, persons_g, funnel_g = got
    lost = sum(max(0, counts_e[k] - counts_g.get(k, 0)) for k in counts_e)
    double = sum(max(0, counts_g[k] - counts_e.get(k, 0)) for k in counts_g)
    persons_diff = {k: (persons_e.get(k), persons_g.get(k)) for k in set(persons_e) | set(persons_g)
                    if persons_e.get(k) != persons_g.get(k)}
    restarts = [line for line in up.seen if line.startswith("restarted")]
    print(f"rounds: {args.rounds} in {elapsed:.0f} s; dataflow processes: {args.processes}; kills: {dict(kills)}; "
          f"restarts printed by up: {len(restarts)}")
    print(f"events acknowledged: {len(senders.events)}; requests: {dict(senders.statuses)}; "
          f"batches resent: {senders.resends}")
    print(f"dataflow restarts because Redis lost its last writes: {rewinds}; partitions resumed from Redis's "
          f"offsets (behind the snapshot): {resumed}")
    print(f"lost: {lost}; double: {double}; distinct-person cells differing: {len(persons_diff)}")
    print(f"funnel view -> buy: state {funnel_g}, batch {funnel_e}; up exited {code}")
    if lost or double or persons_diff or funnel_g != funnel_e:
        raise SystemExit(f"MISMATCH: persons {list(persons_diff.items())[:5]}")


if __name__ == "__main__":
    main()
