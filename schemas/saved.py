"""Saved insights: the writable fields and how they are checked, owners and access levels (spec §12,
§13, §14; no I/O: stored by `state/saved.py`)."""

from __future__ import annotations

import hashlib
import string
import time
from typing import Any

WRITABLE = ("name", "derived_name", "filters", "query", "order", "deleted", "dashboards", "description", "tags",
            "favorited", "saved")
MATERIAL = ("name", "description", "filters", "query")
SHORT_ID_ALPHABET = string.ascii_letters + string.digits


class InsightError(ValueError):
    def __init__(self, detail: str, attr: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.attr = detail, attr


def tagify(tags: Any) -> list[str]:
    if not isinstance(tags, list):
        raise InsightError("tags must be a list of strings", "tags")
    return list(dict.fromkeys(str(t).strip().lower() for t in tags if str(t).strip()))


def validate(fields: dict[str, Any]) -> dict[str, Any]:
    """Only the writable fields, each checked as PostHog's serializer does."""
    out = {k: v for k, v in fields.items() if k in WRITABLE}
    for name in ("name", "derived_name", "description"):
        value = out.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 400):
            raise InsightError("Ensure this field has no more than 400 characters and is a string.", name)
    if "filters" in out and not isinstance(out["filters"], dict):
        raise InsightError("filters must be a JSON object", "filters")
    if "query" in out and out["query"] is not None and not isinstance(out["query"], dict):
        raise InsightError("query must be a JSON object", "query")
    if "order" in out and out["order"] is not None and not isinstance(out["order"], int):
        raise InsightError("A valid integer is required.", "order")
    for flag in ("deleted", "favorited", "saved"):
        if flag in out and not isinstance(out[flag], bool):
            raise InsightError("Must be a valid boolean.", flag)
    if "tags" in out:
        out["tags"] = tagify(out["tags"])
    if "dashboards" in out:
        dashboards = out["dashboards"]
        if not isinstance(dashboards, list):
            raise InsightError("dashboards must be a list of dashboard ids", "dashboards")
        if dashboards:
            raise InsightError("Dashboard not found", "dashboards")
    return out


def iso_now() -> str:
    """Now in UTC to the microsecond, seconds and fraction from one reading of the clock (two readings
    straddling a second gave a time up to a second early)."""
    micros = time.time_ns() // 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(micros // 1_000_000)) + f".{micros % 1_000_000:06d}Z"


def owner_of(key_hash: str, label: str = "") -> dict[str, Any]:
    """The API key's owner as PostHog's basic user object (keys are the only principals here)."""
    digest = hashlib.sha256(key_hash.encode()).hexdigest()
    return {"id": int(digest[:8], 16), "uuid": f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-"
            f"{digest[20:32]}", "distinct_id": digest[:16], "first_name": label, "last_name": "", "email": "",
            "is_email_verified": False, "hedgehog_config": None, "role_at_organization": None}


LEVELS = ("none", "viewer", "editor", "manager")
DEFAULT_LEVEL = "editor"


