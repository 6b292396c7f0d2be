"""Every Redis key the project uses, declared once.

Keys of a project carry a hash tag, so every script and multi-key call stays within one Redis Cluster
slot, and the state-layout version, so a layout change starts fresh instead of mixing meanings.

A project's state is spread over `shards` state shards (`INSIGHTFLOW_STATE_SHARDS`, fixed when the
state is first written, `LAYOUT_KEY`): person p's event state (counts, person sets, first times, and
definitions' state: `SHARDED_PARTS`, `SHARDED_DEFINITION_PARTS`) lives in shard `p % shards`, tagged
`{p<id>.<shard>}`; shard 0 is the project's home `{p<id>}`, which also keeps everything else (persons,
uuid guards, definitions, saved insights). Counts add up over shards, person sets are disjoint.

The parts after a project's prefix (`PROJECT_PARTS`) and after a definition's prefix
(`DEFINITION_PARTS`) are tables the Lua scripts receive as `K` and `DK` (state/scripts.py), so a key
is spelled here and nowhere else; `declared(key)` tells whether a key is one of them (the key test
fails on any key written that is not).
"""

from __future__ import annotations

import re
import zlib

LAYOUT = "v1"
SEEN_BUCKETS = 1 << 16
GUARD_SEGMENT_RECORDS = 1 << 21  # guard records per string of the guard log (80 MB; a string holds 512 MB)

# Global keys (not project state).
PROJECTS = "insightflow:projects"          # hash id -> project JSON
TOKENS = "insightflow:tokens"              # hash token -> id
API_KEYS = "insightflow:apikeys"           # hash sha256(key) -> key JSON
BACKFILLS = "insightflow:backfills"        # set of "project:hash" definitions still building
SUMMARISED = "insightflow:summarised"      # set of "project:hash" definitions that keep summaries
LAYOUT_KEY = "insightflow:layout"          # hash: shards -> state shards per project

# A project's keys after its prefix, by name; a part ending in ':' is followed by a suffix.
PROJECT_PARTS: dict[str, str] = {
    "guard_log": "gl:",                    # string per segment: the uuid guards, in the order taken (records.py)
    "seen": "seen:",                       # hash per uuid bucket: uuid guards taken before the guard log (read only)
    "person_seq": "pseq",                  # counter of person ids
    "distinct_ids": "pdi",                 # hash distinct_id -> person
    "person_distinct_ids": "pd:",          # set per person
    "person_properties": "pp:",            # hash per person
    "person_property_times": "pt:",        # hash per person: property -> '<ts>' | 'o<ts>' | 'u<ts>'
    "identified": "identified",            # set of identified persons
    "merged": "pmerged",                   # hash merged person -> the person it became
    "merge_log": "pmlog",                  # list of 'merged:became', in the order merges were made
    "event_names": "events",               # set of event names seen
    "hour_counts": "ch:",                  # hash per event: hour -> events
    "day_counts": "cd:",                   # hash per event: day -> events
    "day_persons": "ud:",                  # bitmap per event and day
    "hour_persons": "uh:",                 # bitmap per event and hour
    "first_seen": "fs:",                   # hash per event: person -> 'ts:hour:day'
    "first_time_hour_counts": "fh:",
    "first_time_day_counts": "fd:",
    "first_time_hour_persons": "fuh:",
    "first_time_day_persons": "fud:",
    "shard_applied": "sapplied",           # per shard: hash partition -> next offset applied there
    "shard_generation": "sdefgen",         # per shard: definitions generation its batches must carry
    "meta": "meta",                        # hash: earliest_ms, legacy_guards
    "applied": "applied",                  # hash partition -> next offset applied (with the state)
    "definitions": "defs",                 # hash definition hash -> JSON
    "definitions_generation": "defgen",    # counter raised by every registration
    "failed_definitions": "dfail",         # hash definition hash -> reason
    "definition": "d:",                    # followed by `<hash>:` and a DEFINITION_PARTS part
    "insights": "insights",                # saved insights: hash id -> JSON
    "insight_seq": "insight_seq",
    "insight_short": "insight_short",      # hash short_id -> id
    "insight_views": "views:",             # sorted set per owner: insight id -> last viewed
    "insight_access": "acl:",              # hash per insight of access entries
    "scratch": "scratch",                  # per shard: a person set a backfill call ORs in (gone when it returns)
    "kept_log": "pk:",                     # per person: every summarised definition's kept events, by definition
}

# Summaries kept per person and day (dataflows/operators/summaries.py): kind -> what it holds.
SUMMARY_KINDS: dict[str, str] = {
    "fa": "ordered-funnel attempt rows",
    "fb": "ordered-funnel breakdown touches",
    "ps": "path sessions",
}

# A definition's keys after its prefix, by name.
DEFINITION_PARTS: dict[str, str] = {
    "meta": "meta",                        # status, registered_at, summaries, to_summarise, reason
    "handover": "ho",                      # per shard: hash tag:partition -> first offset applied live
    "backfill_fence": "bf",                # per shard: hash tag:partition -> last offset the backfill applied
    "backfill_bound": "bound",             # per shard: hash tag:partition -> where the backfill stops
    "backfill_done": "done",               # set of topic partitions (tag:partition) finished
    "backfill_progress": "bp",             # per shard: hash tag:partition -> last person written (persons' backfill)
    "hour_counts": "ch:",                  # per breakdown value
    "day_counts": "cd:",
    "hour_persons": "uh:",                 # per breakdown value and hour
    "day_persons": "ud:",
    "breakdown_values": "bv",
    "value_stats": "vs:",                  # per breakdown value: h<hour>/d<day> :s :n :min :max
    "day_values": "vl:",                   # per breakdown value and day
    "hour_values": "vlh:",
    "day_person_events": "pa:",            # per breakdown value and day: person -> events
    "hour_person_events": "pah:",
    "day_events": "fe:",                   # funnel events kept per day
    "person_events": "pe:",                # a person's kept events, as kept before the kept log (read beside it)
    "dirty": "dirty",                      # persons to summarise
    "irregular": "irr",                    # funnel persons with two step events at one instant
    "merges_marked": "mcur",               # how much of the project's merge log was marked dirty here
    **{f"{kind}_rows": f"{kind}:" for kind in SUMMARY_KINDS},
    **{f"{kind}_versions": f"{kind}v" for kind in SUMMARY_KINDS},
}


# Parts kept per state shard (the person's); the rest of a project's keys live in its home.
SHARDED_PARTS = ("hour_counts", "day_counts", "day_persons", "hour_persons", "first_seen", "first_time_hour_counts",
                 "first_time_day_counts", "first_time_hour_persons", "first_time_day_persons", "shard_applied",
                 "shard_generation", "scratch", "kept_log")
SHARDED_DEFINITION_PARTS = tuple(n for n in DEFINITION_PARTS if n not in ("meta", "backfill_done", "merges_marked"))


def _alternatives(parts: dict[str, str], but: str = "") -> str:
    return "|".join(re.escape(p) + (".*" if p.endswith(":") else "") for n, p in parts.items() if n != but)


_DECLARED = re.compile(
    "(?:" + "|".join([
        "|".join(re.escape(k) for k in (PROJECTS, TOKENS, API_KEYS, BACKFILLS, SUMMARISED, LAYOUT_KEY)),
        r"insightflow:(?:stream|dlqseen):\{[^}]+\}",
        r"insightflow:throttle:[^:]+:\d+",
        r"\{p\d+\}:" + LAYOUT + r":d:[0-9a-f]+:(?:" + _alternatives(DEFINITION_PARTS) + ")",
        r"\{p\d+\}:" + LAYOUT + ":(?:" + _alternatives(PROJECT_PARTS, but="definition") + ")",
        r"\{p\d+\.\d+\}:" + LAYOUT + r":d:[0-9a-f]+:(?:" + _alternatives(
            {n: DEFINITION_PARTS[n] for n in SHARDED_DEFINITION_PARTS}) + ")",
        r"\{p\d+\.\d+\}:" + LAYOUT + ":(?:" + _alternatives({n: PROJECT_PARTS[n] for n in SHARDED_PARTS}) + ")",
    ]) + ")",
    re.DOTALL,
)


def declared(key: str) -> bool:
    """Whether `key` is one of the keys declared here."""
    return _DECLARED.fullmatch(key) is not None


def _k(pid: int, name: str, *suffix: object) -> str:
    return project_prefix(pid) + PROJECT_PARTS[name] + ":".join(str(s) for s in suffix)


def throttle(key_hash: str, window: int) -> str:
    """Requests of one personal API key in one minute window (expires with it)."""
    return f"insightflow:throttle:{key_hash}:{window}"


def stream(topic: str) -> str:
    """Per topic: applied offsets, known end offsets, topic id, DLQ count (for /readyz lag)."""
    return f"insightflow:stream:{{{topic}}}"


def dlq_seen(topic: str) -> str:
    """Hash of dead-lettered record ids of a topic, so each is counted once."""
    return f"insightflow:dlqseen:{{{topic}}}"


def project_prefix(project_id: int) -> str:
    """The prefix of a project's home keys (and of its state shard 0)."""
    return f"{{p{project_id}}}:{LAYOUT}:"


def shard_prefix(project_id: int, shard: int) -> str:
    """The prefix of a project's keys in one state shard."""
    return project_prefix(project_id) if shard == 0 else f"{{p{project_id}.{shard}}}:{LAYOUT}:"


def topic_tag(topic_id: str) -> str:
    """A short tag of a topic's identity: uuid guards and shard fences name offsets with it, so a
    recreated topic (its offsets start again) is never mistaken for the old one."""
    return format(zlib.crc32(topic_id.encode()), "08x")


def partition_fence(tag: str, partition: int) -> str:
    """A topic partition as fences, bounds, handovers and the archive name it: `tag:partition`."""
    return f"{tag}:{partition}"


def shard_of(person: int | str, shards: int) -> int:
    """The state shard that keeps a person's event state."""
    return int(person) % shards


_TAG = re.compile(r"^\{p(\d+)(?:\.\d+)?\}:")
_SHARDED = re.compile(r"^\{p\d+(?:\.\d+)?\}:" + LAYOUT + ":(?:d:[0-9a-f]+:(?:" + _alternatives(
    {n: DEFINITION_PARTS[n] for n in SHARDED_DEFINITION_PARTS}) + ")|(?:" + _alternatives(
    {n: PROJECT_PARTS[n] for n in SHARDED_PARTS}) + "))$", re.DOTALL)


def sharded(key: str) -> bool:
    """Whether a project key is kept per state shard."""
    return _SHARDED.match(key) is not None


def in_shard(key: str, shard: int) -> str:
    """The same key in another state shard (a key named with any shard's prefix)."""
    found = _TAG.match(key)
    if found is None:
        raise ValueError(f"not a project key: {key!r}")
    return shard_prefix(int(found.group(1)), shard) + key[found.end() + len(LAYOUT) + 1:]


def in_shards(key: str, shards: int) -> list[str]:
    """Every shard's copy of a sharded key (the key alone when it is kept in the home)."""
    if shards == 1 or not sharded(key):
        return [key]
    return [in_shard(key, s) for s in range(shards)]


def seen_bucket(uuid: str) -> str:
    """Dedupe bucket of an event uuid: small hashes stay listpack-encoded (docs/measured.md)."""
    return format(zlib.crc32(uuid.encode()) % SEEN_BUCKETS, "04x")


def seen(pid: int, bucket: str) -> str:
    """Hash: uuid -> the copy applied (`tag:partition:offset:person`), for uuids of that bucket; only
    guards taken before the guard log, which is written instead now."""
    return _k(pid, "seen", bucket)


def guard_log(pid: int, segment: int) -> str:
    """String: segment `segment` of the project's guard log, `GUARD_SEGMENT_RECORDS` records each."""
    return _k(pid, "guard_log", segment)


def event_names(pid: int) -> str:
    return _k(pid, "event_names")


def hour_counts(pid: int, event: str) -> str:
    """Hash: project-zone hour start (epoch s) -> events."""
    return _k(pid, "hour_counts", event)


def day_counts(pid: int, event: str) -> str:
    """Hash: project-zone date YYYYMMDD -> events."""
    return _k(pid, "day_counts", event)


def day_persons(pid: int, event: str, day: str) -> str:
    """Bitmap of person ids (bit i = person i) with the event on that project-zone day."""
    return _k(pid, "day_persons", event, day)


def hour_persons(pid: int, event: str, hour: int) -> str:
    """Bitmap of person ids with the event in that project-zone hour."""
    return _k(pid, "hour_persons", event, hour)


def first_seen(pid: int, event: str) -> str:
    """Hash: person id -> 'ts_ms:hour:day' of the person's first event of that name."""
    return _k(pid, "first_seen", event)


def first_time_hour_counts(pid: int, event: str) -> str:
    """Hash: project-zone hour start -> persons whose first event of that name is in the hour."""
    return _k(pid, "first_time_hour_counts", event)


def first_time_day_counts(pid: int, event: str) -> str:
    """Hash: project-zone date YYYYMMDD -> persons whose first event of that name is on the day."""
    return _k(pid, "first_time_day_counts", event)


def first_time_day_persons(pid: int, event: str, day: str) -> str:
    """Bitmap of persons whose first event of that name is on that project-zone day."""
    return _k(pid, "first_time_day_persons", event, day)


def first_time_hour_persons(pid: int, event: str, hour: int) -> str:
    """Bitmap of persons whose first event of that name is in that project-zone hour."""
    return _k(pid, "first_time_hour_persons", event, hour)


def distinct_ids(pid: int) -> str:
    """Hash: distinct_id -> person id."""
    return _k(pid, "distinct_ids")


def merge_log(pid: int) -> str:
    """List of `<merged person>:<the person it became>`, in the order the merges were made."""
    return _k(pid, "merge_log")


def first_time_persons_bucket(pid: int, key: str) -> tuple[str, str | int] | None:
    """(event, bucket) of one of the project's first-time person sets (a day YYYYMMDD or an hour
    start), None for any other key."""
    for part, bucket_type in (("first_time_day_persons", str), ("first_time_hour_persons", int)):
        prefix = _k(pid, part)
        if key.startswith(prefix):
            name, _, bucket = key[len(prefix):].rpartition(":")
            return name, bucket_type(bucket)
    return None


def merged(pid: int) -> str:
    """Hash: merged person -> the person it became."""
    return _k(pid, "merged")


def person_properties(pid: int, person: int | str) -> str:
    return _k(pid, "person_properties", person)


def person_property_times(pid: int, person: int | str) -> str:
    """Hash: property -> when it last changed (codec: state/records.py)."""
    return _k(pid, "person_property_times", person)


def person_distinct_ids(pid: int, person: int | str) -> str:
    """Set of a person's distinct ids."""
    return _k(pid, "person_distinct_ids", person)


def project_meta(pid: int) -> str:
    """Hash of project facts the state keeps (`earliest_ms`: the earliest event time applied)."""
    return _k(pid, "meta")


def definitions(pid: int) -> str:
    """Hash: definition hash -> definition JSON, for every registered definition of the project."""
    return _k(pid, "definitions")


def saved_insights(pid: int) -> tuple[str, str, str]:
    """(hash id -> insight JSON, id counter, hash short_id -> id)."""
    return _k(pid, "insights"), _k(pid, "insight_seq"), _k(pid, "insight_short")


def insight_views(pid: int, owner: str) -> str:
    """Sorted set: insight id -> last time this owner viewed it."""
    return _k(pid, "insight_views", owner)


def insight_access(pid: int, insight_id: int) -> str:
    """Hash of an insight's access entries."""
    return _k(pid, "insight_access", insight_id)


def definitions_generation(pid: int) -> str:
    """Counter raised by every registration; the apply script refuses batches planned before it."""
    return _k(pid, "definitions_generation")


def failed_definitions(pid: int) -> str:
    """Hash: definition hash -> why its state could not be kept (it answers that reason, 400)."""
    return _k(pid, "failed_definitions")


def shard_applied(pid: int, shard: int) -> str:
    """Hash: partition -> next offset whose events are applied to this state shard (its fence)."""
    return shard_prefix(pid, shard) + PROJECT_PARTS["shard_applied"]


def shard_generation(pid: int, shard: int) -> str:
    """The definitions generation a batch applied to this shard must have been planned with (raised
    when a backfill fixes its bound there, state/lua/fix_bound.lua)."""
    return shard_prefix(pid, shard) + PROJECT_PARTS["shard_generation"]


def project_applied(pid: int) -> str:
    """Hash: partition -> next offset whose events of this project are applied (atomic with state)."""
    return _k(pid, "applied")


def definition_prefix(pid: int, h: str) -> str:
    """The prefix of a registered definition's (hash h) keys; the parts after it are DEFINITION_PARTS."""
    return f"{_k(pid, 'definition')}{h}:"


def definition_part(prefix: str, name: str, *suffix: object) -> str:
    """A key of a definition's state by its name in DEFINITION_PARTS."""
    return prefix + DEFINITION_PARTS[name] + ":".join(str(s) for s in suffix)


def definition_events(prefix: str, day: str) -> str:
    """List of the events a funnel or paths definition keeps for a project-zone day."""
    return definition_part(prefix, "day_events", day)


_KINDS = {"ch": "hour_counts", "cd": "day_counts", "uh": "hour_persons", "ud": "day_persons",
          "bv": "breakdown_values", "vs": "value_stats", "vl": "day_values", "vlh": "hour_values",
          "pa": "day_person_events", "pah": "hour_person_events"}


def definition_key(prefix: str, kind: str, bv: str = "", bucket: str | int | None = None) -> str:
    """A key of a trend definition's state: `kind` is one of ch, cd, uh, ud, bv, vs, vl, vlh, pa, pah
    (short names of DEFINITION_PARTS); `bucket` is an hour (epoch s) or a day (YYYYMMDD)."""
    name = _KINDS[kind]
    if kind == "bv":
        return definition_part(prefix, name)
    return definition_part(prefix, name, bv) if bucket is None else definition_part(prefix, name, bv, bucket)


def person_events(prefix: str, person: str | int) -> str:
    """String of one person's kept events for one definition, as the apply script appended them before
    the kept log (`kept_log`): read beside it until the summariser rewrites the person."""
    return definition_part(prefix, "person_events", person)


def kept_logs(project_id: int, shard: int) -> str:
    """The prefix of a state shard's kept logs (`kept_log` without the person): scripts and batched
    reads add the persons."""
    return shard_prefix(project_id, shard) + PROJECT_PARTS["kept_log"]


def kept_log(project_id: int, shard: int, person: str | int) -> str:
    """String of one person's kept events, every summarised definition's (state/records.py,
    `kept_append`): one append per person and chunk, however many definitions keep the events."""
    return kept_logs(project_id, shard) + str(person)


def summary_dirty(prefix: str) -> str:
    """Set of persons whose events changed since they were summarised."""
    return definition_part(prefix, "dirty")


def summary_rows(prefix: str, kind: str, day: str) -> str:
    """Hash: person -> that person's summary of this kind (SUMMARY_KINDS) for a project-zone day."""
    return definition_part(prefix, f"{kind}_rows", day)


def summary_versions(prefix: str, kind: str) -> str:
    """Hash: day -> version, raised whenever that day's summaries change (query caches key on it)."""
    return definition_part(prefix, f"{kind}_versions")


def merges_marked(prefix: str) -> str:
    """String: the length of the project's merge log whose merged persons were marked dirty for this
    definition (absent: none yet, not even those merged before the log existed)."""
    return definition_part(prefix, "merges_marked")


def irregular_persons(prefix: str) -> str:
    """Hash: person -> 1 for funnel persons with two step events at one instant (evaluated by the UDF)."""
    return definition_part(prefix, "irregular")


def definition_meta(prefix: str) -> str:
    """Hash: status, registered_at, summaries, to_summarise, reason."""
    return definition_part(prefix, "meta")


def handover(prefix: str) -> str:
    """Hash: partition -> the first offset a state shard applied this definition live."""
    return definition_part(prefix, "handover")


def backfill_fence(prefix: str) -> str:
    """Hash: partition -> the last offset the backfill applied (advanced with what it wrote)."""
    return definition_part(prefix, "backfill_fence")


def backfill_bound(prefix: str) -> str:
    """Hash: partition -> where the backfill stops."""
    return definition_part(prefix, "backfill_bound")


def backfill_progress(prefix: str) -> str:
    """Hash: partition -> the last person whose archived kept events are written, while a backfill
    written person by person has not moved its fence yet (backfill_persons.lua)."""
    return definition_part(prefix, "backfill_progress")


def backfill_done(prefix: str) -> str:
    """Set of partitions whose backfill is finished."""
    return definition_part(prefix, "backfill_done")
