"""HEAD wherever GET is served: RFC 9110 (9.1) asks it of every general-purpose server, and uptime
checkers and some load balancers probe with it. FastAPI's routes declare GET alone and answered HEAD
405. The request goes on as a GET; the server sends the answer's head without its body (uvicorn
drops a HEAD response's body), and the request's own log line and metrics still say HEAD."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = scope | {"method": "GET"}
        await self.app(scope, receive, send)
