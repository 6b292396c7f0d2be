"""The dataflow's summariser: turns dirty persons' kept events into their summaries and writes them.

Kept events it cannot use (stored by an older version, or damaged) are dead-lettered before they are
dropped from the person, so nothing leaves unrecorded. Every dataflow worker summarises when idle,
taking random dirty persons of its own share (person % workers == its index), so no two workers
summarise one person (two that did would write the same thing, twice the work).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from dataflows.operators.summaries import summarise_person
from dataflows.services import Letter
from state.summaries import SummaryStore


class Summariser:
    def __init__(self, store: SummaryStore, dead_letters: Callable[[list[Letter]], None], worker: int = 0,
                 workers: int = 1) -> None:
        self.store, self.dead_letters = store, dead_letters
        self.worker, self.workers = worker, workers

    def pending(self, project_id: int, h: str) -> int:
        return self.store.pending(project_id, h)

    def drain(self, definition: Any, budget: int = 5000) -> int:
        """Summarise up to `budget` of this worker's dirty persons; returns how many were written."""
        found = self.store.dirty(definition.project_id, definition.hash, budget * self.workers)
        return self.summarise(definition, [p for p in found if int(p) % self.workers == self.worker][:budget])

    def summarise(self, definition: Any, persons: Iterable[str]) -> int:
        persons = list(persons)
        raws = self.store.kept_events(definition.project_id, definition.hash, persons)
        plans = [(person, raw, summarise_person(definition, person, raw)) for person, raw in
                 zip(persons, raws, strict=True)]
        letters = [Letter(value, f"kept event of definition {definition.hash}: {reason}", rid, {"source": "summariser"})
                   for _, _, plan in plans for value, reason, rid in plan.dropped]
        self.dead_letters(letters)  # before the events leave the person: never lost unrecorded
        return self.store.write(definition.project_id, definition.hash,
                                [(person, len(raw), plan.irregular, plan.replacement, plan.entries)
                                 for person, raw, plan in plans])
