"""Projects and personal API keys: what they are and how a key is checked (no I/O; stored by
`state/registry.py`)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

VALID_SCOPES = {"insight:read", "insight:write", "access_control:read", "access_control:write",
                "activity_log:read", "*"}


class RegistryError(ValueError):
    """A project or key that cannot be created as asked."""


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    token: str
    timezone: str = "UTC"
    week_start_day: int = 0
    test_account_filters: list[dict[str, Any]] = field(default_factory=list)
    path_cleaning_filters: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> Project:
        return cls(**orjson.loads(raw))


@dataclass(frozen=True)
class ApiKey:
    value_hash: str
    projects: list[int]
    scopes: list[str]
    label: str = ""

    def allows(self, scope: str) -> bool:
        if "*" in self.scopes or scope in self.scopes:
            return True
        obj, _, action = scope.partition(":")
        return action == "read" and f"{obj}:write" in self.scopes


def hash_key(value: str) -> str:
    return "sha256$" + hashlib.sha256(value.encode()).hexdigest()


