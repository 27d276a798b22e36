"""A request the server refuses: its HTTP status and a message for the client, answered as
`{"error": {"message", "type", "param", "code"}}` (OpenAI's error shape) by both APIs — never a
200 carrying an error string, as Megatron-LM's server answers."""

from __future__ import annotations

from http import HTTPStatus


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        kind = HTTPStatus(self.status).phrase.lower().replace(" ", "_").replace("-", "_")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.status}}
