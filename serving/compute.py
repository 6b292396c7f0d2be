"""Insight computations off the API's event loop: a pool of worker processes with a time budget.

Capture, `/healthz` and `/readyz` run on the event loop; a query that takes seconds of CPU must not
hold them (nor the GIL), so a built query object is sent to a worker process, which attaches its own
Redis client and runs it. A computation over its budget answers `504 timeout` and its worker is
killed and replaced, so a runaway query cannot keep a worker busy. Identical requests arriving while
one is being computed share its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import pickle
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import redis
from prometheus_client import Counter

from schemas.dates import DateParseError
from schemas.errors import RequestError
from schemas.settings import tune_gc
from serving.errors import ApiError, unavailable, validation
from state.archive import Archive
from state.connection import connect
from state.reads import StateReader
from state.registry import DefinitionRegistry
from state.summaries import SummaryStore

log = logging.getLogger("insightflow.compute")
COMPUTED = Counter("insightflow_computations", "Insight computations run in a worker process")
SHARED = Counter("insightflow_computations_shared", "Requests answered by an identical computation in flight")
TIMED_OUT = Counter("insightflow_computations_timed_out", "Computations over their time budget (worker replaced)")

WORKER_NICENESS = 10


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """Build many small objects without the cyclic collector: each of its passes over the oldest
    generation rescans every object built so far, which made reading millions of kept events
    quadratic. What they hold has no cycles, so nothing is left for it to free."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
_worker_client: redis.Redis | None = None


def worker_redis() -> redis.Redis:
    """The Redis client of this process: a worker's own, attached to every query it receives."""
    if _worker_client is None:
        raise RuntimeError("not in a compute worker")
    return _worker_client


ARCHIVE_CATCH_UP_S = 3.0  # how long a query waits for the archive to take what state counted
ROWS_PER_PENDING_PERSON = 40  # see `archive_quicker`


def archive_quicker(pending: int, rows: int) -> bool:
    """Whether the archive's columns answer a built definition sooner than its summaries would,
    given its `pending` persons (dirty, or merged and not marked yet) and the project's archived
    `rows`. A query summarises its pending persons itself, reading and walking each one's whole kept
    log: 75 µs a person after a 500,000-event backlog, 210 µs after 5 M (their logs are longer). The
    archive answers in about 1.2 µs per archived row (`bench/README.md`). So the archive, from a
    pending person per 40 rows: after a backlog, not while live events trickle in."""
    return rows > 0 and pending * ROWS_PER_PENDING_PERSON > rows


def archive_complete(archive: Archive, state: StateReader, project_id: int) -> bool:
    """Whether the archive holds every event the project's state counted (the archive then answers
    exactly what state would). State counts a batch before the archive takes it, so the archive is
    given up to `ARCHIVE_CATCH_UP_S` to take the batches counted when this began (a backlog's batch
    takes a second or two); a project whose history predates its archive never passes."""
    counted = state.events_counted(project_id)
    deadline = time.monotonic() + ARCHIVE_CATCH_UP_S
    while archive.rows(project_id) < counted:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class AnsweredFromArchive:
    """A query over one definition that the event archive answers exactly (the same rule over the
    same archived columns) while the definition is not ready, or while a backlog's persons are
    pending (`archive_quicker`): registered as always, and then answered from the archive if the
    archive holds every event state counted.
    Used with `Computation`; the query sets `_candidate` (its archive, or None when it cannot be
    answered so) and `_backlog_persons`."""

    redis: redis.Redis
    project: Any
    request: Any
    state: StateReader
    _candidate: Archive | None = None
    archive: Archive | None = None  # set by `prepare`: the archive answers
    _backlog_persons: int
    _backlog = False  # set by `prepare`: the archive answers a built definition with many persons pending

    def _building(self) -> bool:
        return DefinitionRegistry(self.redis).status(self.project.id, self.request.definition.hash)[0] != "ready"

    def _pending_backlog(self, archive: Archive) -> bool:
        """A backlog's persons pending: at least `_backlog_persons` (`Settings.archive_backlog_persons`),
        and the archive the quicker answer (its rows are read only then)."""
        pending = SummaryStore(self.redis).pending(self.project.id, self.request.definition.hash)
        return pending >= self._backlog_persons and archive_quicker(pending, archive.rows(self.project.id))

    def prepare(self) -> None:
        if self._candidate is None or self.archive is not None:
            return
        building = self._building()
        backlog = not building and self._pending_backlog(self._candidate)
        if (building or backlog) and archive_complete(self._candidate, self.state, self.project.id):
            self.archive, self._backlog = self._candidate, backlog

    def answers_from_archive(self) -> bool:
        return self.archive is not None

    def answering_archive(self) -> Archive | None:
        """The archive, while it answers: `prepare` picked it, for a backlog or while the definition
        is still building (once built meanwhile, its own state answers)."""
        return self.archive if self.archive is not None and (self._backlog or self._building()) else None


class Computation:
    """Base of the query classes: pickled without their Redis client, given the worker's on arrival."""

    redis: redis.Redis
    project: Any

    @property
    def state(self) -> StateReader:
        """Reads of the project's insight state (state/reads.py) through this process's client, merged
        persons read as the person they became. Kept for the query: one read of the merges."""
        reader = self.__dict__.get("_state")
        if reader is None:
            reader = self.__dict__["_state"] = StateReader(self.redis, self.project.id)
        return reader

    def prepare(self) -> None:
        """Blocking reads a query makes before `definitions()` can say what it reads; the API runs
        it off the event loop (nothing to do for most queries)."""

    def answers_from_archive(self) -> bool:
        """Whether the event archive answers it: then it answers now, though its definitions may still
        be building."""
        return False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("redis", None)
        state.pop("_state", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if _worker_client is not None:
            self.redis = _worker_client


def _worker(conn: Connection, redis_url: str, cache_mb: int) -> None:
    """A worker process: receive (query, method, args), answer ("ok", result) or a failure."""
    global _worker_client
    from state.summaries import SUMMARIES

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Below the API, broker, dataflow and Redis in CPU priority: on a machine with few cores a query
    # that computes for seconds must not take their time slices from capture and health checks.
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    tune_gc()
    _worker_client = connect(redis_url)
    SUMMARIES.configure(cache_mb)
    conn.send_bytes(b"ready")
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            query, method, args = pickle.loads(payload)
            answer: tuple[Any, ...] = ("ok", getattr(query, method)(*args))
        except RequestError as exc:
            answer = ("request", exc.detail, exc.attr, exc.code)
        except DateParseError as exc:
            answer = ("request", str(exc), exc.attr or "date_from", "invalid_input")
        except ApiError as exc:
            answer = ("api", exc.status, exc.type, exc.code, exc.detail, exc.attr)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            answer = ("unavailable", str(exc))
        except Exception:
            log.error("query failed:\n%s", traceback.format_exc())
            answer = ("error",)
        try:
            conn.send_bytes(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
        except (EOFError, OSError, BrokenPipeError):
            return


@dataclass
class _Slot:
    process: Any
    conn: Connection


class QueryTimeout(ApiError):
    def __init__(self, budget: float) -> None:
        super().__init__(504, "server_error", "timeout",
                         f"This query took longer than {budget:g} s, its time budget. Narrow the date range, use a "
                         "coarser interval, or ask for fewer series or breakdown values.")


class Computations:
    """The worker pool. `run(query, method, *args, key=...)` awaits `query.method(*args)` computed in a
    worker; `key` names the request so identical ones in flight share one computation."""

    def __init__(self, redis_url: str, workers: int, budget_s: float, cache_mb: int) -> None:
        self.redis_url, self.budget, self.cache_mb = redis_url, budget_s, cache_mb
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded server process
        self._loop = asyncio.get_running_loop()
        self._idle: asyncio.Queue[_Slot] = asyncio.Queue()
        self._threads = ThreadPoolExecutor(max(1, workers), thread_name_prefix="compute")
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._closed = False
        for _ in range(max(1, workers)):
            self._slots.append(self._spawn())

    def _spawn(self) -> _Slot:
        """Start a worker; it joins the idle ones once it has started (its start-up, a second or two
        of imports, is nobody's time budget)."""
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_worker, args=(theirs, self.redis_url, self.cache_mb),
                                        name="insightflow-compute", daemon=True)
        process.start()
        theirs.close()
        slot = _Slot(process, ours)

        def started() -> None:
            try:
                ready = ours.recv_bytes() == b"ready"
            except (EOFError, OSError):
                ready = False
            if ready and not self._closed:
                self._loop.call_soon_threadsafe(self._idle.put_nowait, slot)
            elif not self._closed:
                log.error("a compute worker did not start (exit code %s)", process.exitcode)

        threading.Thread(target=started, name="compute-start", daemon=True).start()
        return slot

    async def run(self, query: Any, method: str, *args: Any, key: str | None = None) -> Any:
        if key is not None:
            shared = self._inflight.get(key)
            if shared is not None:
                SHARED.inc()
                return await asyncio.shield(shared)
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
            try:
                result = await self._compute(query, method, args)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning when nobody shared it
                raise
            finally:
                self._inflight.pop(key, None)
            future.set_result(result)
            return result
        return await self._compute(query, method, args)

    async def _compute(self, query: Any, method: str, args: tuple[Any, ...]) -> Any:
        payload = pickle.dumps((query, method, args), protocol=pickle.HIGHEST_PROTOCOL)
        COMPUTED.inc()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget
        try:
            slot = await asyncio.wait_for(self._idle.get(), self.budget)
        except TimeoutError as exc:
            raise QueryTimeout(self.budget) from exc
        try:
            answer = await asyncio.wait_for(loop.run_in_executor(self._threads, _roundtrip, slot, payload),
                                            max(0.001, deadline - loop.time()))
        except TimeoutError as exc:
            TIMED_OUT.inc()
            self._replace(slot, "over its time budget")
            raise QueryTimeout(self.budget) from exc
        except (EOFError, OSError) as exc:
            self._replace(slot, f"its worker died ({exc!r})")
            raise ApiError(500, "server_error", "error", "A server error occurred.") from exc
        self._idle.put_nowait(slot)
        return _unpack(answer)

    def _replace(self, slot: _Slot, why: str) -> None:
        log.warning("replacing a compute worker: a query was %s", why)
        with contextlib.suppress(Exception):
            slot.process.kill()
            slot.process.join(5)
            slot.conn.close()
        fresh = self._spawn()
        with self._lock:
            self._slots = [fresh if s is slot else s for s in self._slots]

    def close(self) -> None:
        self._closed = True
        for slot in self._slots:
            with contextlib.suppress(Exception):
                slot.conn.close()
                slot.process.kill()
                slot.process.join(5)
        self._threads.shutdown(wait=False, cancel_futures=True)


def _roundtrip(slot: _Slot, payload: bytes) -> tuple[Any, ...]:
    slot.conn.send_bytes(payload)
    return pickle.loads(slot.conn.recv_bytes())  # type: ignore[no-any-return]


def _unpack(answer: tuple[Any, ...]) -> Any:
    kind = answer[0]
    if kind == "ok":
        return answer[1]
    if kind == "request":
        _, detail, attr, code = answer
        raise validation(detail, attr, code)
    if kind == "api":
        _, status, type_, code, detail, attr = answer
        raise ApiError(status, type_, code, detail, attr)
    if kind == "unavailable":
        raise unavailable(f"Redis is unavailable ({answer[1]}). Retry later.")
    raise ApiError(500, "server_error", "error", "A server error occurred.")
