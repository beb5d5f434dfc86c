"""Reading a request body within the size limit, refusing early where the client declares it."""

from __future__ import annotations

from fastapi import Request

from app.api.errors import PayloadTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes; the limit is {limit}", {"limit": limit})
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body larger than the limit of {limit} bytes", {"limit": limit})
        chunks.append(chunk)
    return b"".join(chunks)
