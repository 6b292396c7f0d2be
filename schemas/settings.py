"""Runtime settings, read from the environment (CONTRACT.md lists the variables)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

# Environment variable -> Settings field. docker-compose.yml and the CLI use exactly these names.
ENV_VARS = {
    "INSIGHTFLOW_REDIS_URL": "redis_url",
    "INSIGHTFLOW_KAFKA_BOOTSTRAP": "kafka_bootstrap",
    "INSIGHTFLOW_TOPIC": "topic",
    "INSIGHTFLOW_DLQ_TOPIC": "dlq_topic",
    "INSIGHTFLOW_PARTITIONS": "partitions",
    "INSIGHTFLOW_TEST_CLOCK": "test_clock",
    "INSIGHTFLOW_BLOCKING_TIMEOUT": "blocking_timeout_s",
    "INSIGHTFLOW_RATE_LIMIT": "rate_limit_per_minute",
    "INSIGHTFLOW_SUMMARY_CACHE_MB": "summary_cache_mb",
    "INSIGHTFLOW_QUERY_WORKERS": "query_workers",
    "INSIGHTFLOW_QUERY_TIMEOUT": "query_timeout_s",
    "INSIGHTFLOW_STATE_SHARDS": "state_shards",
    "INSIGHTFLOW_ARCHIVE_DIR": "archive_dir",
    "INSIGHTFLOW_SUMMARIES_WAIT_LAG": "summaries_wait_lag",
    "INSIGHTFLOW_ARCHIVE_BACKLOG_PERSONS": "archive_backlog_persons",
    "INSIGHTFLOW_BACKFILL_CHUNK": "backfill_chunk",
}


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic: str = "events"
    dlq_topic: str = "events_dlq"
    partitions: int = 8
    test_clock: bool = False
    api_port: int = 8000
    blocking_timeout_s: float = 30.0
    rate_limit_per_minute: int = 6000  # per personal API key, over the insight API
    summary_cache_mb: int = 1024  # decoded funnel/paths summaries a compute worker keeps (days, and ranges)
    query_workers: int = 2  # processes computing insights off the API's event loop
    query_timeout_s: float = 60.0  # a computation's time budget (504 timeout beyond it)
    state_shards: int = 1  # Redis hash tags one project's event state is spread over (state/keys.py)
    archive_dir: str = ".insightflow/archive"  # the event archive (state/archive.py); `up` puts it in its data
    # dir; '' turns it off (to measure what it costs: definitions then need the topic's whole history)
    # Live events not applied yet above which ready definitions' funnel and paths summaries wait (a
    # backlog: a replay, a burst). Each batch touching a person would summarise it again from all its
    # kept events, so a backlog cost the square of a person's events; summarised once caught up, once.
    summaries_wait_lag: int = 20_000
    # Persons a ready funnel or paths has pending (not summarised yet) from which the archive's columns
    # may answer it instead (serving/compute.py `archive_quicker`): a backlog's, which a query would
    # otherwise summarise itself (at 5 M events, 200,000 persons: 43 s).
    archive_backlog_persons: int = 10_000
    # Archived events a backfill evaluates over columns per step (a funnel or paths that keep their
    # events: a fifth of it). Live batches run between steps: smaller is fresher during a build, larger
    # builds faster (each step is a few hundred ms at the default).
    backfill_chunk: int = 250_000

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        topic = env.get("INSIGHTFLOW_TOPIC", cls.topic)
        return cls(
            redis_url=env.get("INSIGHTFLOW_REDIS_URL", cls.redis_url),
            kafka_bootstrap=env.get("INSIGHTFLOW_KAFKA_BOOTSTRAP", cls.kafka_bootstrap),
            topic=topic,
            dlq_topic=env.get("INSIGHTFLOW_DLQ_TOPIC", f"{topic}_dlq"),
            partitions=int(env.get("INSIGHTFLOW_PARTITIONS", cls.partitions)),
            test_clock=env.get("INSIGHTFLOW_TEST_CLOCK") == "1",
            blocking_timeout_s=float(env.get("INSIGHTFLOW_BLOCKING_TIMEOUT", cls.blocking_timeout_s)),
            rate_limit_per_minute=int(env.get("INSIGHTFLOW_RATE_LIMIT", cls.rate_limit_per_minute)),
            summary_cache_mb=int(env.get("INSIGHTFLOW_SUMMARY_CACHE_MB", cls.summary_cache_mb)),
            query_workers=int(env.get("INSIGHTFLOW_QUERY_WORKERS", os.cpu_count() or cls.query_workers)),
            query_timeout_s=float(env.get("INSIGHTFLOW_QUERY_TIMEOUT", cls.query_timeout_s)),
            state_shards=int(env.get("INSIGHTFLOW_STATE_SHARDS", cls.state_shards)),
            archive_dir=env.get("INSIGHTFLOW_ARCHIVE_DIR", cls.archive_dir),
            summaries_wait_lag=int(env.get("INSIGHTFLOW_SUMMARIES_WAIT_LAG", cls.summaries_wait_lag)),
            archive_backlog_persons=int(env.get("INSIGHTFLOW_ARCHIVE_BACKLOG_PERSONS", cls.archive_backlog_persons)),
            backfill_chunk=max(5, int(env.get("INSIGHTFLOW_BACKFILL_CHUNK", cls.backfill_chunk))),
        )


QUERY_YOUNG_OBJECTS = 100_000  # a query worker's young generation (CPython's default: 700); see `tune_gc`
DATAFLOW_YOUNG_OBJECTS = 2_000_000  # a dataflow process's: more than one batch builds


def tune_gc(young: int = QUERY_YOUNG_OBJECTS) -> None:
    """Collect cyclic garbage rarely, in the processes that build many objects per event or per
    query (dataflow workers, query workers). A young collection runs once `young` more objects that
    the collector tracks are alive than at the last one; reference counting still frees at once every
    object outside a cycle, so the figure bounds cyclic garbage, not memory in use.

    - With CPython's default (700) a dataflow's collector ran about 370 times a second and took a
      quarter of its time; a query summarising 40,000 dirty persons took 1.6 s, 1.18 s at 100,000.
    - A dataflow batch (up to 80,000 events) keeps about a dozen tracked objects per event alive
      until it is applied: at 100,000 a 500,000-event backlog ran about 55 young collections of 40 ms
      each, and two older ones of up to 0.4 s, about 6 µs per event (`bench/README.md`). At 2,000,000 a
      batch is freed before a collection is due, and that backlog ran none."""
    gc.set_threshold(young, 20, 100)
