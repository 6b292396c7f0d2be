"""A registered definition of any kind, read back from its stored JSON (state/registry.py keeps it).

Apart from `schemas/definitions.py` so the base definition does not import the kinds built on it.
"""

from __future__ import annotations

import orjson

from schemas.definitions import Definition
from schemas.funnels import FunnelDefinition
from schemas.paths import PathDefinition


def load_definition(data: bytes | str) -> Definition | FunnelDefinition | PathDefinition:
    """A stored definition: a trend materialization, a funnel or a paths configuration."""
    kind = orjson.loads(data).get("kind")
    if kind == "funnel":
        return FunnelDefinition.from_json(data)
    if kind == "paths":
        return PathDefinition.from_json(data)
    return Definition.from_json(data)
