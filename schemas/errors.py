"""The one error a request parser raises: a clear detail and PostHog's `attr` (`events__0__math`)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that cannot be answered; `code` is PostHog's (`invalid_input`, `unsupported`, …)."""

    def __init__(self, detail: str, attr: str | None = None, code: str = "invalid_input") -> None:
        super().__init__(detail)
        self.detail, self.attr, self.code = detail, attr, code
