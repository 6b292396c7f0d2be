"""Pure operators: person updates, trend buckets, record validation."""

from __future__ import annotations

from datetime import UTC, datetime

from dataflows.operators.persons import PersonProperties, PersonUpdate, person_update
from dataflows.operators.trends import trend_buckets
from dataflows.operators.validate import parse_record
from schemas.dates import zone
from schemas.events import Record, from_capture

NOW = datetime(2024, 3, 7, 12, 0, tzinfo=UTC)


def _event(raw: dict):
    return from_capture({"distinct_id": "d", "timestamp": "2024-03-07T01:00:00Z", **raw}, project_id=1, now=NOW)


def test_identify_alias_merge_links() -> None:
    identify = person_update(_event({"event": "$identify", "properties": {"$anon_distinct_id": "anon",
                                                                           "$set": {"email": "a@b"}}}))
    assert (identify.link_kind, identify.other_distinct_id, identify.set) == ("identify", "anon", {"email": "a@b"})
    alias = person_update(_event({"event": "$create_alias", "properties": {"alias": "other"}}))
    assert (alias.link_kind, alias.other_distinct_id) == ("alias", "other")
    merge = person_update(_event({"event": "$merge_dangerously", "properties": {"alias": "x"}}))
    assert merge.link_kind == "merge"
    self_link = person_update(_event({"event": "$identify", "properties": {"$anon_distinct_id": "d"}}))
    assert self_link.link_kind is None
    plain = person_update(_event({"event": "$pageview", "properties": {"$set_once": {"a": 1}, "$unset": ["b"]}}))
    assert plain.link_kind is None and plain.set_once == {"a": 1} and plain.unset == ["b"]


def test_person_properties_apply_updates_in_event_time_order() -> None:
    """Whatever the arrival order: the later `$set`/`$unset` wins, the earlier `$set_once` wins, a
    `$set` beats a `$set_once`, and an old update arriving late changes nothing newer."""
    person = PersonProperties({}, {})
    person.apply(PersonUpdate(None, None, {"plan": "pro"}, {"source": "seo"}, []), 5000)
    person.apply(PersonUpdate(None, None, {"plan": "free"}, {"source": "ads"}, []), 1000)  # late, older
    assert person.values == {"plan": "pro", "source": "ads"}
    person.apply(PersonUpdate(None, None, {}, {}, ["plan"]), 4000)  # older than the $set: ignored
    assert person.values == {"plan": "pro", "source": "ads"}
    person.apply(PersonUpdate(None, None, {"source": "direct"}, {}, ["plan"]), 6000)
    assert person.values == {"source": "direct"}
    person.apply(PersonUpdate(None, None, {}, {"plan": "trial", "source": "x"}, []), 7000)  # after the unset
    assert person.values == {"source": "direct", "plan": "trial"}
    assert person.stamps == {"plan": ("o", 7000), "source": ("s", 6000)}


def test_trend_buckets_follow_project_zone() -> None:
    event = _event({"event": "e"})
    utc = trend_buckets(event, zone("UTC"))
    pacific = trend_buckets(event, zone("US/Pacific"))
    assert utc.day == "20240307" and pacific.day == "20240306"
    assert utc.hour == int(datetime(2024, 3, 7, 1, tzinfo=UTC).timestamp()) == pacific.hour


def test_parse_record_never_raises() -> None:
    bad = parse_record(Record(0, 5, 6, b"\xff\xfe", None))
    assert bad.event is None and "JSON" in (bad.reason or "")
    good = parse_record(Record(0, 6, 7, _event({"event": "e"}).to_json(), None))
    assert good.event is not None and good.event.event == "e" and good.reason is None


def test_definition_sums_add_per_key_as_the_script_did_per_event() -> None:
    """A counting definition's contributions summed in the worker: events and persons per breakdown
    and bucket, property sums with partial sums where a double overflows, min/max, every value
    (flag `l`) and events per person (flag `a`)."""
    from dataflows.operators.batch import DefinitionSums, KnownFirsts, Occurrence, batch_effects
    from schemas.events import TopicEvent

    def occurrence(uuid: str, person: int, ts: int, value: float | None, bv: str = "x") -> Occurrence:
        o = Occurrence.of(TopicEvent(uuid, "buy", f"d{person}", ts, {}), ts // 3_600_000 * 3600, "20240101", 0, ts)
        o.person, o.contributions = person, [("h", bv, value)]
        return o

    big = 1.5e308
    events = [occurrence("a", 3, 1000, big), occurrence("b", 3, 2000, big), occurrence("c", 5, 3000, -2.0),
              occurrence("d", 5, 4000, None, "y")]
    sums = batch_effects(events, KnownFirsts(), flags={"h": "la"}).shards[0].sums["h"]
    assert isinstance(sums, DefinitionSums) and (sums.keep_values, sums.per_actor) == (True, True)
    assert dict(sums.counts) == {("h", "x", 0): 3, ("d", "x", "20240101"): 3, ("h", "y", 0): 1,
                                 ("d", "y", "20240101"): 1}
    assert sums.persons[("d", "x", "20240101")] == {3, 5} and sums.breakdowns == {"x", "y"}
    assert sums.stats[("x", "d20240101")] == [[big, big - 2.0], 3, -2.0, big]  # the second big would overflow
    assert sums.values[("h", "x", 0)] == [big, big, -2.0] and ("h", "y", 0) not in sums.values
    assert sums.actors[("d", "x", "20240101")] == {3: 2, 5: 1}
    plain = batch_effects(events, KnownFirsts(), flags={"h": ""}).shards[0].sums["h"]
    assert not plain.values and not plain.actors and plain.stats == sums.stats


def test_known_first_times_leave_out_candidates_no_earlier_and_are_forgotten_past_their_limit() -> None:
    """What the worker learnt of first times (per event name and person) rules out an event's
    first-time candidate only when it is no earlier than the time held for that name and person;
    past the limit the map is cleared, which costs candidates, never a count."""
    from dataflows.operators.batch import KnownFirsts, Occurrence, batch_effects
    from schemas.events import TopicEvent

    def occurrence(uuid: str, name: str, person: int, ts: int) -> Occurrence:
        o = Occurrence.of(TopicEvent(uuid, name, f"d{person}", ts, {}), 0, "20240101", 0, ts)
        o.person = person
        return o

    known = KnownFirsts(limit=3)
    known.learn({"buy": {1: (5000, 0, "20240101"), 2: (5000, 0, "20240101")}, "view": {1: (7000, 0, "20240101")}})
    known.learn({"buy": {1: (6000, 0, "20240101")}})  # later: the earlier time stays
    batch = [occurrence("a", "buy", 1, 5000), occurrence("b", "buy", 2, 4000), occurrence("c", "view", 1, 6999),
             occurrence("d", "view", 2, 9000), occurrence("e", "buy", 3, 1)]
    firsts = batch_effects(batch, known).shards[0].firsts
    assert {ev: sorted(persons) for ev, persons in firsts.items() if persons} == {"buy": [2, 3], "view": [1, 2]}
    known.learn({"view": {2: (9000, 0, "20240101")}})  # a fourth entry: past the limit of 3
    known.learn({})
    assert known.times == {}
    assert sorted(batch_effects(batch, known).shards[0].firsts["buy"]) == [1, 2, 3]
