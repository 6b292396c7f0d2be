"""Person resolution: what an event says about identity and person properties (no I/O).

The store applies the result atomically per project (`state/store.py`), so two workers that
see distinct ids of one person on different partitions still agree on one person.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from schemas.events import TopicEvent

LinkKind = Literal["identify", "alias", "merge"]


@dataclass(frozen=True, slots=True)
class PersonUpdate:
    """Identity link (if any) and property changes one event carries."""

    link_kind: LinkKind | None
    other_distinct_id: str | None
    set: dict[str, Any]
    set_once: dict[str, Any]
    unset: list[str]


def _other_id(value: Any, own: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    return text if text and text != own else None


def person_update(event: TopicEvent) -> PersonUpdate:
    """`$identify` links `$anon_distinct_id`; `$create_alias`/`$merge_dangerously` link `alias`.

    `$identify` and `$create_alias` never merge two persons that are both already identified
    (PostHog refuses); `$merge_dangerously` always merges.
    """
    props = event.properties
    link_kind: LinkKind | None = None
    other: str | None = None
    if event.event == "$identify":
        other = _other_id(props.get("$anon_distinct_id"), event.distinct_id)
        link_kind = "identify" if other else None
    elif event.event in ("$create_alias", "$merge_dangerously"):
        other = _other_id(props.get("alias"), event.distinct_id)
        if other:
            link_kind = "alias" if event.event == "$create_alias" else "merge"
    set_ = props.get("$set") if isinstance(props.get("$set"), dict) else {}
    set_once = props.get("$set_once") if isinstance(props.get("$set_once"), dict) else {}
    raw_unset = props.get("$unset")
    unset = [str(k) for k in (raw_unset.keys() if isinstance(raw_unset, dict) else raw_unset or [])]
    return PersonUpdate(link_kind, other, set_, set_once, unset)
