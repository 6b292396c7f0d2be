"""Parse and validate topic records: each becomes an accepted event or a rejection with a reason."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.events import InvalidEvent, Record, TopicEvent, parse_topic_event


@dataclass(slots=True)  # not frozen: one per event (schemas/events.py Record)
class Parsed:
    record: Record
    event: TopicEvent | None
    reason: str | None


def parse_record(record: Record) -> Parsed:
    """Never raises: an unusable record carries its reason on to the dead-letter topic."""
    try:
        return Parsed(record, parse_topic_event(record.value, record.timestamp_ms), None)
    except InvalidEvent as exc:
        return Parsed(record, None, str(exc))
    except Exception as exc:
        return Parsed(record, None, f"unparsable event: {type(exc).__name__}: {exc}")
