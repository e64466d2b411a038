"""Reading a request body under a byte budget."""

from __future__ import annotations

from collections.abc import AsyncIterator

from service.inbound.reasons import InboundError
from service.reasons import Reason


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """Stop at the first chunk that crosses `limit`.

    Content-Length can be absent (chunked encoding) or lie, so the budget is enforced on the bytes
    actually received; a sender streaming gigabytes costs us at most `limit` plus one chunk.
    """
    received = bytearray()
    async for chunk in chunks:
        if len(received) + len(chunk) > limit:
            raise InboundError(Reason.BODY_TOO_LARGE, f"body exceeds the limit of {limit} bytes")
        received += chunk
    return bytes(received)
