"""The persons behind a count, as the people endpoints and correlation show them."""

from __future__ import annotations

from typing import Any

from state.reads import StateReader


def person_details(client: Any, project_id: int, persons: list[str]) -> list[dict[str, Any]]:
    """Each person's id, every distinct id and its properties."""
    return [{"id": int(person), "distinct_ids": ids, "properties": props}
            for person, (ids, props) in zip(persons, StateReader(client).persons(project_id, persons), strict=True)]
