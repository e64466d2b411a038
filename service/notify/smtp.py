"""Handing a message to the SMTP server named by `LEAK_RESPONDER_SMTP_URL`, with the stdlib client.

smtplib blocks, so each send runs in a worker thread, a few at a time: enough to keep a burst of
owner emails moving, few enough that a slow relay is never hit by a connection storm. Every outcome
is classified the way the outbox needs it: delivered, refused for good (5xx about this recipient or
this message), or worth retrying (the server is down or slow, a 4xx, our own credentials refused).

With credentials in the URL the channel must be encrypted (smtps://, or STARTTLS offered and taken):
a server that offers no STARTTLS is not sent them, and the refusal pages, since no email can go out
until someone fixes the relay or the URL.
"""

from __future__ import annotations

import asyncio
import enum
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

from service.reasons import Reason


class SendOutcome(enum.StrEnum):
    SENT = "sent"
    REFUSED = "refused"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: SendOutcome
    reason: Reason | None = None
    detail: str = ""


_DETAIL_MAX = 200


class _TlsRequired(Exception):
    """Credentials are configured and the connection is not encrypted."""


class SmtpSender:
    def __init__(self, url: str, timeout: float, concurrency: int = 4) -> None:
        parts = urlsplit(url)
        self._implicit_tls = parts.scheme == "smtps"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (465 if self._implicit_tls else 25)
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._tls = ssl.create_default_context()

    @property
    def where(self) -> str:
        """Host and port, for logs; never the credentials of the URL."""
        return f"{self._host}:{self._port}"

    async def send(self, message: EmailMessage, sender: str, recipient: str) -> SendResult:
        async with self._slots:
            return await asyncio.to_thread(self._send, message, sender, recipient)

    def _send(self, message: EmailMessage, sender: str, recipient: str) -> SendResult:
        try:
            with self._connect() as smtp:
                smtp.send_message(message, from_addr=sender, to_addrs=[recipient])
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients.get(recipient, (550, b""))
            return _by_code(code, text, Reason.RECIPIENT_REFUSED)
        except smtplib.SMTPSenderRefused as exc:
            # Our MAIL FROM is refused: a configuration problem, not this owner's; keep retrying.
            return SendResult(
                SendOutcome.RETRY, Reason.SMTP_SENDER_REFUSED, _text(exc.smtp_code, exc.smtp_error)
            )
        except _TlsRequired:
            return SendResult(
                SendOutcome.RETRY,
                Reason.SMTP_TLS_REQUIRED,
                "the server offers no STARTTLS and credentials are never sent in clear;"
                " use smtps:// or a relay with TLS",
            )
        except smtplib.SMTPAuthenticationError as exc:
            return SendResult(
                SendOutcome.RETRY, Reason.SMTP_AUTH_FAILED, _text(exc.smtp_code, exc.smtp_error)
            )
        except (smtplib.SMTPConnectError, smtplib.SMTPHeloError) as exc:
            # The server turned us away before any recipient came up: it, not the owner, is the problem.
            return SendResult(
                SendOutcome.RETRY, Reason.SMTP_UNAVAILABLE, _text(exc.smtp_code, exc.smtp_error)
            )
        except smtplib.SMTPResponseException as exc:
            # A 5xx to DATA is the recipient's server refusing this message: as final as a RCPT 5xx.
            return _by_code(exc.smtp_code, exc.smtp_error, Reason.RECIPIENT_REFUSED)
        except (OSError, smtplib.SMTPException) as exc:
            return SendResult(
                SendOutcome.RETRY, Reason.SMTP_UNAVAILABLE, f"{type(exc).__name__}: {exc}"[:_DETAIL_MAX]
            )
        return SendResult(SendOutcome.SENT)

    def _connect(self) -> smtplib.SMTP:
        if self._implicit_tls:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                self._host, self._port, timeout=self._timeout, context=self._tls
            )
        else:
            smtp = smtplib.SMTP(self._host, self._port, timeout=self._timeout)
        try:
            smtp.ehlo()
            encrypted = self._implicit_tls
            if not encrypted and smtp.has_extn("starttls"):
                smtp.starttls(context=self._tls)
                smtp.ehlo()
                encrypted = True
            if self._user is not None:
                if not encrypted:
                    # AUTH PLAIN and LOGIN are the password in base64: never over a clear channel.
                    raise _TlsRequired
                smtp.login(self._user, self._password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp


def _text(code: int, message: bytes | str) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return f"{code} {message}"[:_DETAIL_MAX]


def _by_code(code: int, message: bytes | str, permanent: Reason) -> SendResult:
    if 500 <= code < 600:
        return SendResult(SendOutcome.REFUSED, permanent, _text(code, message))
    return SendResult(SendOutcome.RETRY, Reason.SMTP_TEMPORARY_FAILURE, _text(code, message))
