"""Reading a request body under a byte budget: one request's, and all requests' together."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from service.inbound.reasons import InboundError
from service.observability import BODY_BYTES
from service.reasons import Reason
from service.refusal import Refusal


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


class BodyBudget:
    """The bytes that bodies being read may hold, all requests together.

    Each body reserves what it may grow to (its Content-Length, or the limit when it sends none)
    before a byte is read, and gives it back when its request is done, so a crowd of slow uploads
    costs at most `total` however many there are. A body that does not fit now is a 503 with
    Retry-After: the sender's retry is the queue, and an acknowledged alert is never at stake.
    A Content-Length past the limit is refused from the headers alone.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total

    async def read(self, chunks: AsyncIterator[bytes], headers: Mapping[str, str], limit: int) -> bytes:
        declared = _content_length(headers)
        if declared is not None and declared > limit:
            raise InboundError(Reason.BODY_TOO_LARGE, f"body exceeds the limit of {limit} bytes")
        want = limit if declared is None else declared
        if want > self.free:
            raise InboundError(
                Reason.BODY_BUDGET_FULL,
                "too many bodies are being received at once; retry shortly",
                {"Retry-After": "1"},
            )
        self.free -= want
        BODY_BYTES.set(self.total - self.free)
        try:
            return await read_limited(chunks, limit)
        finally:
            self.free += want
            BODY_BYTES.set(self.total - self.free)

    async def read_as(
        self, chunks: AsyncIterator[bytes], headers: Mapping[str, str], limit: int, too_large: Refusal
    ) -> bytes:
        """`read` for a route that answers in a vocabulary of its own (reports, public reports):
        a body past `limit` is refused with that route's `too_large`, and a full budget is the same
        503 `body_budget_full` everywhere, in the route's refusal type so its handler answers it."""
        try:
            return await self.read(chunks, headers, limit)
        except InboundError as exc:
            if exc.reason is Reason.BODY_BUDGET_FULL:
                raise type(too_large)(exc.reason, exc.message, exc.headers) from None
            raise too_large from None


def _content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None
