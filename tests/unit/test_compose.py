"""docker-compose.yml agrees with the settings code (no Docker engine runs here, so it is parsed)."""

from __future__ import annotations

from pathlib import Path

import yaml

from schemas.settings import ENV_VARS, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


SINGLE = ("dataflow", "api")            # profile `single`: one Redis
SCALE = ("dataflow-0", "dataflow-1", "api-scale")  # profile `scale`: a Redis Cluster
CLUSTER = ("redis-0", "redis-1", "redis-2")


def test_services_and_dependencies() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"kafka", "redis", "topics", *SINGLE, *SCALE, *CLUSTER, "redis-cluster"}
    for name in (*SINGLE, *SCALE):
        deps = services[name]["depends_on"]
        if name in SINGLE:
            assert deps["redis"]["condition"] == "service_healthy"
        else:  # the cluster is formed first
            assert deps["redis-cluster"]["condition"] == "service_completed_successfully"
        assert deps["kafka"]["condition"] == "service_healthy"
        assert deps["topics"]["condition"] == "service_completed_successfully"
    for name in ("kafka", "redis", "api", "api-scale", *CLUSTER):
        assert services[name]["healthcheck"]["test"]
    for name in CLUSTER:
        assert {d: c["condition"] for d, c in services["redis-cluster"]["depends_on"].items()}[name] == \
            "service_healthy"


def test_kafka_is_single_node_kraft() -> None:
    env = COMPOSE["services"]["kafka"]["environment"]
    assert COMPOSE["services"]["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"


def test_redis_persists_with_aof_on_a_volume() -> None:
    volumes = set()
    for name in ("redis", *CLUSTER):
        redis = COMPOSE["services"][name]
        command = redis["command"]
        assert command[command.index("--appendonly") + 1] == "yes"
        assert next(v.split(":")[0] for v in redis["volumes"] if v.endswith(":/data")) in COMPOSE["volumes"]
        volumes.add(redis["volumes"][0])
        if name in CLUSTER:
            assert command[command.index("--cluster-enabled") + 1] == "yes"
    assert len(volumes) == 4  # a volume each
    create = " ".join(COMPOSE["services"]["redis-cluster"]["command"])
    assert "--cluster create " + " ".join(f"{n}:6379" for n in CLUSTER) in create


def test_environment_matches_settings() -> None:
    defaults = Settings()
    topics_cmd = " ".join(COMPOSE["services"]["topics"]["command"])
    for topic in (defaults.topic, defaults.dlq_topic):
        assert f"--topic {topic} --partitions {defaults.partitions}" in topics_cmd
    redis_port = COMPOSE["services"]["redis"]["ports"][0].split(":")[1]
    kafka_port = COMPOSE["services"]["kafka"]["ports"][0].split(":")[1]
    for name in (*SINGLE, *SCALE):
        env = COMPOSE["services"][name]["environment"]
        assert set(env) <= set(ENV_VARS), set(env) - set(ENV_VARS)
        assert env["INSIGHTFLOW_REDIS_URL"] == (f"redis://redis:{redis_port}/0" if name in SINGLE
                                                else "redis+cluster://redis-0:6379")
        assert env["INSIGHTFLOW_KAFKA_BOOTSTRAP"] == f"kafka:{kafka_port}"
        assert env["INSIGHTFLOW_TOPIC"] == defaults.topic and env["INSIGHTFLOW_DLQ_TOPIC"] == defaults.dlq_topic
    for name in ("api", "api-scale"):
        api = COMPOSE["services"][name]
        assert api["ports"] == [f"{defaults.api_port}:{defaults.api_port}"]
        assert api["command"][-1] == str(defaults.api_port)


def test_scale_profile_is_one_bytewax_cluster_instead_of_the_single_dataflow() -> None:
    """`COMPOSE_PROFILES=scale` swaps the one dataflow process for two that name each other; `.env`
    makes the single process the default."""
    from typer.main import get_command

    from serving.cli import app

    services = COMPOSE["services"]
    assert services["dataflow"]["profiles"] == ["single"]
    assert "COMPOSE_PROFILES=single" in (ROOT / ".env").read_text().splitlines()
    members = ["dataflow-0", "dataflow-1"]
    options = {p.opts[0] for p in get_command(app).commands["dataflow"].params}  # type: ignore[attr-defined]
    for index, name in enumerate(members):
        service = services[name]
        assert service["profiles"] == ["scale"] and service["restart"] == "unless-stopped"
        command = service["command"]
        assert set(o for o in command if o.startswith("--")) <= options
        assert command[command.index("--process-id") + 1] == str(index)
        addresses = command[command.index("--addresses") + 1].split(";")
        assert [a.split(":")[0] for a in addresses] == members
        assert service["environment"] == {**services["dataflow"]["environment"], "INSIGHTFLOW_STATE_SHARDS": "6",
                                          "INSIGHTFLOW_REDIS_URL": "redis+cluster://redis-0:6379"}
        assert service["volumes"] == services["dataflow"]["volumes"]  # one shared recovery store
    for name in ("redis", "api"):
        assert services[name]["profiles"] == ["single"]
    for name in (*CLUSTER, "redis-cluster", "api-scale"):
        assert services[name]["profiles"] == ["scale"]


def test_every_dataflow_archives_onto_one_volume_and_the_topic_is_a_buffer() -> None:
    """The archive is the history (state/archive.py): on a named volume every dataflow process shares
    (each writes its own manifests), and the events topic keeps a week, not forever."""
    services = COMPOSE["services"]
    for name in ("dataflow", "dataflow-0", "dataflow-1"):
        target = services[name]["environment"]["INSIGHTFLOW_ARCHIVE_DIR"]
        assert f"archive:{target}" in services[name]["volumes"]
    assert "archive" in COMPOSE["volumes"]
    topics_cmd = " ".join(COMPOSE["services"]["topics"]["command"])
    assert "--topic events --partitions 8 --replication-factor 1 --config retention.ms=604800000" in topics_cmd
