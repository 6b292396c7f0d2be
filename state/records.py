"""Stored record formats: one codec each, used by whoever writes and whoever reads the record.

- kept events: `<ts>,<day>,<uuid>,<length>:<value>` back to back, one definition's. The kept log
  (`pk:<person>`, appended by the apply script) holds every definition's, each append
  `<definition>,<length>,<definition>,<length>...;<records>...` (records tagged `~` are padding);
  a person's strings of one definition (`pe:<person>`) written before the kept log hold its
  records bare;
- a day's funnel events (`fe:<day>` list entries, pushed by the apply script): `person|ts|uuid|value`;
- attempt rows (`fa:<day>` hash values): little-endian int64s, `steps + 1` per row
  (person, start, g_2..g_n);
- first and last touches (`fb:<day>` hash values): JSON `[person, first ms, first value, last ms,
  last value]`;
- path sessions (`ps:<day>` hash values): JSON list of sessions, each `[[ms...], [uuid...], [item...]]`;
- first time per person and event (`fs:<event>` hash values): `ts_ms:hour:day`;
- person property times (`pt:<person>` hash values, written by persons.lua): `<ts>` set by `$set`,
  `o<ts>` by `$set_once`, `u<ts>` unset;
- uuid guards (`gl:<segment>`, appended by the apply script): 40-byte little-endian records, the
  event's uuid (16 bytes, `guard_key`), then the copy counted: topic tag (`tag_code`), partition,
  offset, and the person it counted for (`GUARD_RECORD`). The guards written before the guard log
  (`seen:<bucket>` hash values): `tag:partition:offset:person`, or older `partition:offset[:person]`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True, slots=True)
class StoredEvent:
    ts_ms: int
    day: str        # project-zone day, YYYYMMDD
    uuid: str
    value: bytes    # what the event contributes (JSON), as the definition wrote it


def person_event_columns(raw: bytes) -> tuple[list[int], list[str], list[str], list[bytes], bytes]:
    """The readable records as columns (times, days, uuids, values), and what follows the first
    unreadable one (b"" when all are read)."""
    stamps: list[int] = []
    days: list[str] = []
    uuids: list[str] = []
    values: list[bytes] = []
    i, end, find = 0, len(raw), raw.index
    while i < end:
        try:
            a = find(b",", i)
            b = find(b",", a + 1)
            c = find(b",", b + 1)
            d = find(b":", c + 1)
            stop = d + 1 + int(raw[c + 1:d])
            if stop > end:
                raise ValueError("record runs past the end")
            stamp, day, uuid = int(raw[i:a]), raw[a + 1:b].decode(), raw[b + 1:c].decode()
        except (ValueError, UnicodeDecodeError):
            return stamps, days, uuids, values, raw[i:]
        stamps.append(stamp)
        days.append(day)
        uuids.append(uuid)
        values.append(raw[d + 1:stop])
        i = stop
    return stamps, days, uuids, values, b""


def read_person_events(raw: bytes) -> tuple[list[StoredEvent], bytes]:
    """The readable records, and what follows the first unreadable one (b"" when all are read)."""
    stamps, days, uuids, values, rest = person_event_columns(raw)
    return list(map(StoredEvent, stamps, days, uuids, values)), rest


def parse_person_events(raw: bytes) -> list[StoredEvent]:
    """A person's kept events; an unreadable record is an error here (the summariser drops it)."""
    events, rest = read_person_events(raw)
    if rest:
        raise ValueError(f"unreadable kept events from byte {len(raw) - len(rest)} on")
    return events


PADDING = b"~"  # the tag of records that only keep a rewritten kept log from getting shorter


def kept_append(blocks: Iterable[tuple[str | bytes, bytes]]) -> bytes:
    """One append to a kept log: the definitions and the lengths of their records, then the records:
    `<definition>,<length>,<definition>,<length>...;<records><records>...`. One header per append,
    not per definition: a reader walks a log header by header, in Python."""
    blocks = [(h.encode() if isinstance(h, str) else h, records) for h, records in blocks]
    return b",".join(b"%s,%d" % (h, len(r)) for h, r in blocks) + b";" + b"".join(r for _, r in blocks)


def kept_append_of_texts(by_definition: dict[str, str]) -> bytes:
    """`kept_append` of records given as text per definition, as the worker gathers them per batch:
    an ASCII append is encoded once, whole (its texts' lengths are their bytes')."""
    body = "".join(by_definition.values())
    if body.isascii():
        return (",".join([f"{h},{len(r)}" for h, r in by_definition.items()]) + ";" + body).encode()
    return kept_append((h, r.encode()) for h, r in by_definition.items())


def kept_block(h: str, records: bytes) -> bytes:
    """An append of one definition's records."""
    return kept_append([(h, records)])


def _appends(raw: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(definition, start, stop) of each definition's records in each append of a kept log, in order;
    a damaged tail is one piece tagged b"" (appends are whole: only a bug or a hand-made write
    leaves one)."""
    i, end, find = 0, len(raw), raw.find
    while i < end:
        pieces = []
        try:
            semi = find(b";", i)
            head = raw[i:semi].split(b",") if semi > i else []
            at = semi + 1
            for j in range(0, len(head) - 1, 2):
                n = int(head[j + 1])
                pieces.append((head[j], at, at + n))
                at += n
            if not head or len(head) % 2 or at > end:
                raise ValueError("damaged")
        except ValueError:
            yield b"", i, end
            return
        yield from pieces
        i = at


def definition_records(raw: bytes, h: str) -> bytes:
    """One definition's records in a kept log, back to back; a damaged tail is included, for the
    summariser to dead-letter and drop. (`_appends`, unrolled: this runs for every person a
    summary or a query reads.)"""
    tag = h.encode()
    out = []
    i, end, find = 0, len(raw), raw.find
    while i < end:
        try:
            semi = find(b";", i)
            head = raw[i:semi].split(b",") if semi > i else ()
            at, mine = semi + 1, None
            for j in range(0, len(head) - 1, 2):
                n = int(head[j + 1])
                if head[j] == tag:
                    mine = raw[at:at + n] if mine is None else mine + raw[at:at + n]
                at += n
            if not head or len(head) % 2 or at > end:
                raise ValueError("damaged")
        except ValueError:
            out.append(raw[i:])
            break
        if mine is not None:
            out.append(mine)
        i = at
    return b"".join(out)


def rewritten_log(raw: bytes, h: str, records: bytes, longer_than: int) -> bytes:
    """A kept log with definition h's records replaced by `records`, the other definitions' records
    as they were (one append: the log is compacted; padding and a damaged tail dropped), padded to
    more than `longer_than` bytes: a person's kept events never get shorter, so their length
    versions them (a summary write checks it unchanged) and cannot come back to a length a reader
    saw."""
    tag = h.encode()
    others: dict[bytes, list[bytes]] = {}
    for t, start, stop in _appends(raw):
        if t not in (tag, b"", PADDING):
            others.setdefault(t, []).append(raw[start:stop])
    blocks = [(t, b"".join(parts)) for t, parts in others.items()] + ([(tag, records)] if records else [])
    out = kept_append(blocks) if blocks else b""
    short = longer_than + 1 - len(out)
    return out + kept_append([(PADDING, b" " * short)]) if short > 0 else out


def day_row(person: int, ts_ms: int, uuid: str, value: str) -> str:
    """One entry of a day's funnel events, as the worker writes it (`read_day_event` reads it)."""
    return f"{person}|{ts_ms}|{uuid}|{value}"


def sized_value(value: str) -> str:
    """A kept value as a person's record ends with it: its length in bytes, then the value."""
    return f"{len(value.encode())}:{value}"


def person_record(ts_ms: int, day: str, uuid: str, sized: str) -> str:
    """One kept event of a person, as the worker appends it (`read_person_events` reads it); `sized`
    is `sized_value(value)`, computed once per distinct value by a caller that has few."""
    return f"{ts_ms},{day},{uuid},{sized}"


def person_records(stamps: pa.Array, days: pa.Array, uuids: pa.Array, sized: pa.Array) -> pa.Array:
    """`person_record` of each row, over text columns."""
    return pc.binary_join_element_wise(stamps, days, uuids, sized, ",")


def day_rows(persons: pa.Array, stamps: pa.Array, uuids: pa.Array, values: pa.Array) -> pa.Array:
    """`day_row` of each row, over text columns."""
    return pc.binary_join_element_wise(persons, stamps, uuids, values, "|")


def encode_person_events(events: Iterable[StoredEvent]) -> bytes:
    """The stored form `read_person_events` reads (the apply script appends the same records)."""
    return b"".join(b"%d,%s,%s,%d:%s" % (e.ts_ms, e.day.encode(), e.uuid.encode(), len(e.value), e.value)
                    for e in events)


def read_day_event(raw: bytes) -> tuple[str, int, str, str]:
    """(person, ms, uuid, value) of one entry of a day's funnel events."""
    person, ts, uuid, value = raw.decode().split("|", 3)
    return person, int(ts), uuid, value


def read_day_rows(raws: list[bytes]) -> tuple[np.ndarray, np.ndarray, pa.Array, pa.Array]:
    """Many entries of a day's funnel events at once, as columns: (persons, ms, uuids, values)."""
    parts = pc.split_pattern(pa.array(raws, pa.binary()).cast(pa.string()), "|", max_splits=3)
    if len(raws) and pc.min(pc.list_value_length(parts)).as_py() != 4:
        raise ValueError("a day's funnel event without its four fields")
    fields = parts.flatten()

    def column(i: int) -> pa.Array:
        return fields.take(pa.array(np.arange(i, 4 * len(raws), 4, dtype=np.int64)))

    return (pc.cast(column(0), pa.int64()).to_numpy(zero_copy_only=False),
            pc.cast(column(1), pa.int64()).to_numpy(zero_copy_only=False), column(2), column(3))


def pack_attempt_rows(flat: list[int]) -> bytes:
    return struct.pack(f"<{len(flat)}q", *flat)


def read_attempt_rows(values: list[bytes], steps: int) -> np.ndarray:
    """Every row of the given values, one per attempt: (person, start, g_2..g_n)."""
    return np.frombuffer(b"".join(values), dtype="<i8").reshape(-1, steps + 1)


def encode_touch(person: int, first_ms: int, first_value: str, last_ms: int, last_value: str) -> bytes:
    return orjson.dumps([person, first_ms, first_value, last_ms, last_value])


def read_touches(values: list[bytes]) -> list[list[Any]]:
    return [orjson.loads(v) for v in values]


def encode_sessions(sessions: list[list[list[Any]]]) -> bytes:
    return orjson.dumps(sessions)


def read_sessions(values: list[bytes]) -> list[Any]:
    """Every session of the given values (a day's persons), flattened."""
    return [session for value in values for session in orjson.loads(value)]


def read_first_seen(raw: bytes) -> int:
    """The ms of a person's first event of a name (`ts_ms:hour:day`)."""
    return int(raw.decode().split(":")[0])


def read_first_time(raw: bytes) -> tuple[int, int, str]:
    """A person's first event of a name: (ms, project-zone hour start, project-zone day YYYYMMDD)."""
    ts, hour, day = raw.decode().split(":")
    return int(ts), int(hour), day


def read_merge(entry: bytes) -> tuple[int, int]:
    """One entry of a project's merge log (`persons.lua` appends `<merged person>:<the person it
    became>`): (merged person, the person it became)."""
    source, _, target = entry.partition(b":")
    return int(source), int(target)


def read_property_stamp(raw: bytes) -> tuple[str, int]:
    """(kind, ts_ms) of a person property time: kind `s` ($set), `o` ($set_once) or `u` (unset)."""
    kind = raw[:1]
    if kind in (b"o", b"u"):
        return kind.decode(), int(raw[1:])
    return "s", int(raw)


GUARD_RECORD = np.dtype([("uuid", "V16"), ("tag", "<u4"), ("partition", "<u4"), ("offset", "<i8"), ("person", "<i8")])
Copy = tuple[int, int, int, int]  # the copy an event was counted from: tag code, partition, offset, then its person
NO_TOPIC = 0xFFFF_FFFF  # the tag code of a guard from before guards named their topic


def guard_key(uuid: str) -> bytes:
    """An event uuid as the 16 bytes its guard holds: a canonical uuid's own bytes (capture makes every
    uuid canonical); any other text (tests, hand-made topics) its 128-bit BLAKE2 digest."""
    if len(uuid) == 36:
        try:
            return bytes.fromhex(uuid.replace("-", ""))
        except ValueError:
            pass
    return hashlib.blake2b(uuid.encode(), digest_size=16).digest()


def guard_keys(uuids: Sequence[str]) -> np.ndarray:
    """`guard_key` of each uuid, as an array of 16-byte values: canonical uuids in one conversion."""
    if all(len(u) == 36 for u in uuids):
        try:
            return np.frombuffer(bytes.fromhex("".join(uuids).replace("-", "")), dtype="V16")
        except ValueError:
            pass
    return np.frombuffer(b"".join(map(guard_key, uuids)), dtype="V16")


def tag_code(tag: str) -> int:
    """A topic tag (`keys.topic_tag`) as the 32-bit number a guard record holds."""
    return zlib.crc32(tag.encode())


def guard_records(keys: np.ndarray, tag: int, partitions: np.ndarray, offsets: np.ndarray, persons: np.ndarray
                  ) -> np.ndarray:
    """Guard records (`GUARD_RECORD`) of one topic's copies, column by column."""
    records = np.empty(len(keys), dtype=GUARD_RECORD)
    records["uuid"], records["tag"], records["partition"] = keys, tag, partitions
    records["offset"], records["person"] = offsets, persons
    return records


def read_guards(raw: bytes) -> np.ndarray:
    """Guard records as a structured array (`GUARD_RECORD`); a torn tail is left out."""
    whole = len(raw) - len(raw) % GUARD_RECORD.itemsize
    return np.frombuffer(raw[:whole], dtype=GUARD_RECORD)


def read_legacy_guard(raw: bytes) -> Copy:
    """A guard written before the guard log (`seen:<bucket>`) as a copy. One whose holder names no
    topic (`partition:offset[:person]`, an older format) gets tag code `NO_TOPIC`: never the copy
    being applied now; its person is -1 where it names none."""
    parts = raw.decode(errors="replace").split(":")
    try:
        if len(parts) == 4:
            return (tag_code(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]))
        return (NO_TOPIC, int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else -1)
    except (ValueError, IndexError):
        return (NO_TOPIC, 0, -1, -1)
