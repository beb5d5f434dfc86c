"""uvicorn's httptools protocol with the two bounds it lacks and one refusal, for a service exposed
without a proxy.

A hostile-client audit found that uvicorn (0.55, httptools) keeps a request head of any size (a
64 MiB header was read into memory and answered 200) and queues pipelined requests without limit:
one connection that sent `GET /healthz` pipelined and never read the answers grew the process by
400 MB in 6 s, since every answer resumes reading and the next read queues thousands more. nginx
in front (deploy/nginx) bounds both; these bounds hold where it is not.

- A request head (request line and headers) above MAX_HEAD_BYTES is answered 431 and the
  connection closed.
- A connection may queue MAX_PIPELINED requests behind the one being answered. Beyond that, the
  requests already queued are answered in order, the last with `Connection: close`, and nothing
  more is read: requests the server never accepted, which an HTTP client retries on a new
  connection (RFC 9112, 9.3.2).
- A request head must arrive whole within `head_timeout_s` (ANOMALY_HEAD_TIMEOUT_S) of the
  connection's opening, or of the head's first byte on a kept-alive connection: otherwise 408 and
  the connection is closed. uvicorn's keep-alive timeout acts only after a response, so a
  connection that sent nothing, or a header line every few seconds, was held until the process ran
  out of file descriptors (an audit held 33 for 45 s, untouched). A response still owed on the
  connection is sent first, as for the refusals below.
- A body sent with a transfer coding besides `chunked` (`Transfer-Encoding: gzip, chunked`) is
  answered 501 naming the coding, as RFC 9112 (6.1) asks of a server that does not implement it:
  httptools removes the chunking and leaves the rest, so the body reached the app still gzipped
  and was refused as malformed JSON. Codings that leave `chunked` out of the last place, or name
  it twice, leave the body's length unknown: httptools answers those 400 itself.

Each refusal follows the answers owed on its connection: the requests before it are answered, in
order, then the refusal (the pipelining bound's closes without one), then the connection closes,
lingering: our side ends, and what the client still sends is read and dropped for up to LINGER_S
(and LINGER_BYTES), so that the kernel does not reset the connection, and lose the refusal, over
unread bytes. A request httptools cannot parse is answered 400 naming httptools' reason, the same
way. A refusal mid-body of the request being answered (a malformed chunk, trailers beyond the head
limit) is sent at once, and the app, told the connection is gone, counts the request with that
status.

Each answer given here, as it is sent, and each 400 httptools gives a malformed request, is reported
to the callable the app's lifespan puts in its state under REFUSED (status, reason): the service counts
them in /metrics, which the app's own counters cannot, since the app never sees these requests.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # nginx's default large_client_header_buffers hold 4 x 8 KiB
MAX_PIPELINED = 32
# Set in a request's ASGI scope, to (status, message), when the HTTP layer answered it itself mid-body
# (a malformed chunk size, say): the app then sees the connection close, and must count that answer,
# not a client gone.
MALFORMED = "anomaly_scores.malformed"
HEAD_TIMEOUT_S = 10.0  # nginx's client_header_timeout is 60 s; a client sends its head in one go
# After a refusal, how long the client's further bytes are read and dropped, and how many at most
LINGER_S, LINGER_BYTES = 2.0, 1024 * 1024  # nginx: 5 s, no byte bound
# The lifespan state's key for the callable told of each request refused here: (status, reason).
REFUSED = "anomaly_scores.refused"
# Every reason passed to it, by status, so a counter can show each series from the start.
REASONS = {
    400: "malformed",
    408: "head_timeout",
    431: "head_too_large",
    501: "transfer_coding",
    503: "pipelined",
}


class Refused(Exception):
    """Raised in a parser callback: httptools stops parsing and uvicorn calls send_400_response."""

    def __init__(
        self, status: int, phrase: str, message: str, detail: dict[str, object], answered: bool = True
    ) -> None:
        super().__init__(message)
        self.status, self.phrase, self.message, self.detail = status, phrase, message, detail
        # False: the connection closes after the answers owed before it, leaving this request
        # unanswered, never accepted, for the client to send again on a new connection.
        self.answered = answered


def _too_large() -> Refused:
    message = f"request line and headers larger than the limit of {MAX_HEAD_BYTES} bytes"
    return Refused(431, "Request Header Fields Too Large", message, {"limit": MAX_HEAD_BYTES})


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, head_timeout_s: float = HEAD_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self.head_deadline: asyncio.TimerHandle | None = None
        self.head_bytes = 0  # of the head being parsed, as its callbacks see it
        # httptools gathers a header's value until it ends before calling on_header, so a header of
        # megabytes is held before it can be counted: the bytes received mid-head count too.
        self.in_head = False
        self.head_received = 0
        self.refusal: Refused | None = None
        self.finishing = False  # the queued requests are answered, nothing more is read
        self.codings: list[str] = []  # the request's transfer codings, over every such header
        self.deferred: Refused | None = None  # sent once the answers owed before it are
        self.linger: asyncio.TimerHandle | None = None
        self.dropped = 0  # bytes read and dropped after a refusal

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        if self.linger is not None:
            self.linger.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self.head_deadline is None:
            self.head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_timed_out(self) -> None:
        self.head_deadline = None
        if self.finishing or self.transport.is_closing():
            return
        t = self.head_timeout_s
        message = f"the request line and headers did not arrive within {t:g} s"
        self.refusal = Refused(408, "Request Timeout", message, {"timeout_s": t})
        self.send_400_response("")

    def data_received(self, data: bytes) -> None:
        if self.finishing:  # the parser stopped in error; the close is on its way
            self.dropped += len(data)
            if self.linger is not None and self.dropped > LINGER_BYTES:
                self.transport.close()  # a client still sending this much is not reading
            return
        if not self.in_head and (self.cycle is None or self.cycle.response_complete):
            # Bytes with no request in progress: blank lines before a request line (which httptools
            # skips without beginning a message), or the rest of a body the app answered without
            # reading. Either re-arms the deadline, which uvicorn's keep-alive timer, cancelled by
            # any byte, would otherwise leave to no one.
            self._arm_head_deadline()
        if self.in_head:
            self.head_received += len(data)
        super().data_received(data)
        if self.in_head and self.head_received > MAX_HEAD_BYTES and not self.finishing:
            self.refusal = _too_large()
            self.send_400_response("")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_deadline()  # a new connection's is running already
        self.in_head, self.head_bytes, self.head_received = True, 0, 0
        self.codings = []

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # ": " and CRLF
        if name.lower() == b"transfer-encoding":
            self.codings += [c.strip().lower() for c in value.decode("latin-1").split(",") if c.strip()]
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_head_deadline()
        self.in_head = False
        others = [c for c in self.codings if c != "chunked"]
        if others and self.codings[-1:] == ["chunked"] and self.codings.count("chunked") == 1:
            coding = ", ".join(self.codings)
            self._refuse(
                Refused(
                    501,
                    "Not Implemented",
                    f"transfer coding {', '.join(others)} is not supported (Transfer-Encoding: {coding}); "
                    "send the body as it is, with Content-Length or chunked alone",
                    {"transfer_encoding": coding},
                )
            )
        if len(self.pipeline) >= MAX_PIPELINED:
            self._refuse(
                Refused(
                    503,
                    "Service Unavailable",
                    f"more than {MAX_PIPELINED} pipelined requests queued on one connection",
                    {"limit": MAX_PIPELINED},
                    answered=False,
                )
            )
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            self._refuse(_too_large())

    def _refuse(self, refusal: Refused) -> None:
        self.refusal = refusal
        raise refusal

    def _report(self, status: int) -> None:
        report: Callable[[int, str], None] | None = self.app_state.get(REFUSED)
        if report is not None:
            report(status, REASONS[status])

    def send_400_response(self, msg: str) -> None:
        refusal, self.refusal = self.refusal, None
        if refusal is None:
            # uvicorn calls this inside its handler of httptools' error, whose text names the fault.
            error = sys.exception()
            reason = str(error) if isinstance(error, httptools.HttpParserError) and str(error) else msg
            refusal = Refused(400, "Bad Request", f"malformed HTTP request: {reason}", {})
        self.finishing = True
        self.flow.pause_reading()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            if not self.pipeline:
                # Mid-body of the request being answered (a bad chunk, trailers beyond the limit):
                # answered here; the app, reading that body or not, is told at once, and its request
                # log counts this answer's status (app.api.logs).
                cycle.scope[MALFORMED] = (refusal.status, refusal.message)  # type: ignore[literal-required]
                self._answer(refusal)
                cycle.disconnected = True
                cycle.message_event.set()
                return
            self.pipeline.popleft()  # queued mid-body, never started: refused in its place
        if not refusal.answered:  # the pipelining bound: a full queue of requests is owed answers
            assert cycle is not None
            self._report(refusal.status)
            cycle.keep_alive = False  # the newest answer says so, and the close follows it
            return
        if self._owes_answers():
            # The requests before the refused one are answered first, in order; the refusal follows
            # the last of them (on_response_complete). Nothing more is read.
            self.deferred = refusal
            return
        self._report(refusal.status)
        self._answer(refusal)

    def _owes_answers(self) -> bool:
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def on_response_complete(self) -> None:
        last = not self.pipeline
        super().on_response_complete()
        if last and self.deferred is not None:
            refusal, self.deferred = self.deferred, None
            if not self.transport.is_closing():  # else the owed answer closed the connection
                self._report(refusal.status)
                self._answer(refusal)

    def _answer(self, refusal: Refused) -> None:
        body = json.dumps({"error": refusal.message, "detail": refusal.detail}).encode()
        head = (
            f"HTTP/1.1 {refusal.status} {refusal.phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self._linger()

    def _linger(self) -> None:
        """Close once the client can have read the answer, as nginx's lingering close does: closing
        with its later bytes unread makes the kernel reset the connection, and a reset can discard
        the answer before the client reads it (an audit lost a 431 that way behind a large answer).
        So: end our side, read and drop what the client still sends until it closes its side (the
        transport then closes), LINGER_S passes or LINGER_BYTES are dropped."""
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()  # data_received drops it: `finishing`
        self.linger = self.loop.call_later(LINGER_S, self.transport.close)
