"""The declarations state/ hands the Lua scripts: every name a script reads exists, the Python that
builds arguments puts each field where the layout says, and every key function yields a declared key."""

from __future__ import annotations

import re

import pytest

from schemas.events import TopicEvent
from state import keys, scripts
from state.store import event_args, set_contributions

_NAMED = re.compile(r"\b(A|E|T|S|SE|K|DK)\.([A-Za-z_]+)")


@pytest.mark.parametrize("script", scripts.ALL, ids=lambda s: s.file)
def test_every_name_a_script_reads_is_declared(script: scripts.Script) -> None:
    tables = {layout.name: set(layout.fields) for layout in script.layouts}
    tables |= {"K": set(keys.PROJECT_PARTS), "DK": set(keys.DEFINITION_PARTS)}
    used = _NAMED.findall(script.body)
    assert used, "a script that reads nothing by name"
    missing = sorted({f"{t}.{n}" for t, n in used if n not in tables.get(t, set())})
    assert missing == []
    assert "-- include:" not in script.body and script.source == script.head + script.body


def test_event_block_follows_the_layout() -> None:
    from dataflows.operators.persons import person_update

    event = TopicEvent("uuid-1", "$identify", "user", 1234, {"$anon_distinct_id": "anon", "$set": {"a": 1}})
    args = event_args(event, 3600, "20240101", person_update(event), partition=3, offset=77)
    set_contributions(args, [("h1", "bv", None)])
    block = dict(zip(scripts.EVENT_FIELDS, args, strict=True))
    assert block["uuid"] == "uuid-1" and block["distinct_id"] == "user" and block["event"] == "$identify"
    assert (block["hour"], block["day"], block["ts"]) == (3600, "20240101", 1234)
    assert (block["link_kind"], block["link_other"]) == ("identify", "anon")
    assert block["set"] == '{"a":"1"}' and (block["partition"], block["offset"]) == (3, 77)
    assert block["bucket"] == keys.seen_bucket("uuid-1") and block["contributions"] == '[["h1","bv"]]'


def test_key_functions_yield_declared_keys() -> None:
    d = keys.definition_prefix(7, "0abc")
    made = [keys.seen(7, "00ff"), keys.event_names(7), keys.hour_counts(7, "e:x"), keys.day_persons(7, "e", "20240101"),
            keys.first_time_hour_persons(7, "e", 3600), keys.person_properties(7, 3), keys.project_meta(7),
            keys.definitions(7), *keys.saved_insights(7), keys.insight_views(7, "o"), keys.insight_access(7, 1),
            keys.definitions_generation(7), keys.failed_definitions(7), keys.project_applied(7),
            keys.stream("events"), keys.dlq_seen("events"), keys.throttle("ab", 1), keys.PROJECTS, keys.BACKFILLS,
            keys.definition_events(d, "20240101"), keys.definition_key(d, "vs", "x"), keys.definition_key(d, "bv"),
            keys.definition_key(d, "ud", "x", "20240101"), keys.person_events(d, 3), keys.summary_dirty(d),
            keys.summary_rows(d, "ps", "20240101"), keys.summary_versions(d, "fb"), keys.irregular_persons(d),
            keys.definition_meta(d), keys.handover(d), keys.backfill_fence(d), keys.backfill_bound(d),
            keys.backfill_done(d)]
    assert [k for k in made if not keys.declared(k)] == []
    for undeclared in ("{p7}:v1:nope", "{p7}:v1:d:0abc:zz", "{p7}:v2:events", "insightflow:other", "events"):
        assert not keys.declared(undeclared), undeclared
