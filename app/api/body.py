"""Reading a request body: within a size limit, a deadline, a minimum rate and a shared byte budget.

A body is read before the request takes a place in the scoring queue, so a client that sends its
headers and then stalls holds a socket and the bytes it sent, never a queue slot. What it may hold
is bounded three ways:
- time: the whole body within `timeout_s`, and at least `min_rate` bytes/s over every window of
  `window_s` (a client dripping a byte every few seconds is cut off within seconds, not at the
  deadline); otherwise 408 and the connection is closed. The rate is measured over the last window,
  not averaged since reading began: an average lets a client send megabytes at once and then hold
  them, stalled, against the shared budget until the deadline, as sixteen such clients did with the
  whole budget for 30 s in an audit;
- size: `max_bytes` per body, refused before reading where Content-Length declares more (413);
- memory: the bytes of all bodies being read, parsed or scored at once stay within the budget
  (503 with Retry-After beyond it). Bytes are counted as they arrive, not as declared, so a slow
  client declaring a large body cannot reserve the budget it never sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import reprlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from email.message import Message

from fastapi import Request

from app.api.errors import (
    BadRequest,
    ClientClosed,
    PayloadTooLarge,
    RefusedMidBody,
    RequestTimeout,
    UnsupportedMediaType,
)
from app.api.protocol import MALFORMED
from app.engine.errors import Overloaded

# Whatever follows an unread body on the connection cannot be parsed: close it after answering.
CLOSE = {"Connection": "close"}


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    timeout_s: float = 30.0
    min_rate: float = 16 * 1024  # bytes/s over every window
    window_s: float = 2.0  # long enough for a connection's first round trips and a congested link's pauses


class BodyBudget:
    """Bytes of request bodies held at once. Only the event loop touches it, so it needs no lock.
    `observe` is told every new total (the service's gauge), `refused` every body refused."""

    def __init__(
        self,
        limit: int,
        observe: Callable[[int], None] | None = None,
        refused: Callable[[], None] | None = None,
    ) -> None:
        self.limit = limit
        self.held = 0
        self.observe = observe
        self.refused = refused

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            if self.refused is not None:
                self.refused()
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


def media_type(request: Request, accepted: Sequence[str], missing: str | None = None) -> str:
    """The request's media type if it is one of `accepted` (a request without a Content-Type is taken
    as `missing`, where given) and, for JSON, names no charset but UTF-8; 415 otherwise. JSON is
    UTF-8 (RFC 8259): a body in another charset would be read wrongly, not refused, if its label were
    ignored. A binary type's charset means nothing and is not judged."""
    headers = request.headers.getlist("content-type")
    if len(headers) > 1:  # which one the client meant is not ours to guess
        raise BadRequest("Content-Type given more than once", {"content_type": [h[:100] for h in headers]})
    header = headers[0] if headers else ""
    kind = header.partition(";")[0].strip().lower()
    if not kind and missing is not None:
        return missing
    if kind not in accepted:
        given = f"content type {reprlib.repr(kind)}" if kind else "no content type"
        raise UnsupportedMediaType(f"{given}; send one of {list(accepted)}", {"accepted": list(accepted)})
    if kind == "application/json" and ";" in header:
        # the parameters as RFC 2045 reads them, quoted strings whole (the compat32 parser: 15 us,
        # where EmailMessage's header registry takes 200)
        parsed = Message()
        parsed["content-type"] = header
        charsets = [value for name, value in parsed.get_params(failobj=[])[1:] if name.lower() == "charset"]
        if len(charsets) > 1 or any(c.lower() not in ("utf-8", "utf8") for c in charsets):
            shown = reprlib.repr(", ".join(charsets))
            raise UnsupportedMediaType(f"charset {shown}; send the body in UTF-8", {"accepted": ["utf-8"]})
    return kind


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
    per_window = limits.min_rate * limits.window_s
    # (time, bytes so far) of the arrivals that the coming windows still count: the window ending at
    # t holds too few bytes once it has passed the first arrival after which fewer than `per_window`
    # bytes came, so the next bytes are due `window_s` after that arrival.
    arrivals = deque([(start, 0)])
    while True:
        while arrivals[0][1] <= len(body) - per_window:
            arrivals.popleft()
        by_rate = arrivals[0][0] + limits.window_s
        try:
            async with asyncio.timeout_at(min(end, by_rate)):
                message = await request.receive()
        except TimeoutError:
            elapsed = loop.time() - start
            reason = (
                f"the body was not complete within {limits.timeout_s:g} s"
                if by_rate >= end
                else f"the body arrived slower than {limits.min_rate:g} bytes/s over {limits.window_s:g} s "
                f"({len(body)} bytes in {elapsed:.1f} s)"
            )
            detail = {"received": len(body), "timeout_s": limits.timeout_s, "min_rate": limits.min_rate}
            raise RequestTimeout(reason, detail, CLOSE) from None
        if message["type"] == "http.disconnect":
            if MALFORMED in request.scope:
                status, reason = request.scope[MALFORMED]
                raise RefusedMidBody(
                    status,
                    f"the HTTP layer refused the request mid-body ({reason}) after {len(body)} bytes",
                )
            raise ClientClosed(f"the client closed the connection after sending {len(body)} bytes")
        chunk = message.get("body", b"")
        if len(body) + len(chunk) > limits.max_bytes:
            limit = limits.max_bytes
            raise PayloadTooLarge(f"body larger than the limit of {limit} bytes", {"limit": limit}, CLOSE)
        budget.take(len(chunk))
        body += chunk
        if not message.get("more_body", False):
            return
        if chunk:
            arrivals.append((loop.time(), len(body)))
