"""The `insightflow` command line (CONTRACT.md): up, project create, key create, replay."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import redis
import typer

from schemas.projects import RegistryError
from schemas.settings import Settings
from serving import stack
from state.archive import Archive
from state.connection import LayoutMismatch, claim_state_shards, connect
from state.registry import Registry

app = typer.Typer(help="Insightflow: PostHog's insight API from incrementally maintained state.",
                  no_args_is_help=True, add_completion=False)
project_app = typer.Typer(help="Projects (tokens, time zone, week start, test-account filters).")
key_app = typer.Typer(help="Personal API keys.")
app.add_typer(project_app, name="project")
app.add_typer(key_app, name="key")

DataDir = Annotated[Path, typer.Option("--data-dir", envvar="INSIGHTFLOW_DATA_DIR",
                                       help="Where up keeps Redis data, recovery state, logs and pids.")]
DEFAULT_DIR = Path(".insightflow")


def _say(line: str) -> None:
    print(line, flush=True)


def _stack_file(data_dir: Path) -> Path:
    return data_dir / "stack.json"


def _stack_env(data_dir: Path) -> dict[str, str]:
    """Environment first, then what a running `up` wrote into DIR."""
    found: dict[str, str] = {}
    path = _stack_file(data_dir)
    if path.exists():
        found = json.loads(path.read_text())
    for name in ("INSIGHTFLOW_REDIS_URL", "INSIGHTFLOW_KAFKA_BOOTSTRAP", "INSIGHTFLOW_TOPIC"):
        if os.environ.get(name):
            found[name] = os.environ[name]
    return found


def _redis(data_dir: Path) -> redis.Redis:
    url = _stack_env(data_dir).get("INSIGHTFLOW_REDIS_URL")
    if not url:
        raise typer.BadParameter(f"no running stack found: set INSIGHTFLOW_REDIS_URL or start `insightflow up "
                                 f"--data-dir {data_dir}` first")
    return connect(url)


@project_app.command("create")
def project_create(
    id: Annotated[int, typer.Option("--id", help="Project id (positive integer).")],
    name: Annotated[str | None, typer.Option("--name")] = None,
    token: Annotated[str | None, typer.Option("--token", help="Project API token; generated if absent.")] = None,
    timezone: Annotated[str | None, typer.Option("--timezone", help="IANA time zone, default UTC.")] = None,
    week_start: Annotated[int | None, typer.Option("--week-start", help="0 = Sunday, 1 = Monday.")] = None,
    test_account_filters: Annotated[str | None, typer.Option("--test-account-filters", help="JSON list.")] = None,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Create or update a project and print it as JSON."""
    filters = None
    if test_account_filters is not None:
        try:
            filters = json.loads(test_account_filters)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"--test-account-filters is not valid JSON: {exc}") from exc
    try:
        project = Registry(_redis(data_dir)).save_project(id, name=name, token=token, timezone=timezone,
                                                          week_start_day=week_start, test_account_filters=filters)
    except RegistryError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _say(project.to_json().decode())


@key_app.command("create")
def key_create(
    project: Annotated[int, typer.Option("--project", help="The project the key may read.")],
    scopes: Annotated[str, typer.Option("--scopes", help="e.g. insight:read,insight:write")] = "insight:read",
    value: Annotated[str | None, typer.Option("--value", help="Use this key value (phx_...).")] = None,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Create a personal API key and print it."""
    try:
        wanted = [s.strip() for s in scopes.split(",") if s.strip()]
        secret, key = Registry(_redis(data_dir)).create_key([project], wanted, value)
    except RegistryError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _say(orjson.dumps({"value": secret, "projects": key.projects, "scopes": key.scopes}).decode())


@app.command()
def replay(
    file: Annotated[Path | None, typer.Option("--file", help="NDJSON export: one PostHog event per line.")] = None,
    from_topic: Annotated[str | None, typer.Option("--from-topic", help="Copy a historical topic into state.")] = None,
    project: Annotated[int | None, typer.Option("--project", help="Project of events that name none.")] = None,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Replay history into state through the live dataflow; events already applied are skipped by uuid."""
    from serving.replay import replay_file, replay_topic

    env = _stack_env(data_dir)
    bootstrap = env.get("INSIGHTFLOW_KAFKA_BOOTSTRAP")
    if not bootstrap:
        raise typer.BadParameter("no running stack found: set INSIGHTFLOW_KAFKA_BOOTSTRAP or start `insightflow up`")
    topic = env.get("INSIGHTFLOW_TOPIC", "events")
    if (file is None) == (from_topic is None):
        raise typer.BadParameter("give exactly one of --file or --from-topic")
    redis_url = env.get("INSIGHTFLOW_REDIS_URL")
    if file is not None:
        sent, bad = replay_file(file, bootstrap, topic, project, redis_url)
    else:
        sent, bad = replay_topic(from_topic or "", bootstrap, topic, project, redis_url)
    _say(f"replayed {sent} events into {topic}; {bad} unusable line(s) skipped with their reasons above")
    if bad and not sent:
        raise typer.Exit(1)


@app.command()
def archive(
    project: Annotated[int | None, typer.Option("--project", help="Only this project.")] = None,
    export: Annotated[Path | None, typer.Option("--export", help="Write the project's events as NDJSON to this "
                                                "file ('-': standard output); `replay --file` reads it back.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per project instead of a table.")] = False,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """What the event archive holds per project (days, events, bytes), or export a project's events."""
    found = Archive(stack.archive_dir(data_dir))
    if export is not None:
        if project is None:
            raise typer.BadParameter("--export needs --project")
        if project not in found.projects():
            raise typer.BadParameter(f"the archive in {found.root} holds no events of project {project}")
        if str(export) == "-":
            try:
                found.export(project, sys.stdout.buffer)
                sys.stdout.buffer.flush()
            except BrokenPipeError:  # the reader stopped early (`| head`): not an error of ours
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        try:
            with open(export, "wb") as out:
                written = found.export(project, out)
        except OSError as exc:
            raise typer.BadParameter(f"cannot write {export}: {exc.strerror or exc}") from exc
        _say(f"exported {written} events of project {project} to {export}")
        return
    projects = [project] if project is not None else found.projects()
    rows = [found.coverage(p) for p in projects if p in found.projects()]
    if as_json:
        for c in rows:
            _say(orjson.dumps({"project": c.project_id, "events": c.events, "bytes": c.bytes, "days": c.days,
                               "first_day": c.first_day, "last_day": c.last_day, "segments": c.segments}).decode())
        return
    if not rows:
        _say(f"the archive in {found.root} holds no events" + (f" of project {project}" if project else ""))
        return
    _say(f"{'project':>8} {'events':>12} {'bytes':>14} {'B/event':>8} {'days':>6}  first day   last day    segments")
    for c in rows:
        _say(f"{c.project_id:>8} {c.events:>12,} {c.bytes:>14,} {c.bytes / max(1, c.events):>8.1f} {c.days:>6}  "
             f"{c.first_day or '-':<11} {c.last_day or '-':<11} {c.segments}")


@app.command()
def dataflow(
    recovery_dir: Annotated[Path, typer.Option("--recovery-dir", envvar="INSIGHTFLOW_RECOVERY_DIR")] = Path(
        ".insightflow/recovery"),
    process_id: Annotated[int, typer.Option("--process-id", envvar="INSIGHTFLOW_DATAFLOW_PROCESS_ID",
                                            help="This process's index in a Bytewax cluster.")] = 0,
    addresses: Annotated[str, typer.Option("--addresses", envvar="INSIGHTFLOW_DATAFLOW_ADDRESSES",
                                           help="host:port of every process of the cluster, ';'-separated "
                                                "(empty: a single process).")] = "",
) -> None:
    """Run only the dataflow (containers, clusters): recovery on, 0.2 s snapshot interval. Processes of
    one cluster share the recovery directory and fail and restart together."""
    peers = [a.strip() for a in addresses.split(";") if a.strip()]
    try:
        _check_state_shards(os.environ.get("INSIGHTFLOW_REDIS_URL", "redis://127.0.0.1:6379/0"))
    except stack.StackError as exc:
        _say(f"error: {exc}")
        raise typer.Exit(2) from exc
    if peers and not 0 <= process_id < len(peers):
        _say(f"error: --process-id {process_id} is not an index of the {len(peers)} addresses given")
        raise typer.Exit(2)
    if process_id == 0:
        stack.init_recovery(recovery_dir)
    else:  # process 0 creates the shared recovery store; two creating it at once would collide
        deadline = time.monotonic() + 300
        while not stack.recovery_ready(recovery_dir):
            if time.monotonic() > deadline:
                _say(f"error: no recovery store in {recovery_dir} after 300 s: is process 0 running?")
                raise typer.Exit(1)
            time.sleep(0.5)
    os.execv(sys.executable, stack.dataflow_argv(recovery_dir, process_id, peers))


@app.command()
def api(
    port: Annotated[int, typer.Option("--port", envvar="INSIGHTFLOW_API_PORT")] = 8000,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
) -> None:
    """Run only the API (containers, several replicas behind a load balancer)."""
    argv = stack.api_argv(port)
    argv[argv.index("--host") + 1] = host
    os.execv(sys.executable, argv)


@app.command()
def up(
    no_demo: Annotated[bool, typer.Option("--no-demo", help="Start without capturing demo data.")] = False,
    api_port: Annotated[int, typer.Option("--api-port", envvar="INSIGHTFLOW_API_PORT")] = 8000,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Start Redis, the broker, the dataflow and the API in the foreground (what the environment lacks)."""
    try:
        supervisor = Supervisor(data_dir.resolve(), api_port, demo=not no_demo)
    except stack.StackError as exc:
        _say(f"error: {exc}")
        raise typer.Exit(1) from exc
    supervisor.run()


DRAIN_TIMEOUT_S = float(os.environ.get("INSIGHTFLOW_DRAIN_TIMEOUT", "120"))
DRAIN_SETTLE_S = 1.0  # lag must read 0 this long before the stop goes on
DRAIN_RESIGNAL_S = 2.0  # how long the API may take to report it refuses events before it is told again


def _check_state_shards(redis_url: str) -> None:
    """Refuse to start a dataflow whose INSIGHTFLOW_STATE_SHARDS disagrees with the state in Redis,
    saying so, instead of failing inside the dataflow. Redis not reachable yet: the dataflow waits
    for it and checks then."""
    try:
        claim_state_shards(connect(redis_url), Settings.from_env().state_shards)
    except LayoutMismatch as exc:
        raise stack.StackError(str(exc)) from exc
    except (redis.RedisError, ValueError):
        return


def _dataflow_processes() -> int:
    """`INSIGHTFLOW_DATAFLOW_PROCESSES`: dataflow processes `up` runs as one Bytewax cluster (default 1)."""
    raw = os.environ.get("INSIGHTFLOW_DATAFLOW_PROCESSES", "1")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 64:
        raise stack.StackError(f"INSIGHTFLOW_DATAFLOW_PROCESSES must be a whole number from 1 to 64, not {raw!r}")
    return value


@dataclass
class _Restarts:
    """Backoff for a process that keeps failing: at once the first time, then 1.5 s doubling up to 30 s
    while it keeps exiting (on its own) within 30 s of its start."""

    started: float = 0.0
    quick_exits: int = 0
    due: float | None = None

    def schedule(self, now: float, killed: bool = False) -> float:
        """When to restart after an exit; `killed` (by a signal: kill -9, the OOM killer) is not a
        crash of the process's own making, so it never counts toward the backoff."""
        if killed:
            self.quick_exits = 0
        else:
            self.quick_exits = self.quick_exits + 1 if now - self.started < 30 else 1
        delay = 0.0 if self.quick_exits <= 1 else min(30.0, 1.5 * 2 ** (self.quick_exits - 2))
        self.due = now + delay
        return delay


class Supervisor:
    """`insightflow up`: starts what the environment lacks, restarts what dies, and stops without
    losing what capture acknowledged (it drains first)."""

    def __init__(self, data_dir: Path, api_port: int, demo: bool) -> None:
        self.data_dir, self.api_port, self.demo = data_dir, api_port, demo
        self.logs = data_dir / "logs"
        self.pids = data_dir / "pids"
        self.procs: dict[str, stack.Managed] = {}
        self.env: dict[str, str] = {}
        self.restarts: dict[str, _Restarts] = {}
        self.redis_port: int | None = None
        self.broker_port: int | None = None
        self.topics: list[str] = []
        self.signals = 0
        self.dataflow_processes = _dataflow_processes()
        # What is started and restarted together: a Bytewax cluster's processes fail together.
        self.units = {"redis": ["redis"], "broker": ["broker"],
                      "dataflow": stack.dataflow_names(self.dataflow_processes), "api": ["api"]}

    def _record(self, managed: stack.Managed) -> None:
        self.procs[managed.name] = managed
        self.restarts.setdefault(managed.name, _Restarts()).started = time.monotonic()
        self.pids.mkdir(parents=True, exist_ok=True)
        (self.pids / f"{managed.name}.pid").write_text(f"{managed.proc.pid}\n")

    def _signal(self, *_: Any) -> None:
        self.signals += 1
        if self.signals == 2:
            _say("stopping now (second signal): events not yet applied may be lost")

    @property
    def _stopping(self) -> bool:
        return self.signals > 0

    def _claim(self) -> None:
        """One `up` per data dir (its Redis files and recovery state are not to be shared), and a free
        API port, checked before anything starts."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.data_dir / "up.lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "unknown"
            raise stack.StackError(f"insightflow up is already running on {self.data_dir} (pid {owner}); stop it, "
                                   "or give another --data-dir") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()
        if stack.port_taken(self.api_port):
            raise stack.StackError(f"port {self.api_port} is already in use: stop what holds it, or choose another "
                                   "with --api-port")

    def run(self) -> None:
        signal.signal(signal.SIGINT, self._signal)
        signal.signal(signal.SIGTERM, self._signal)
        try:
            self._claim()
        except stack.StackError as exc:
            _say(f"error: {exc}")
            raise typer.Exit(1) from exc
        try:
            self._start()
            while not self._stopping:
                self._supervise()
                time.sleep(0.5)
            self._drain()
        except stack.StackError as exc:
            _say(f"error: {exc}")
            raise typer.Exit(1) from exc
        finally:
            self._shutdown()

    def _create_topics(self) -> None:
        from state.topics import ensure_topics

        ensure_topics(self.env["INSIGHTFLOW_KAFKA_BOOTSTRAP"], self.topics,
                      int(os.environ.get("INSIGHTFLOW_PARTITIONS", "8")))

    def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        redis_url = os.environ.get("INSIGHTFLOW_REDIS_URL")
        if not redis_url:
            managed, redis_url = stack.start_redis(self.data_dir / "redis", self.logs)
            self.redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
            self._record(managed)
        bootstrap = os.environ.get("INSIGHTFLOW_KAFKA_BOOTSTRAP")
        if not bootstrap:
            managed, bootstrap = stack.start_tansu(self.logs)
            self.broker_port = int(bootstrap.rsplit(":", 1)[1])
            self._record(managed)
        topic = os.environ.get("INSIGHTFLOW_TOPIC", "events")
        self.env = {"INSIGHTFLOW_REDIS_URL": redis_url, "INSIGHTFLOW_KAFKA_BOOTSTRAP": bootstrap,
                    "INSIGHTFLOW_TOPIC": topic, "INSIGHTFLOW_ARCHIVE_DIR": str(stack.archive_dir(self.data_dir))}
        self.topics = [topic, os.environ.get("INSIGHTFLOW_DLQ_TOPIC", f"{topic}_dlq")]
        self._create_topics()
        self._say_if_topic_new(redis_url)
        _stack_file(self.data_dir).write_text(json.dumps({**self.env, "api": self.url}))
        _check_state_shards(redis_url)
        for managed in self._start_dataflow():
            self._record(managed)
        self._record(stack.start_api(self.api_port, self.logs, self.env))
        self._wait_ready()
        if self.demo:
            self._load_demo(redis_url)
        _say(f"ready: {self.url}")

    def _say_if_topic_new(self, redis_url: str) -> None:
        """State holds events of an events topic the broker no longer has (the embedded broker keeps
        no topics across restarts): say so, and where history now comes from."""
        from state.stream import Stream
        from state.topics import topic_id

        try:
            known = Stream(connect(redis_url), self.env["INSIGHTFLOW_TOPIC"]).progress().topic_id
        except redis.RedisError:
            return
        if known is None or known == topic_id(self.env["INSIGHTFLOW_KAFKA_BOOTSTRAP"], self.env["INSIGHTFLOW_TOPIC"]):
            return
        archive = stack.archive_dir(self.data_dir)
        projects, events, size = Archive(archive).totals()
        _say(f"the events topic is new (the broker kept none of its events: the embedded one keeps nothing across "
             f"restarts); the dataflow reads it from its start, and new definitions read the history before it from "
             f"the archive in {archive} ({events} events of {projects} project(s), {size / 1e6:.1f} MB)")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _readyz(self) -> dict[str, Any]:
        try:
            return dict(httpx.get(f"{self.url}/readyz", timeout=3).json())
        except (httpx.HTTPError, ValueError):
            return {}

    def _wait_ready(self, timeout: float = 60.0, lag_zero: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self._readyz()
            if body.get("redis") and body.get("kafka") and (not lag_zero or body.get("lag_events") == 0):
                return
            for managed in self.procs.values():
                if not managed.alive():
                    raise stack.StackError(f"{managed.name} exited while starting; see {managed.log_path}")
            time.sleep(0.2)
        raise stack.StackError(f"the stack did not become ready within {timeout:.0f}s; logs in {self.logs}")

    def _load_demo(self, redis_url: str) -> None:
        from serving.demo import DEMO_KEY, DEMO_PROJECT_ID, DEMO_TOKEN, demo_events

        registry = Registry(connect(redis_url))
        registry.save_project(DEMO_PROJECT_ID, name="Demo", token=DEMO_TOKEN)
        if registry.find_key(DEMO_KEY) is None:
            registry.create_key([DEMO_PROJECT_ID], ["insight:read", "insight:write"], DEMO_KEY)
        events = list(demo_events())
        with httpx.Client(timeout=60) as client:
            for start in range(0, len(events), 1000):
                reply = client.post(f"{self.url}/batch/", json={"api_key": DEMO_TOKEN,
                                                                "batch": events[start:start + 1000]})
                reply.raise_for_status()
        self._wait_ready(timeout=120, lag_zero=True)
        _say(f"demo: {len(events)} events captured into project {DEMO_PROJECT_ID} (token {DEMO_TOKEN}); "
             f"personal API key {DEMO_KEY}")

    def _start_dataflow(self) -> list[stack.Managed]:
        return stack.start_dataflow_cluster(self.data_dir / "recovery", self.logs, self.env, self.dataflow_processes)

    def _supervise(self) -> None:
        """Reap and restart what died: Redis on its data dir (AOF), the broker (empty: say what that
        loses), the dataflow and the API; a process that keeps dying is restarted with backoff. The
        dataflow's processes are one unit: when one dies the others are stopped and all restart."""
        now = time.monotonic()
        for unit, names in self.units.items():
            members = [self.procs[n] for n in names if n in self.procs]
            dead = [m for m in members if not m.alive()]
            if not dead:
                continue
            pending = self.restarts.setdefault(unit, _Restarts())
            if pending.due is None:
                codes = [m.proc.returncode for m in dead]  # alive() reaped them: no zombie is left behind
                delay = pending.schedule(now, killed=any(c is not None and c < 0 for c in codes))
                later = f"; restarting in {delay:.0f} s" if delay >= 1 else ""
                for managed, code in zip(dead, codes, strict=True):
                    (self.pids / f"{managed.name}.pid").unlink(missing_ok=True)
                    _say(f"{managed.name} exited with code {code}{later}")
                for managed in members:
                    if managed.alive():
                        _say(f"stopping {managed.name} (pid {managed.proc.pid}): its cluster restarts as one")
                        managed.stop()
                        (self.pids / f"{managed.name}.pid").unlink(missing_ok=True)
            if now < (pending.due or 0):
                continue
            try:
                restarted = self._restart(unit)
            except (stack.StackError, OSError) as exc:
                _say(f"could not restart {unit}: {exc}")
                pending.schedule(time.monotonic())
                continue
            pending.due = None
            for managed in restarted:
                self._record(managed)
            pids = ", ".join(f"{m.name} pid {m.proc.pid}" for m in restarted[1:])
            _say(f"restarted {unit}; pid {restarted[0].proc.pid}{f' ({pids})' if pids else ''}"
                 f"{self._restart_note(unit)}")

    def _restart(self, unit: str) -> list[stack.Managed]:
        if unit == "redis":
            managed, _ = stack.start_redis(self.data_dir / "redis", self.logs, self.redis_port, wait_loaded=False)
            return [managed]
        if unit == "broker":
            managed, _ = stack.start_tansu(self.logs, self.broker_port)
            self._create_topics()
            for name in self.units["dataflow"]:  # its sources must see the new topics from their start
                dataflow = self.procs.get(name)
                if dataflow is not None:
                    dataflow.stop()
            return [managed]
        if unit == "dataflow":
            return self._start_dataflow()
        return [stack.start_api(self.api_port, self.logs, self.env)]

    @staticmethod
    def _restart_note(name: str) -> str:
        if name == "redis":
            return " (state from its append-only file; the dataflow re-applies what it had not synced)"
        if name == "broker":
            return (" (the embedded broker keeps nothing: events acknowledged but not yet applied were lost, "
                    "run Apache Kafka to keep them; history already applied stays in the archive)")
        return ""

    def _drain(self) -> None:
        """Stop accepting events, then wait (bounded) until the dataflow applied every acknowledged one."""
        api = self.procs.get("api")
        if self.signals > 1 or api is None or not api.alive():
            return
        os.kill(api.proc.pid, signal.SIGUSR1)  # capture answers 503 from now on
        embedded = "broker" in self.procs
        _say(f"stopping: capture refuses new events; waiting up to {DRAIN_TIMEOUT_S:.0f} s for the dataflow "
             "to apply every acknowledged event (Ctrl-C again to stop at once)")
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        lag: Any = None
        said, signalled = 0.0, time.monotonic()
        settled: float | None = None  # since when lag has read 0
        while time.monotonic() < deadline and self.signals < 2:
            self._supervise()
            body = self._readyz()
            lag = body.get("lag_events")
            refusing = bool(body.get("draining"))
            if body and not refusing and time.monotonic() - signalled >= DRAIN_RESIGNAL_S:
                # The API has not taken the signal, or was restarted meanwhile and never had it: capture
                # still accepts, so no lag reading means the end. Tell it again.
                api = self.procs.get("api")
                if api is not None and api.alive():
                    _say("stopping: the API does not report that it refuses events yet; telling it again")
                    os.kill(api.proc.pid, signal.SIGUSR1)
                signalled = time.monotonic()
            if lag != 0 or not refusing:
                settled = None
            elif settled is None:
                settled = time.monotonic()
            elif time.monotonic() - settled >= DRAIN_SETTLE_S:
                # Still 0 a moment later: a capture request that passed the check before it was told
                # to refuse has been acknowledged and applied too, so the dataflow is idle when stopped
                # (the embedded broker forgets what was not applied, and the archive what was not written).
                _say("stopping: every acknowledged event is applied")
                return
            if lag != 0 and time.monotonic() - said >= 5:
                _say(f"stopping: {lag if lag is not None else 'unknown (Redis or the API is away)'} "
                     "acknowledged event(s) still to apply")
                said = time.monotonic()
            time.sleep(0.2)
        where = ("the embedded broker keeps nothing, so they are lost" if embedded
                 else "they stay in Kafka and are applied when the dataflow runs again")
        _say(f"stopping: {lag if lag is not None else 'an unknown number of'} acknowledged event(s) not applied; "
             f"{where}")

    def _shutdown(self) -> None:
        for name in ("api", *self.units["dataflow"], "broker", "redis"):
            managed = self.procs.get(name)
            if managed is None:
                continue
            if managed.alive():
                _say(f"stopping {name} (pid {managed.proc.pid})")
                if managed.stop():
                    _say(f"{name} did not stop within 10 s: killed")
            (self.pids / f"{name}.pid").unlink(missing_ok=True)
        _stack_file(self.data_dir).unlink(missing_ok=True)
        _say("stopped")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
