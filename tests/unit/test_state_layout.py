"""The declarations state/ hands the Lua scripts: every name a script reads exists, the Python that
builds arguments puts each field where the layout says, and every key function yields a declared key."""

from __future__ import annotations

import re

import pytest

from schemas.events import TopicEvent
from state import keys, scripts
from state.store import batch_args


@pytest.mark.parametrize("script", scripts.ALL, ids=lambda s: s.file)
def test_every_name_a_script_reads_is_declared(script: scripts.Script) -> None:
    tables = {layout.name: set(layout.fields) for layout in script.layouts}
    tables |= {"K": set(keys.PROJECT_PARTS), "DK": set(keys.DEFINITION_PARTS)}
    named = re.compile(r"\b(" + "|".join(sorted(tables, key=len, reverse=True)) + r")\.([A-Za-z_]+)")
    used = named.findall(script.body)
    assert used, "a script that reads nothing by name"
    missing = sorted({f"{t}.{n}" for t, n in used if n not in tables.get(t, set())})
    assert missing == []
    assert "-- include:" not in script.body and script.source == script.head + script.body


def test_batch_rows_follow_the_layouts() -> None:
    """`batch_args` against the layouts `apply_batch.lua` reads: every row of every section read back
    by field name holds what the pure operator summed."""
    import orjson

    from dataflows.operators.batch import KnownFirsts, Occurrence, batch_effects

    def occurrence(uuid: str, name: str, did: str, ts: int, person: int, props: dict | None = None,
                   contributions: list | None = None) -> Occurrence:
        o = Occurrence.of(TopicEvent(uuid, name, did, ts, props or {}), ts // 3_600_000 * 3600, "20240101", 3, ts)
        o.person, o.contributions = person, contributions
        return o

    batch = [occurrence("u1", "a", "x", 1000, 7, {"$set": {"plan": "pro"}}, [("h1", "Chrome", 2.5)]),
             occurrence("u2", "a", "y", 2000, 9, contributions=[("h2", "", '{"s":1}')]),
             occurrence("u1", "a", "x", 1000, 7),  # a repeat in the batch: counted once
             occurrence("u3", "b", "x", 500, 7)]
    kinds = {"h1": "l", "h2": "fs"}  # h2 keeps events per day and per person (a funnel with summaries)
    effects = batch_effects(batch, KnownFirsts(), flags=kinds)
    prefix, generation, flags, body = batch_args(5, 2, kinds, effects)
    assert (prefix, generation, orjson.loads(flags)) == (keys.project_prefix(5), 2, kinds)
    sections = {layout.name: layout.fields for layout in scripts.APPLY_BATCH.layouts}
    raw = orjson.loads(body)

    def rows(name: str) -> list[dict]:
        return [dict(zip(sections[name], row, strict=True)) for row in raw[name]]

    assert [(g["uuid"], g["copy"], g["bucket"]) for g in rows("G")] == [
        (u, f"3:{ts}", keys.seen_bucket(u)) for u, ts in (("u1", 1000), ("u2", 2000), ("u3", 500))]
    assert sorted((c["kind"], c["event"], c["events"]) for c in rows("C")) == [
        ("d", "a", 2), ("d", "b", 1), ("h", "a", 2), ("h", "b", 1)]
    assert sorted((b["kind"], b["event"], sorted(b["persons"])) for b in rows("B")) == [
        ("d", "a", [7, 9]), ("d", "b", [7]), ("h", "a", [7, 9]), ("h", "b", [7])]
    firsts = {f["event"]: [dict(zip(sections["FP"], c, strict=True)) for c in f["candidates"]] for f in rows("F")}
    assert {ev: [(c["person"], c["ts"]) for c in cs] for ev, cs in firsts.items()} == {
        "a": [(7, 1000), (9, 2000)], "b": [(7, 500)]}
    assert raw["N"] == ["a", "b"] and raw["earliest"] == 500
    assert rows("U") == [{"person": 7, "ts": 1000, "set": '{"plan":"\\"pro\\""}', "set_once": "", "unset": ""}]
    assert rows("O") == [{"partition": 3, "next_offset": 2001}]
    assert [(d["definition"], d["breakdown"], d["value"], d["person"], d["uuid"]) for d in rows("D")] == [
        ("h1", "Chrome", 2.5, 7, "u1")]  # a counting definition: applied one by one
    assert rows("H") == [{"definition": "h1", "partition": 3, "offset": 1000},
                         {"definition": "h2", "partition": 3, "offset": 2000}]
    assert rows("KD") == [{"definition": "h2", "day": "20240101", "rows": ['9|2000|u2|{"s":1}']}]
    assert rows("KP") == [{"definition": "h2", "person": 9, "kept": '2000,20240101,u2,7:{"s":1}'}]


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
