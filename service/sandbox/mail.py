"""The mail stand-in for `make run`: an SMTP server on loopback that keeps every message as a file.

With it the whole story shows on one machine: the owner's email (after the 401 proof) lands in a
folder as an `.eml` file any mail reader opens, and the incident goes on to `notified` and `closed`.
It speaks only the part of SMTP our sender uses (no TLS, no AUTH), which is all a sandbox needs;
it is not a relay and refuses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from pathlib import Path

logger = logging.getLogger("service.sandbox.mail")

_MAX_LINE = 64 * 1024


class MailSandbox:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._numbers = itertools.count(1)
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_server(self._session, host, port, limit=_MAX_LINE)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _keep(self, data: bytes) -> Path:
        path = self.folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._numbers):04d}.eml"
        path.write_bytes(data)
        return path

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def reply(line: str) -> None:
            writer.write(f"{line}\r\n".encode())
            await writer.drain()

        recipients: list[str] = []
        try:
            await reply("220 leak-responder mail sandbox")
            while line := await reader.readline():
                verb = line.decode("utf-8", "replace").strip().split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    await reply("250 mail sandbox")
                elif verb == "MAIL":
                    recipients = []
                    await reply("250 OK")
                elif verb == "RCPT":
                    recipients.append(line.decode("utf-8", "replace").split(":", 1)[-1].strip(" <>\r\n"))
                    await reply("250 OK")
                elif verb == "DATA":
                    await reply("354 end with <CRLF>.<CRLF>")
                    body = bytearray()
                    while (chunk := await reader.readline()) not in (b".\r\n", b".\n", b""):
                        body += chunk[1:] if chunk.startswith(b"..") else chunk  # dot-unstuffing
                    path = self._keep(bytes(body))
                    logger.info("sandbox mail: kept %s for %s", path.name, ", ".join(recipients))
                    await reply("250 kept")
                elif verb in ("RSET", "NOOP"):
                    await reply("250 OK")
                elif verb == "QUIT":
                    await reply("221 bye")
                    break
                else:
                    await reply("502 not implemented")
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
