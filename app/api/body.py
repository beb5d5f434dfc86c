"""Reading a request body: within a size limit, a deadline, a minimum rate and a shared byte budget.

A body is read before the request takes a place in the scoring queue, so a client that sends its
headers and then stalls holds a socket and the bytes it sent, never a queue slot. What it may hold
is bounded three ways:
- time: the whole body within `timeout_s`, and after `grace_s` at least `min_rate` bytes/s on
  average since reading began (a client dripping a byte every few seconds is cut off within
  seconds, not at the deadline); otherwise 408 and the connection is closed;
- size: `max_bytes` per body, refused before reading where Content-Length declares more (413);
- memory: the bytes of all bodies being read, parsed or scored at once stay within the budget
  (503 with Retry-After beyond it). Bytes are counted as they arrive, not as declared, so a slow
  client declaring a large body cannot reserve the budget it never sends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request

from app.api.errors import ClientClosed, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from app.engine.errors import Overloaded

# Whatever follows an unread body on the connection cannot be parsed: close it after answering.
CLOSE = {"Connection": "close"}


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    timeout_s: float = 30.0
    min_rate: float = 16 * 1024  # bytes/s, averaged since reading began
    grace_s: float = 2.0  # before the rate applies: a connection's first round trips


class BodyBudget:
    """Bytes of request bodies held at once. Only the event loop touches it, so it needs no lock.
    `observe` is told every new total (the service's gauge)."""

    def __init__(self, limit: int, observe: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.held = 0
        self.observe = observe

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise Overloaded(
                f"request bodies in flight would exceed the memory budget of {self.limit} bytes",
                {"held": self.held, "limit": self.limit},
                headers={"Retry-After": "1", **CLOSE},
            )
        self.held += size
        if self.observe is not None:
            self.observe(self.held)

    def give(self, size: int) -> None:
        self.held -= size
        if self.observe is not None:
            self.observe(self.held)


def check_encoding(request: Request) -> None:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"content encoding {encoding!r}; send the body uncompressed", {"accepted": ["identity"]}
        )


@contextlib.asynccontextmanager
async def read_body(request: Request, limits: BodyLimits, budget: BodyBudget) -> AsyncIterator[bytearray]:
    """The whole body, held against the budget until the block ends (its parse and scoring)."""
    check_encoding(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        limit = limits.max_bytes
        raise PayloadTooLarge(f"body of {declared} bytes; the limit is {limit}", {"limit": limit}, CLOSE)
    body = bytearray()
    try:
        await _receive_into(body, request, limits, budget)
        yield body
    finally:
        budget.give(len(body))


async def _receive_into(body: bytearray, request: Request, limits: BodyLimits, budget: BodyBudget) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + limits.timeout_s
    while True:
        # By when the next bytes must come: the deadline, or where the average rate falls too low.
        by_rate = start + limits.grace_s + len(body) / limits.min_rate
        try:
            async with asyncio.timeout_at(min(end, by_rate)):
                message = await request.receive()
        except TimeoutError:
            elapsed = loop.time() - start
            reason = (
                f"the body was not complete within {limits.timeout_s:g} s"
                if by_rate >= end
                else f"the body arrived slower than {limits.min_rate:g} bytes/s "
                f"({len(body)} bytes in {elapsed:.1f} s)"
            )
            detail = {"received": len(body), "timeout_s": limits.timeout_s, "min_rate": limits.min_rate}
            raise RequestTimeout(reason, detail, CLOSE) from None
        if message["type"] == "http.disconnect":
            raise ClientClosed(f"the client closed the connection after sending {len(body)} bytes")
        chunk = message.get("body", b"")
        if len(body) + len(chunk) > limits.max_bytes:
            limit = limits.max_bytes
            raise PayloadTooLarge(f"body larger than the limit of {limit} bytes", {"limit": limit}, CLOSE)
        budget.take(len(chunk))
        body += chunk
        if not message.get("more_body", False):
            return
