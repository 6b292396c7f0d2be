"""`insightflow up` driven as a user runs it, for the tests that stop, kill and restart whole stacks."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from serving import stack
from state import keys
from state.connection import connect

ROOT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("INSIGHTFLOW_")}


@dataclass
class Up:
    """One `insightflow up` process and what it prints."""

    data_dir: Path
    port: int
    proc: subprocess.Popen
    lines: queue.Queue
    seen: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, data_dir: Path, port: int | None = None, demo: bool = False, timeout: float = 180,
              env: dict[str, str] | None = None) -> Up:
        port = port or stack.free_port()
        argv = [sys.executable, "-m", "serving.cli", "up", "--api-port", str(port), "--data-dir", str(data_dir)]
        proc = subprocess.Popen([*argv, *([] if demo else ["--no-demo"])], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**clean_env(), **(env or {})}, cwd=ROOT,
                                start_new_session=True)
        lines: queue.Queue = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()
        up = cls(data_dir, port, proc, lines)
        try:
            up.wait_for("ready: ", timeout)
        except BaseException:
            up.kill()
            raise
        return up

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r} within {timeout}s; output so far: {self.seen}")

    def output(self) -> list[str]:
        """Every line printed so far."""
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of one process's log (`logs/<name>.log`), for a failure's message."""
        path = self.data_dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else f"no {path}"

    def pids(self) -> dict[str, int]:
        """The processes `up` runs now; a pid file the supervisor replaces meanwhile (restarting that
        process) is left out rather than read half-gone."""
        found = {}
        for path in (self.data_dir / "pids").glob("*.pid"):
            try:
                found[path.stem] = int(path.read_text())
            except (FileNotFoundError, ValueError):
                continue
        return found

    @property
    def redis(self) -> redis.Redis:
        env = json.loads((self.data_dir / "stack.json").read_text())
        return connect(env["INSIGHTFLOW_REDIS_URL"])

    def readyz(self) -> dict[str, Any]:
        try:
            return dict(httpx.get(f"{self.url}/readyz", timeout=5).json())
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_applied(self, timeout: float = 60) -> None:
        wait_lag_zero(self.readyz, timeout, lambda: f"output: {self.output()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 180) -> int:
        os.kill(self.proc.pid, sig)
        code = self.proc.wait(timeout)
        time.sleep(0.2)  # the reader thread takes the last lines
        self.output()
        return code

    def kill(self) -> None:
        """Leave nothing running, whatever state the test is in."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.pids().values():
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def wait_lag_zero(readyz: Callable[[], dict[str, Any]], timeout: float, context: Callable[[], str],
                  check: Callable[[], None] | None = None) -> None:
    """Until every event accepted so far is reflected in served state (`lag_events` 0)."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = readyz()
        if body.get("lag_events") == 0:
            return
        if check is not None:
            check()
        time.sleep(0.05)
    raise AssertionError(f"events not applied within {timeout}s: {body}; {context()}")


def day_total(client: redis.Redis, project_id: int, event: str) -> int:
    """All events of that name the state counted, over every day."""
    return sum(int(v) for v in client.hgetall(keys.day_counts(project_id, event)).values())


class Sender:
    """Captures batches of fresh events as an SDK does: a batch answered 5xx (or not answered) is sent
    again with the same uuids until acknowledged or `stop`; a 4xx is final. Records every status."""

    def __init__(self, url: str, token: str, event: str = "burst", batch: int = 200, threads: int = 2,
                 retry: bool = True) -> None:
        self.url, self.token, self.event, self.batch, self.retry = url, token, event, batch, retry
        self.acknowledged: set[str] = set()
        self.refused: set[str] = set()  # answered 503 and never resent (retry=False)
        self.unanswered: set[str] = set()  # last sent in a request that got no answer: may be applied
        self.statuses: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, worker: int) -> None:
        client = httpx.Client(timeout=10)
        n = 0
        while not self._stop.is_set():
            n += 1
            events = [{"event": self.event, "distinct_id": f"w{worker}-{(n * self.batch + i) % 97}",
                       "uuid": str(uuid.uuid4())} for i in range(self.batch)]
            while True:
                try:
                    reply = client.post(f"{self.url}/batch/", json={"api_key": self.token, "batch": events})
                    status = str(reply.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with self._lock:
                    self.statuses[status] += 1
                    if status == "200":
                        self.acknowledged.update(e["uuid"] for e in events)
                if status == "200" or status.startswith("4"):
                    break
                if not self.retry or self._stop.is_set():
                    with self._lock:
                        self.refused.update(e["uuid"] for e in events)
                        if not status[0].isdigit():
                            self.unanswered.update(e["uuid"] for e in events)
                    break
                time.sleep(0.1)
        client.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
