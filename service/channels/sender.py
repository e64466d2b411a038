"""One attempt to deliver one event, classified: the dispatcher decides nothing about HTTP.

Connections go to the address the network rule checked (`network.Target`), with the URL's host in
the Host header and as the TLS server name, so certificates are still checked against the name.
Redirects are never followed (a 3xx could point anywhere, loopback included). The whole attempt,
resolution included, is bounded by `timeout`, and only the status line and headers are read: a
slow or chatty endpoint holds one slot of the dispatcher for at most that long.

It speaks through httpcore, below httpx, on purpose: Sentry's httpx integration records every
request's URL as a breadcrumb of the next event, and a channel's URL is a secret (a Slack webhook URL
is its own credential). httpcore is not instrumented, and it never follows redirects either.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpcore

from service import backoff
from service.channels import signing
from service.channels.network import AddressPolicy, AddressRefused, ResolutionFailed
from service.reasons import Reason
from service.store import ChannelJob, ChannelType


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to: `reason` is None when it was delivered."""

    reason: Reason | None
    status: int | None = None
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.reason in (
            Reason.SERVER_ERROR,
            Reason.RATE_LIMITED,
            Reason.TIMEOUT,
            Reason.CONNECTION_ERROR,
        )


class ChannelSender:
    def __init__(
        self,
        policy: AddressPolicy,
        *,
        timeout: float,
        concurrency: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self._clock = clock
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(),
            max_connections=concurrency,
            max_keepalive_connections=concurrency,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def send(self, job: ChannelJob, body: bytes, message_id: str) -> Attempt:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._send(job, body, message_id)
        except TimeoutError:
            return Attempt(Reason.TIMEOUT)

    async def _send(self, job: ChannelJob, body: bytes, message_id: str) -> Attempt:
        try:
            target = await self.policy.resolve(job.url)
        except AddressRefused:
            return Attempt(Reason.CHANNEL_ADDRESS_REFUSED)
        except ResolutionFailed:
            return Attempt(Reason.CONNECTION_ERROR)
        headers = {"Host": target.host_header, "User-Agent": "leak-responder"}
        if job.type is ChannelType.WEBHOOK:
            assert job.secret is not None, "a webhook channel is only recorded with its secret"
            headers["Content-Type"] = "application/cloudevents+json"
            headers.update(signing.headers(job.secret, message_id, int(self._clock()), body))
        else:
            headers["Content-Type"] = "application/json"
        extensions: dict[str, object] = {
            "timeout": dict.fromkeys(("connect", "read", "write", "pool"), self.timeout)
        }
        if target.scheme == "https":
            extensions["sni_hostname"] = target.host
        try:
            async with self._pool.stream(
                "POST", target.connect_url, headers=list(headers.items()), content=body, extensions=extensions
            ) as response:
                status = response.status
                retry_after = next(
                    (v.decode("latin-1") for k, v in response.headers if k.lower() == b"retry-after"), None
                )
        except httpcore.TimeoutException:
            return Attempt(Reason.TIMEOUT)
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol):
            return Attempt(Reason.CONNECTION_ERROR)
        return classify(status, retry_after)


def classify(status: int, retry_after: str | None = None) -> Attempt:
    """2xx delivered; 410 stop; 429, 5xx retry; 3xx not followed; any other answer refused."""
    if 200 <= status < 300:
        return Attempt(None, status)
    if status == 410:
        return Attempt(Reason.CHANNEL_GONE, status)
    if status == 429:
        return Attempt(Reason.RATE_LIMITED, status, backoff.retry_after(retry_after))
    if status >= 500:
        return Attempt(Reason.SERVER_ERROR, status)
    if 300 <= status < 400:
        return Attempt(Reason.CHANNEL_REDIRECTED, status)
    return Attempt(Reason.CHANNEL_REJECTED, status)
