"""A request body over a size is refused (413) while it arrives: the limits on prompts count
tokens, which needs the body parsed and tokenized first — on the event loop, all of it."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """ASGI middleware: a declared Content-Length over `limit` is refused before reading, and a
    chunked body as soon as it passes the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # FastAPI passes an HTTPException through as it is
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_big = declared.isdigit() and int(declared) > self.limit
        await self.app(scope, self._refuse if too_big else counted, send)  # _refuse: never read

    async def _refuse(self) -> Message:
        raise HTTPException(413, f"request body over {self.limit} bytes")
