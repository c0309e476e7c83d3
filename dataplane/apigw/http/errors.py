"""Errors the gateway itself answers with: a status, a stable `error_type`, and a JSON body."""

from __future__ import annotations

from collections.abc import Mapping


class GatewayError(Exception):
    """Raised anywhere in the request pipeline; the pipeline turns it into the JSON error response.

    `error_type` is a short stable token (e.g. `expired`, `limit_exceeded`) for logs and metrics;
    `message` is what the client reads.
    """

    def __init__(self, status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = dict(headers or {})
