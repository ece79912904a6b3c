"""The one error every part of the status API raises to answer a request with an HTTP error."""

from __future__ import annotations


class ApiError(Exception):
    """An HTTP error answer: ``status`` and a message for the operator."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
