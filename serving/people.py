"""The persons behind a count, as the people endpoints and correlation show them."""

from __future__ import annotations

from typing import Any

import orjson

from state import keys


def person_details(client: Any, project_id: int, persons: list[str]) -> list[dict[str, Any]]:
    """Each person's id, every distinct id and its properties."""
    pipe = client.pipeline(transaction=False)
    for person in persons:
        pipe.smembers(keys.person_distinct_ids(project_id, person))
        pipe.hgetall(keys.person_properties(project_id, person))
    replies = pipe.execute()
    out = []
    for i, person in enumerate(persons):
        ids, props = replies[2 * i], replies[2 * i + 1]
        out.append({"id": int(person), "distinct_ids": sorted(d.decode() for d in ids),
                    "properties": {k.decode(): orjson.loads(v) for k, v in props.items()}})
    return out
