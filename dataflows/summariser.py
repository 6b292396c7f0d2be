"""The dataflow's summariser: turns dirty persons' kept events into their summaries and writes them.

Kept events it cannot use (stored by an older version, or damaged) are dead-lettered before they are
dropped from the person, so nothing leaves unrecorded. Every dataflow worker summarises when idle,
taking random dirty persons of its own share (person % workers == its index), so no two workers
summarise one person (two that did would write the same thing, twice the work).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dataflows.operators.history_summaries import KeptColumns, Summarised, summaries_by_columns
from dataflows.operators.summaries import summarise_groups
from dataflows.services import Letter
from state.records import rewritten_log
from state.summaries import SummaryStore

SLICE = 1000  # persons summarised per write: the next slice is read and summarised while one is written


class Summariser:
    def __init__(self, store: SummaryStore, dead_letters: Callable[[list[Letter]], None], worker: int = 0,
                 workers: int = 1) -> None:
        self.store, self.dead_letters = store, dead_letters
        self.worker, self.workers = worker, workers
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="summaries")

    def pending(self, project_id: int, h: str) -> int:
        return self.store.pending(project_id, h)

    def drain(self, definition: Any, budget: int = 5000) -> int:
        """Summarise up to `budget` of this worker's dirty persons; returns how many were written."""
        self.store.mark_merges(definition.project_id, definition.hash)
        found = self.store.dirty(definition.project_id, definition.hash, budget * self.workers)
        return self.summarise(definition, [p for p in found if int(p) % self.workers == self.worker][:budget])

    def summarise(self, definition: Any, persons: Iterable[str]) -> int:
        """Summarise the groups of these persons: each survivor of merges with everyone merged into it
        (state/summaries.py); many at once over columns (`summarise_groups`). In slices of `SLICE`
        persons, each written on a thread of its own while the next is read and summarised: the
        writes took about a quarter of a backlog's summarising, Python waiting for Redis. A group met
        in two slices is summarised twice, the same way; a write is refused for a person whose kept
        events moved since they were read, so the order of the writes does not matter."""
        persons = list(persons)
        written = 0
        pending: Future[int] | None = None
        try:
            for start in range(0, len(persons), SLICE):
                write = self._summarised(definition, persons[start:start + SLICE])
                if pending is not None:
                    written += pending.result()
                pending = self._writer.submit(write)
        finally:
            if pending is not None:  # its failure (Redis away) is the caller's, as a write here would be
                written += pending.result()
        return written

    def _summarised(self, definition: Any, persons: list[str]) -> Callable[[], int]:
        """Read and summarise these persons' groups, dead-letter what cannot be used (before the events
        leave the person: never lost unrecorded), and return the write, to run later."""
        pid, h = definition.project_id, definition.hash
        found = self.store.kept_groups(pid, h, persons, self.store.overrides(pid))
        summaries = summarise_groups(definition, {s: {m: kept.records for m, kept in group.items()}
                                                  for s, group in found.items()})
        planned = [(member, found[survivor][member], plan) for survivor, plans in summaries.items()
                   for member, plan in plans.items()]
        letters = [Letter(value, f"kept event of definition {h}: {reason}", rid, {"source": "summariser"})
                   for _, _, plan in planned for value, reason, rid in plan.dropped]
        self.dead_letters(letters)
        writes = [(member, kept.version, plan.irregular,
                   None if plan.replacement is None else rewritten_log(kept.log, h, plan.replacement, kept.version),
                   plan.entries) for member, kept, plan in planned]
        return lambda: len(self.store.write(pid, h, writes))

    def backfilled_summaries(self, definition: Any, kept: KeptColumns) -> Summarised:
        """The summaries of a backfill's persons from its kept events as columns, to write with
        `SummaryStore.write_backfilled` (which writes a person only if those are all its kept events,
        so a person live or the topic's tail added to stays dirty). Persons of a merge are left out:
        their summaries are made from their group's events, by the summariser."""
        overrides = self.store.overrides(definition.project_id)
        merged = set(overrides.final) | set(overrides.members)
        return summaries_by_columns(definition, kept, merged)

    def write_backfilled(self, definition: Any, summarised: Summarised, sizes: dict[int, int], start: int,
                         stop: int) -> int:
        """Write the summaries of `summarised.persons[start:stop]` (`SummaryStore.write_backfilled`);
        returns how many persons were written."""
        return self.store.write_backfilled(definition.project_id, definition.hash, summarised, sizes, start, stop)
