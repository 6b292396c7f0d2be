"""Every Redis key the project uses, in one place.

Keys of a project carry the hash tag `{p<id>}` so a Redis Cluster keeps a project on one shard, and
the state-layout version, so a layout change starts fresh instead of mixing meanings.
"""

from __future__ import annotations

import zlib

LAYOUT = "v1"
SEEN_BUCKETS = 1 << 16

# Global registry keys (not project state).
PROJECTS = "insightflow:projects"          # hash id -> project JSON
TOKENS = "insightflow:tokens"              # hash token -> id
API_KEYS = "insightflow:apikeys"           # hash sha256(key) -> key JSON


def stream(topic: str) -> str:
    """Per topic: applied offsets, known end offsets, topic id, DLQ count (for /readyz lag)."""
    return f"insightflow:stream:{{{topic}}}"


def dlq_seen(topic: str) -> str:
    return f"insightflow:dlqseen:{{{topic}}}"


def project_prefix(project_id: int) -> str:
    return f"{{p{project_id}}}:{LAYOUT}:"


def seen_bucket(uuid: str) -> str:
    """Dedupe bucket of an event uuid: small hashes stay listpack-encoded (docs/measured.md)."""
    return format(zlib.crc32(uuid.encode()) % SEEN_BUCKETS, "04x")


def event_names(pid: int) -> str:
    return project_prefix(pid) + "events"


def hour_counts(pid: int, event: str) -> str:
    """Hash: project-zone hour start (epoch s) -> events."""
    return f"{project_prefix(pid)}ch:{event}"


def day_counts(pid: int, event: str) -> str:
    """Hash: project-zone date YYYYMMDD -> events."""
    return f"{project_prefix(pid)}cd:{event}"


def day_persons(pid: int, event: str, day: str) -> str:
    """Bitmap of person ids (bit i = person i) with the event on that project-zone day."""
    return f"{project_prefix(pid)}ud:{event}:{day}"


def hour_persons(pid: int, event: str, hour: int) -> str:
    """Bitmap of person ids with the event in that project-zone hour."""
    return f"{project_prefix(pid)}uh:{event}:{hour}"


def first_seen(pid: int, event: str) -> str:
    """Hash: person id -> 'ts_ms:hour:day' of the person's first event of that name."""
    return f"{project_prefix(pid)}fs:{event}"


def first_time_hour_counts(pid: int, event: str) -> str:
    """Hash: project-zone hour start -> persons whose first event of that name is in the hour."""
    return f"{project_prefix(pid)}fh:{event}"


def first_time_day_counts(pid: int, event: str) -> str:
    """Hash: project-zone date YYYYMMDD -> persons whose first event of that name is on the day."""
    return f"{project_prefix(pid)}fd:{event}"


def distinct_ids(pid: int) -> str:
    """Hash: distinct_id -> person id."""
    return project_prefix(pid) + "pdi"


def person_properties(pid: int, person: int | str) -> str:
    return f"{project_prefix(pid)}pp:{person}"


def person_distinct_ids(pid: int, person: int | str) -> str:
    """Set of a person's distinct ids."""
    return f"{project_prefix(pid)}pd:{person}"


def project_meta(pid: int) -> str:
    """Hash of project facts the state keeps (`earliest_ms`: the earliest event time applied)."""
    return project_prefix(pid) + "meta"


def definitions(pid: int) -> str:
    """Hash: definition hash -> definition JSON, for every registered definition of the project."""
    return project_prefix(pid) + "defs"


def saved_insights(pid: int) -> tuple[str, str, str]:
    """(hash id -> insight JSON, id counter, hash short_id -> id)."""
    prefix = project_prefix(pid)
    return prefix + "insights", prefix + "insight_seq", prefix + "insight_short"


def insight_views(pid: int, owner: str) -> str:
    """Sorted set: insight id -> last time this owner viewed it."""
    return f"{project_prefix(pid)}views:{owner}"


def insight_access(pid: int, insight_id: int) -> str:
    """Hash of an insight's access entries."""
    return f"{project_prefix(pid)}acl:{insight_id}"


def first_time_day_persons(pid: int, event: str, day: str) -> str:
    """Bitmap of persons whose first event of that name is on that project-zone day."""
    return f"{project_prefix(pid)}fud:{event}:{day}"


def first_time_hour_persons(pid: int, event: str, hour: int) -> str:
    """Bitmap of persons whose first event of that name is in that project-zone hour."""
    return f"{project_prefix(pid)}fuh:{event}:{hour}"


def definitions_generation(pid: int) -> str:
    """Counter raised by every registration; the apply script refuses batches planned before it."""
    return project_prefix(pid) + "defgen"


def failed_definitions(pid: int) -> str:
    """Hash: definition hash -> why its state could not be kept (it answers that reason, 400)."""
    return project_prefix(pid) + "dfail"


def project_applied(pid: int) -> str:
    """Hash: partition -> next offset whose events of this project are applied (atomic with state)."""
    return project_prefix(pid) + "applied"


def definition_prefix(pid: int, h: str) -> str:
    """State of a registered definition (hash h); suffixes as written by state/store.py:
    `ch:<bv>`/`cd:<bv>` counts, `uh:<bv>:<hour>`/`ud:<bv>:<day>` persons, `bv` breakdown values,
    `vs:<bv>` property sums/counts/min/max (fields `h<hour>:s` …, `d<day>:s` …), `vl:<bv>:<day>` and
    `vlh:<bv>:<hour>` property values, `pa:<bv>:<day>` and `pah:<bv>:<hour>` events per person."""
    return f"{project_prefix(pid)}d:{h}:"


def definition_events(prefix: str, day: str) -> str:
    """List of the events a funnel or paths definition keeps for a project-zone day (`fe:<day>`)."""
    return f"{prefix}fe:{day}"


def definition_key(prefix: str, kind: str, bv: str = "", bucket: str | int | None = None) -> str:
    """A key of a definition's state: `kind` is one of ch, cd, uh, ud, bv, vs, vl, vlh, pa, pah (the
    suffixes the apply script writes); `bucket` is an hour (epoch s) or a day (YYYYMMDD)."""
    if kind == "bv":
        return f"{prefix}bv"
    return f"{prefix}{kind}:{bv}" if bucket is None else f"{prefix}{kind}:{bv}:{bucket}"


# Per-person summaries of funnel and paths definitions (state/summaries.py), under the definition's
# prefix. Kinds: `fa` ordered-funnel attempt rows, `ps` path sessions.
SUMMARISED = "insightflow:summarised"  # set of "project:hash" definitions that keep summaries


def person_events(prefix: str, person: str | int) -> str:
    """String of one person's kept events, appended `<ts>,<day>,<uuid>,<len>:<json>` by the apply script."""
    return f"{prefix}pe:{person}"


def summary_dirty(prefix: str) -> str:
    """Set of persons whose events changed since they were summarised."""
    return f"{prefix}dirty"


def summary_rows(prefix: str, kind: str, day: str) -> str:
    """Hash: person -> that person's summary of this kind for a project-zone day."""
    return f"{prefix}{kind}:{day}"


def summary_versions(prefix: str, kind: str) -> str:
    """Hash: day -> version, raised whenever that day's summaries change (query caches key on it)."""
    return f"{prefix}{kind}v"


def irregular_persons(prefix: str) -> str:
    """Hash: person -> 1 for funnel persons with two step events at one instant (evaluated by the UDF)."""
    return f"{prefix}irr"
