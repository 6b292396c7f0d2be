"""Definition sums over archived columns equal the per-event rule they replace (dataflows/operators/history.py)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.operators.batch import DefinitionSums, KnownFirsts, Occurrence, batch_effects
from dataflows.operators.history import history_kept, history_sums
from dataflows.operators.trends import trend_buckets
from schemas.definitions import Breakdown, Definition
from schemas.events import TopicEvent
from schemas.filters import parse_filters
from schemas.funnels import Exclusion, FunnelDefinition, FunnelStep
from schemas.paths import PathDefinition
from state.archive import HOT_PROPERTIES, ArchivedEvent, hot_in_json_only, table_of
from state.records import day_row, read_day_event, read_day_rows

pytestmark = pytest.mark.unit
NOW = datetime(2024, 7, 1, tzinfo=UTC)
HOT = set(HOT_PROPERTIES)


def _events(rng: random.Random, n: int, text_hot: bool = False) -> list[ArchivedEvent]:
    """Events with every kind of property value; `text_hot`: hot properties only ever text (or absent)."""
    out = []
    for i in range(n):
        props: dict[str, object] = {}
        for key, choices in (("$browser", ["Chrome", "Safari", "", 3, None, "a\x1fb"]),
                            ("$current_url", ["/", "/docs/", "/docs", "https://x.y/?"]),
                            ("plan", ["free", "pro", 7, 7.0, True, None, ["pro"]]),
                            ("amount", [1, 50, 51, "60", None, "x", 1.5e308, -0.25]),
                            ("$screen_name", ["Home", 4, "Cart"])):
            values = [v for v in choices if isinstance(v, str)] if text_hot and key in HOT else choices
            if rng.random() < 0.8:
                props[key] = rng.choice(values)
        ts = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp() * 1000) + rng.randrange(20 * 86_400_000)
        name = rng.choice(["view", "view", "buy", "other", "$pageview", "$screen"])
        event = TopicEvent(f"u{i}", name, f"d{i % 17}", ts, props, 1)
        out.append(ArchivedEvent("t", 0, i, rng.randrange(1, 40), "2024-06-01", event))
    return out


DEFINITIONS = [
    Definition(1, "view", parse_filters(None)),
    Definition(1, "view", parse_filters([{"key": "$browser", "value": ["Chrome"], "operator": "exact",
                                          "type": "event"}]), Breakdown((("event", "$current_url"),), True)),
    Definition(1, "buy", parse_filters([{"key": "amount", "value": 50, "operator": "gt", "type": "event"}]),
               Breakdown((("event", "plan"),)), timezone="America/Sao_Paulo"),
    Definition(1, None, parse_filters({"type": "OR", "values": [
        {"key": "$browser", "operator": "is_not_set", "type": "event"},
        {"key": "plan", "value": "pro", "operator": "icontains", "type": "event"}]}),
        Breakdown((("event", "$browser"), ("event", "plan")), as_list=True), timezone="Asia/Kathmandu"),
    # Property maths: the value's sums (partial ones past a double), count, min and max per bucket.
    Definition(1, "buy", parse_filters(None), value_property=("event", "amount")),
    Definition(1, None, parse_filters([{"key": "$browser", "value": ["Chrome"], "operator": "exact", "type": "event"}]),
               Breakdown((("event", "$current_url"),)), value_property=("event", "amount"), timezone="Asia/Kathmandu"),
    # Quantiles keep every value; count-per-actor maths each person's events.
    Definition(1, "buy", parse_filters(None), Breakdown((("event", "plan"),)), value_property=("event", "amount"),
               keep_values=True),
    Definition(1, "view", parse_filters(None), Breakdown((("event", "$browser"),)), per_actor=True,
               timezone="America/Sao_Paulo"),
]


def _per_event(definition: Definition, events: list[ArchivedEvent], shards: int, fence: dict[int, int],
               people: dict[str, dict[str, object]] | None = None) -> dict[int, DefinitionSums]:
    out = {s: DefinitionSums(definition.keep_values, definition.per_actor) for s in range(shards)}
    for e in events:
        s = e.person % shards
        if e.offset <= fence[s]:
            continue
        person_props = (people or {}).get(e.event.distinct_id, {})
        hit = definition.contribution(e.event.event, e.event.properties, person_props, NOW)
        if hit is None:
            continue
        b = trend_buckets(e.event, ZoneInfo(definition.timezone))
        out[s].add(Occurrence.of(e.event, b.hour, b.day, 0, e.offset), hit[0], hit[1], e.person)
    return out


def _assert_same_sums(got: DefinitionSums, expected: DefinitionSums) -> None:
    """Everything a counting definition keeps: counts, persons, breakdown values, value stats, every
    value and events per person."""
    assert dict(got.counts) == dict(expected.counts)
    assert {k: set(v) for k, v in got.persons.items()} == {k: set(v) for k, v in expected.persons.items()}
    assert got.breakdowns == expected.breakdowns
    assert got.stats == expected.stats
    assert dict(got.values) == dict(expected.values)
    assert {k: dict(v) for k, v in got.actors.items()} == {k: dict(v) for k, v in expected.actors.items()}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), which=st.integers(0, len(DEFINITIONS) - 1), shards=st.integers(1, 3))
def test_history_sums_equal_the_per_event_rule(seed: int, which: int, shards: int) -> None:
    rng = random.Random(seed)
    events = _events(rng, rng.randrange(0, 400))
    definition = DEFINITIONS[which]
    fence = {s: rng.randrange(-1, 200) for s in range(shards)}
    got = history_sums(definition, table_of(events), NOW, HOT, shards, lambda offsets, s: offsets > fence[s])
    expected = _per_event(definition, events, shards, fence)
    for s in range(shards):
        _assert_same_sums(got[s], expected[s])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), which=st.integers(0, len(DEFINITIONS) - 1))
def test_history_read_without_the_json_gives_the_same_sums_when_the_hot_columns_hold_every_value(
        seed: int, which: int) -> None:
    """What a backfill reads when `hot_in_json_only` says no row keeps a hot property only in its JSON:
    the hot columns alone, their nulls meaning absent."""
    rng = random.Random(seed)
    definition = DEFINITIONS[which]
    if definition.event_keys() - HOT:
        definition = DEFINITIONS[1]  # the one that reads hot properties only
    table = table_of(_events(rng, rng.randrange(0, 400), text_hot=True))
    assert not hot_in_json_only(table, HOT)
    every = lambda offsets, s: np.ones(len(offsets), bool)  # noqa: E731
    got = history_sums(definition, table.drop_columns(["properties"]), NOW, HOT, 1, every)
    expected = history_sums(definition, table, NOW, HOT, 1, every)
    assert dict(got[0].counts) == dict(expected[0].counts)
    assert {k: set(v) for k, v in got[0].persons.items()} == {k: set(v) for k, v in expected[0].persons.items()}
    assert got[0].breakdowns == expected[0].breakdowns


def test_a_definition_reading_a_column_is_evaluated_once_per_distinct_value() -> None:
    calls = []

    class Counting(Definition):
        def contribution(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(args[1])
            return super().contribution(*args, **kwargs)

    events = [ArchivedEvent("t", 0, i, i % 5 + 1, "2024-06-01", TopicEvent(
        f"u{i}", "view", "d", 1_717_200_000_000 + i, {"$browser": ["Chrome", "Safari"][i % 2]}, 1))
        for i in range(1000)]
    definition = Counting(1, "view", parse_filters(None), Breakdown((("event", "$browser"),)))
    got = history_sums(definition, table_of(events), NOW, HOT, 1, lambda offsets, s: np.ones(len(offsets), bool))
    assert len(calls) == 2 and sum(got[0].counts.values()) == 2000  # hour and day


def _step(event: str | None, filters: object = None) -> FunnelStep:
    return FunnelStep(event, (), parse_filters(filters))


KEEPING = [
    FunnelDefinition(1, (_step("view"), _step("buy", [{"key": "amount", "value": 50, "operator": "gt",
                                                        "type": "event"}])), summaries=True),
    FunnelDefinition(1, (_step("view", [{"key": "$browser", "value": ["Chrome"], "operator": "exact",
                                          "type": "event"}]), _step("buy")), summaries=True,
                     breakdown=Breakdown((("event", "plan"),)), timezone="Asia/Kathmandu"),
    FunnelDefinition(1, (_step("view"), _step(None, [{"key": "plan", "value": "pro", "operator": "icontains",
                                                      "type": "event"}])),
                     exclusions=(Exclusion(_step("other"), 0, 1),), timezone="America/Sao_Paulo"),
    FunnelDefinition(1, (_step("view"), _step("buy")), every_event=True, keep_names=True, summaries=True),
    PathDefinition(1, ("$pageview", "custom_event"), (), parse_filters([
        {"key": "$browser", "operator": "is_set", "type": "event"}])),
    PathDefinition(1, (), ("buy", "view")),
]


def _kept_per_event(definition: object, events: list[ArchivedEvent], shards: int, fence: dict[int, int],
                    people: dict[str, dict[str, object]] | None = None) -> dict[int, tuple[dict, dict]]:
    """The live batch's rule (batch.py `batch_effects`) over the same events, in offset order."""
    occurrences = []
    for e in events:
        b = trend_buckets(e.event, ZoneInfo(definition.timezone))  # type: ignore[attr-defined]
        o = Occurrence.of(e.event, b.hour, b.day, 0, e.offset)
        o.person = e.person
        person_props = (people or {}).get(e.event.distinct_id, {})
        hit = definition.contribution(e.event.event, e.event.properties, person_props, NOW)  # type: ignore[attr-defined]
        o.contributions = [("h", hit[0], hit[1])] if hit is not None else None
        occurrences.append(o)
    effects = batch_effects(occurrences, KnownFirsts(), flags={"h": definition.flags},  # type: ignore[attr-defined]
                            shards=shards, fences={s: {0: f + 1} for s, f in fence.items()})
    out: dict[int, tuple[dict, dict]] = {s: ({}, {}) for s in range(shards)}
    for s, sh in effects.shards.items():
        out[s] = ({day: rows for (_, day), rows in sh.kept_days.items()},
                  {p: by_definition["h"] for p, by_definition in sh.kept_persons.items()})
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), which=st.integers(0, len(KEEPING) - 1), shards=st.integers(1, 3))
def test_history_kept_equals_the_live_batch_rule(seed: int, which: int, shards: int) -> None:
    rng = random.Random(seed)
    events = _events(rng, rng.randrange(0, 300))
    for e in events[::7]:
        e.event.properties.pop("$current_url", None)
    definition = KEEPING[which]
    assert definition.columnar
    fence = {s: rng.randrange(-1, 200) for s in range(shards)}
    got = history_kept(definition, table_of(events), NOW, HOT, shards, lambda offsets, s: offsets > fence[s])
    expected = _kept_per_event(definition, events, shards, fence)
    for s in range(shards):
        days, persons = expected[s]
        assert (got[s].days, got[s].persons) == (days, {p: "".join(kept) for p, kept in persons.items()})
        assert got[s].events == sum(len(v) for v in (persons or days).values())
        assert got[s].sizes == {p: len("".join(kept).encode()) for p, kept in persons.items()}


def test_day_rows_read_as_columns_equal_each_row_read_alone() -> None:
    rows = [day_row(7, 1_717_200_000_123, "u-1", '[2,0,"a|b"]').encode(), day_row(12, -5, "u2", "[4,0,\"\"]").encode()]
    persons, stamps, uuids, values = read_day_rows(rows)
    assert list(zip(map(str, persons.tolist()), stamps.tolist(), uuids.to_pylist(), values.to_pylist(),
                    strict=True)) == [read_day_event(r) for r in rows]


VALUED = [
    Definition(1, "buy", parse_filters([{"key": "plan", "value": ["pro", "7"], "operator": "exact", "type": "event"}]),
               value_property=("event", "amount"), keep_values=True),
    Definition(1, None, parse_filters([{"key": "$browser", "operator": "is_set", "type": "event"}]),
               Breakdown((("event", "plan"),)), per_actor=True),
]
CORRELATION = FunnelDefinition(1, (_step("view"), _step("buy")), every_event=True, keep_names=True,
                               property_events=("buy",))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_a_live_batch_evaluates_each_distinct_input_once_with_the_per_event_result(seed: int) -> None:
    """`contributions` evaluates a definition reading only the event's name and a few properties once
    per distinct (name, values) of the batch: every event still gets exactly what its own evaluation
    gives, whatever the values' types (1, 1.0, true, "7", null, a list, missing)."""
    from dataflows.definitions import contributions

    rng = random.Random(seed)
    events = _events(rng, 400)
    definitions = {f"h{i}": d for i, d in enumerate([*DEFINITIONS, *KEEPING, *VALUED, CORRELATION])}
    assert all(d.columnar for d in definitions.values() if d is not CORRELATION) and not CORRELATION.columnar
    items = []
    for e in events:
        o = Occurrence.of(e.event, 0, "20240601", 0, e.offset)
        o.person = e.person
        items.append(o)
    flags, failed = contributions(None, 1, definitions, items, NOW)  # type: ignore[arg-type]
    assert failed == {} and set(flags) == set(definitions)
    for o in items:
        expected = [(h, *hit) for h, d in definitions.items()
                    if (hit := d.contribution(o.event, o.source.properties, {}, NOW)) is not None]
        assert (o.contributions or []) == expected
    assert sum(len(o.contributions or ()) for o in items) > len(items) // 2


def test_property_sums_past_a_double_keep_partial_sums_as_the_live_batch_does() -> None:
    """Two values near the largest double in one bucket: their sum is no double, so the partial sums
    go to Redis apart (it adds them in long double), exactly as `DefinitionSums.add` keeps them."""
    ts = int(datetime(2024, 6, 1, 10, tzinfo=UTC).timestamp() * 1000)
    amounts = [1.5e308, 2.0, 1.5e308, "x", -3.0]
    events = [ArchivedEvent("t", 0, i, 7, "2024-06-01", TopicEvent(f"u{i}", "buy", "d", ts + i, {"amount": a}, 1))
              for i, a in enumerate(amounts)]
    definition = DEFINITIONS[4]
    got = history_sums(definition, table_of(events), NOW, HOT, 1, lambda offsets, s: offsets >= 0)[0]
    assert got.stats == _per_event(definition, events, 1, {0: -1})[0].stats
    hour = next(k for k in got.stats if k[1].startswith("h"))
    assert got.stats[hour] == [[1.5e308 + 2.0, 1.5e308 - 3.0], 4, -3.0, 1.5e308]


def test_count_per_actor_and_quantile_sums_equal_the_per_event_rule_over_a_busy_day() -> None:
    """Few persons, many events in one day: each person's events per bucket and every value, in order."""
    rng = random.Random(3)
    day = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp() * 1000)
    events = [ArchivedEvent("t", 0, i, rng.randrange(1, 4), "2024-06-01",
                            TopicEvent(f"u{i}", rng.choice(["view", "buy"]), "d", day + rng.randrange(3 * 3_600_000),
                                       {"$browser": rng.choice(["Chrome", "Safari"]), "plan": "pro",
                                        "amount": rng.choice([1, 2.5, "3", None])}, 1))
              for i in range(200)]
    for definition in DEFINITIONS[-2:]:
        got = history_sums(definition, table_of(events), NOW, HOT, 2, lambda offsets, s: offsets >= 0)
        expected = _per_event(definition, events, 2, {0: -1, 1: -1})
        for s in range(2):
            _assert_same_sums(got[s], expected[s])
        assert any(n > 1 for s in range(2) for actors in got[s].actors.values() for n in actors.values()) or \
            definition.keep_values


PERSON_DEFINITIONS = [
    Definition(1, "view", parse_filters([{"key": "plan", "value": ["pro"], "operator": "exact", "type": "person"}])),
    Definition(1, None, parse_filters([{"key": "$browser", "value": ["Chrome"], "operator": "exact", "type": "event"}]),
               Breakdown((("person", "plan"), ("event", "$current_url"))), timezone="Asia/Kathmandu"),
    Definition(1, "buy", parse_filters({"type": "OR", "values": [
        {"key": "seats", "value": 3, "operator": "gt", "type": "person"},
        {"key": "plan", "operator": "is_not_set", "type": "person"}]}), value_property=("person", "seats"),
        keep_values=True),
]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), which=st.integers(0, len(PERSON_DEFINITIONS) - 1), shards=st.integers(1, 3))
def test_history_sums_of_definitions_reading_person_properties_equal_the_per_event_rule(
        seed: int, which: int, shards: int) -> None:
    """Person properties come by distinct_id (a snapshot, as the event-by-event backfill reads them):
    the distinct inputs are then pairs of an event input and a person input."""
    rng = random.Random(seed)
    events = _events(rng, rng.randrange(0, 400))
    people: dict[str, dict[str, object]] = {}
    for d in range(17):
        props: dict[str, object] = {}
        for key, choices in (("plan", ["free", "pro", None, 3]), ("seats", [1, 5, "7", None])):
            if rng.random() < 0.7:
                props[key] = rng.choice(choices)
        if rng.random() < 0.9:  # the others have no person yet
            people[f"d{d}"] = props
    definition = PERSON_DEFINITIONS[which]
    fence = {s: rng.randrange(-1, 200) for s in range(shards)}
    got = history_sums(definition, table_of(events), NOW, HOT, shards, lambda offsets, s: offsets > fence[s], people)
    expected = _per_event(definition, events, shards, fence, people)
    for s in range(shards):
        _assert_same_sums(got[s], expected[s])
    with pytest.raises(ValueError):  # never silently without them
        history_sums(definition, table_of(events), NOW, HOT, shards, lambda offsets, s: offsets > fence[s])


PERSON_KEEPING = [
    FunnelDefinition(1, (_step("view", [{"key": "plan", "value": ["pro"], "operator": "exact", "type": "person"}]),
                         _step("buy")), summaries=True),
    FunnelDefinition(1, (_step("view"), _step("buy")), breakdown=Breakdown((("person", "plan"),)),
                     exclusions=(Exclusion(_step("other", [{"key": "seats", "value": 3, "operator": "gt",
                                                             "type": "person"}]), 0, 1),), timezone="Asia/Kathmandu"),
    PathDefinition(1, ("$pageview", "custom_event"), (), parse_filters([
        {"key": "plan", "operator": "is_set", "type": "person"}])),
]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), which=st.integers(0, len(PERSON_KEEPING) - 1), shards=st.integers(1, 3))
def test_history_kept_of_funnels_and_paths_reading_person_properties_equals_the_live_batch_rule(
        seed: int, which: int, shards: int) -> None:
    rng = random.Random(seed)
    events = _events(rng, rng.randrange(0, 300))
    people = {f"d{d}": {"plan": rng.choice(["free", "pro"]), "seats": rng.choice([1, 5])}
              for d in range(17) if rng.random() < 0.8}
    definition = PERSON_KEEPING[which]
    assert definition.uses_person
    fence = {s: rng.randrange(-1, 200) for s in range(shards)}
    got = history_kept(definition, table_of(events), NOW, HOT, shards, lambda offsets, s: offsets > fence[s], people)
    expected = _kept_per_event(definition, events, shards, fence, people)
    for s in range(shards):
        days, persons = expected[s]
        assert (got[s].days, got[s].persons) == (days, {p: "".join(kept) for p, kept in persons.items()})
    with pytest.raises(ValueError):
        history_kept(definition, table_of(events), NOW, HOT, shards, lambda offsets, s: offsets > fence[s])

