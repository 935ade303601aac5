"""The error every front end reports the same way: a field, its value, and what is allowed."""

from __future__ import annotations

from typing import Any


class RequestError(ValueError):
    """A request field with a value that is not allowed. `field` names it for every front end."""

    def __init__(self, field: str, value: Any, allowed: str, why: str = "is not allowed"):
        self.field, self.value, self.allowed = field, value, allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}={shown} {why}; allowed: {allowed}")


class Cancelled(Exception):
    """Raised by an `on_step` callback to stop a generation between steps."""
