"""The declarations state/ hands the Lua scripts: every name a script reads exists, the Python that
builds arguments puts each field where the layout says, and every key function yields a declared key."""

from __future__ import annotations

import re

import pytest

from schemas.events import TopicEvent
from state import keys, scripts
from state.store import home_args, shard_args


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
    """`home_args` and `shard_args` against the layouts `apply_batch.lua` and `apply_shard.lua` read:
    every row of every section read back by field name holds what the pure operator summed, each
    person's event state in its shard (person % 2)."""
    import orjson

    from dataflows.operators.batch import KnownFirsts, Occurrence, batch_effects

    def occurrence(uuid: str, name: str, did: str, ts: int, person: int, props: dict | None = None,
                   contributions: list | None = None) -> Occurrence:
        o = Occurrence.of(TopicEvent(uuid, name, did, ts, props or {}), ts // 3_600_000 * 3600, "20240101", 3, ts)
        o.person, o.contributions = person, contributions
        return o

    batch = [occurrence("u1", "a", "x", 1000, 7, {"$set": {"plan": "pro"}}, [("h1", "Chrome", 2.5)]),
             occurrence("u2", "a", "y", 2000, 8, contributions=[("h2", "", '{"s":1}')]),
             occurrence("u1", "a", "x", 1000, 7),  # a repeat in the batch: counted once
             occurrence("u3", "b", "x", 500, 7)]
    kinds = {"h1": "l", "h2": "fs"}  # h2 keeps events per day and per person (a funnel with summaries)
    effects = batch_effects(batch, KnownFirsts(), flags=kinds, shards=2)
    assert sorted(effects.shards) == [0, 1]

    def rows(layouts: tuple[scripts.Layout, ...], raw: dict, name: str) -> list[dict]:
        fields = {layout.name: layout.fields for layout in layouts}[name]
        return [dict(zip(fields, row, strict=True)) for row in raw[name]]

    prefix, body = home_args(5, effects)
    assert prefix == keys.project_prefix(5)
    home = orjson.loads(body)
    assert effects.guards == [("u1", 3, 1000, 7), ("u2", 3, 2000, 8), ("u3", 3, 500, 7)]  # the apply decides the new
    assert home["N"] == ["a", "b"] and home["earliest"] == 500
    assert rows(scripts.HOME_SECTIONS, home, "U") == [
        {"person": 7, "ts": 1000, "set": '{"plan":"\\"pro\\""}', "set_once": "", "unset": ""}]
    assert rows(scripts.HOME_SECTIONS, home, "O") == [{"partition": 3, "next_offset": 2001}]

    parts, kept = {}, {}
    for shard in (0, 1):
        prefix, generation, body, kept[shard] = shard_args(5, shard, 2, effects.shards[shard], "t1")
        assert (prefix, generation) == (keys.shard_prefix(5, shard), 2)
        parts[shard] = orjson.loads(body)
    odd, even = parts[1], parts[0]  # person 7, person 8

    def shard_rows(raw: dict, name: str) -> list[dict]:
        return rows(scripts.SHARD_SECTIONS, raw, name)

    assert shard_rows(odd, "R") == [{"fence": "t1:3", "first": 500, "next_offset": 1001}]
    assert shard_rows(even, "R") == [{"fence": "t1:3", "first": 2000, "next_offset": 2001}]
    # What goes into keys and commands is text (Lua's number formatting is slow).
    assert sorted((c["kind"], c["event"], c["bucket"], c["events"]) for c in shard_rows(odd, "C")) == [
        ("d", "a", "20240101", "1"), ("d", "b", "20240101", "1"), ("h", "a", "0", "1"), ("h", "b", "0", "1")]
    assert sorted((b["kind"], b["event"], sorted(b["persons"])) for b in shard_rows(even, "B")) == [
        ("d", "a", ["8"]), ("h", "a", ["8"])]
    fp = next(layout.fields for layout in scripts.SHARD_SECTIONS if layout.name == "FP")
    firsts = {f["event"]: [dict(zip(fp, c, strict=True)) for c in f["candidates"]] for f in shard_rows(odd, "F")}
    assert {ev: [(c["person"], c["ts"], c["hour"]) for c in cs] for ev, cs in firsts.items()} == {
        "a": [("7", 1000, "0")], "b": [("7", 500, "0")]}
    # A counting definition (h1 keeps every value: `l`), summed per key.
    assert sorted((c["definition"], c["kind"], c["breakdown"], c["events"], c["persons"])
                  for c in shard_rows(odd, "DC")) == [("h1", "d", "Chrome", 1, ["7"]), ("h1", "h", "Chrome", 1, ["7"])]
    assert shard_rows(odd, "DV") == [{"definition": "h1", "breakdowns": ["Chrome"]}]
    assert sorted((s["field"], s["sums"], s["count"], s["min"], s["max"]) for s in shard_rows(odd, "DS")) == [
        ("d20240101", [2.5], 1, 2.5, 2.5), ("h0", [2.5], 1, 2.5, 2.5)]
    assert sorted((v["kind"], v["bucket"], v["values"]) for v in shard_rows(odd, "DL")) == [
        ("d", "20240101", [2.5]), ("h", "0", [2.5])]
    assert shard_rows(odd, "DA") == [] and shard_rows(even, "DC") == [] and shard_rows(odd, "KD") == []
    assert shard_rows(even, "KD") == [{"definition": "h2", "day": "20240101", "rows": ['8|2000|u2|{"s":1}']}]
    block = b'h2,26;2000,20240101,u2,7:{"s":1}'  # one block per definition, its records' length first
    assert shard_rows(even, "KP") == [{"person": "8", "length": len(block), "definitions": ["h2"]}]
    assert (kept[0], kept[1]) == (block, b"")
    assert shard_rows(odd, "H") == [{"definition": "h1", "fence": "t1:3", "offset": 1000}]
    assert shard_rows(even, "H") == [{"definition": "h2", "fence": "t1:3", "offset": 2000}]

    # A shard holding the events below its fence gets none of them again; the home part is unchanged.
    fenced = batch_effects(batch, KnownFirsts(), flags=kinds, shards=2, fences={1: {3: 1001}})
    assert sorted(fenced.shards) == [0] and len(fenced.guards) == 3


def test_key_functions_yield_declared_keys() -> None:
    d = keys.definition_prefix(7, "0abc")
    made = [keys.seen(7, "00ff"), keys.event_names(7), keys.hour_counts(7, "e:x"), keys.day_persons(7, "e", "20240101"),
            keys.first_time_hour_persons(7, "e", 3600), keys.person_properties(7, 3), keys.project_meta(7),
            keys.definitions(7), *keys.saved_insights(7), keys.insight_views(7, "o"), keys.insight_access(7, 1),
            keys.definitions_generation(7), keys.failed_definitions(7), keys.project_applied(7),
            keys.stream("events"), keys.dlq_seen("events"), keys.throttle("ab", 1), keys.PROJECTS, keys.BACKFILLS,
            keys.definition_events(d, "20240101"), keys.definition_key(d, "vs", "x"), keys.definition_key(d, "bv"),
            keys.definition_key(d, "ud", "x", "20240101"), keys.person_events(d, 3), keys.kept_log(7, 0, 3),
            keys.kept_log(7, 2, 3), keys.summary_dirty(d), keys.summary_rows(d, "ps", "20240101"),
            keys.summary_versions(d, "fb"), keys.irregular_persons(d),
            keys.definition_meta(d), keys.handover(d), keys.backfill_fence(d), keys.backfill_bound(d),
            keys.backfill_done(d), keys.backfill_progress(d)]
    made += [keys.shard_applied(7, 0), keys.shard_generation(7, 2), keys.LAYOUT_KEY]
    assert [k for k in made if not keys.declared(k)] == []
    for undeclared in ("{p7}:v1:nope", "{p7}:v1:d:0abc:zz", "{p7}:v2:events", "insightflow:other", "events",
                       "{p7.1}:v1:pdi", "{p7.1}:v1:d:0abc:meta", "{p7.1}:v1:seen:00ff"):
        assert not keys.declared(undeclared), undeclared


def test_event_state_spreads_over_shards_and_the_rest_stays_home() -> None:
    d = keys.definition_prefix(7, "0abc")
    for key in (keys.day_persons(7, "e", "20240101"), keys.first_seen(7, "e"), keys.person_events(d, 3),
                keys.kept_log(7, 0, 3), keys.summary_rows(d, "fa", "20240101"), keys.definition_key(d, "vs", "x"),
                keys.backfill_bound(d)):
        spread = keys.in_shards(key, 3)
        assert spread[0] == key and len(set(spread)) == 3 and all(keys.declared(k) for k in spread), key
        assert [keys.in_shard(k, 0) for k in spread] == [key] * 3
        assert spread[2].startswith("{p7.2}:")
    for key in (keys.distinct_ids(7), keys.seen(7, "00ff"), keys.event_names(7), keys.definition_meta(d),
                keys.definitions_generation(7), keys.person_properties(7, 3)):
        assert keys.in_shards(key, 3) == [key], key
    assert keys.in_shards(keys.first_seen(7, "e"), 1) == [keys.first_seen(7, "e")]
    assert [keys.shard_of(p, 3) for p in (3, 4, "5")] == [0, 1, 2]
