"""Running ASGI apps under uvicorn on loopback: in a background thread for tests, in the current loop for
the `leak-responder sandbox` command.

Tests and benchmarks talk to the sandbox (and to the service) over real HTTP rather than through an
in-process transport, so that timeouts, connection errors and header handling are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

from service.sandbox.github import KEYS_PATH, GitHubSandbox
from service.sandbox.receiver import ChannelReceiver
from service.sandbox.supermemory import SupermemorySandbox, seeded_keys

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 10.0
# In-flight requests get this long at shutdown; a sandbox hang knob must not hold a test run hostage.
_GRACEFUL_SHUTDOWN_S = 2.0


class _Server(uvicorn.Server):
    """uvicorn.Server without its signal handlers: the owner of the process decides how to stop, and
    two servers in one loop would otherwise each replace the other's handler."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(_GRACEFUL_SHUTDOWN_S),
    )


def _bound_port(server: uvicorn.Server) -> int:
    return int(server.servers[0].sockets[0].getsockname()[1])


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerThread:
    """An ASGI app served by uvicorn in a background thread with its own event loop.

    `with ServerThread(app) as server:` returns once the socket is listening; port 0 picks a free port,
    read back from the listening socket.
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server = _Server(_config(app, host, port))
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{host}:{port}", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    def _run(self) -> None:
        try:
            self._server.run()
        # uvicorn reports a failed bind or lifespan startup with sys.exit: keep it for start() to raise.
        except BaseException as exc:
            self._error = exc

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.host}:{self.port} failed to start") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"server on {self.host}:{self.port} did not start in {_STARTUP_TIMEOUT_S}s"
                )
            time.sleep(0.01)
        self.port = _bound_port(self._server)
        return self

    def stop(self) -> None:
        """Graceful shutdown, forced if in-flight requests outlast the grace period."""
        if not self._thread.is_alive():
            return
        self._server.should_exit = True
        self._thread.join(_GRACEFUL_SHUTDOWN_S + 5)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def dev_stand_ins(host: str, receiver_port: int, keys: int) -> tuple[SupermemorySandbox, ChannelReceiver]:
    """The Supermemory stand-in with seeded keys whose orgs' channels point at a receiver on
    `receiver_port`, and that receiver, knowing their webhook secrets."""
    seeded = seeded_keys(keys, receiver=_url(host, receiver_port))
    channels = [c for k in seeded for c in k.channels]
    return SupermemorySandbox(seeded), ChannelReceiver.for_channels(channels, show=True)


async def serve_sandbox(
    host: str, supermemory_port: int, github_port: int, receiver_port: int, keys: int
) -> None:
    """Serve the stand-ins in the current loop until SIGINT/SIGTERM (or cancellation), then stop them
    gracefully. Prints where they listen and how to wire the service to them; never a token."""
    supermemory, receiver = dev_stand_ins(host, receiver_port, keys)
    github = GitHubSandbox()
    servers = [
        _Server(_config(supermemory.app(), host, supermemory_port)),
        _Server(_config(github.app(), host, github_port)),
        _Server(_config(receiver.app(), host, receiver_port)),
    ]
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        for server in servers:
            server.should_exit = True

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Only the main thread of a Unix process can install these; elsewhere, cancel the task to stop.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop_all)
            installed.append(sig)

    tasks = [asyncio.create_task(server.serve()) for server in servers]
    try:
        while not all(server.started for server in servers):
            if any(task.done() for task in tasks):
                raise RuntimeError("the sandbox could not start (see the log above)")
            await asyncio.sleep(0.01)
        sm_port, gh_port, rc_port = (_bound_port(server) for server in servers)
        _announce(host, sm_port, gh_port, rc_port, supermemory, github)
        # One server failing takes the other down with it rather than leaving half a sandbox.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_all()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sig in installed:
            loop.remove_signal_handler(sig)


def _announce(
    host: str,
    supermemory_port: int,
    github_port: int,
    receiver_port: int,
    supermemory: SupermemorySandbox,
    github: GitHubSandbox,
) -> None:
    sm_url = _url(host, supermemory_port)
    gh_url = _url(host, github_port)
    rc_url = _url(host, receiver_port)
    lines = [
        f"Supermemory sandbox: {sm_url}  ({len(supermemory.keys)} seeded keys:"
        f" GET {sm_url}/_sandbox/keys lists them)",
        f"GitHub sandbox:      {gh_url}  (signing key {github.key_identifier})",
        "Wire the service to it with:",
        f"  LEAK_RESPONDER_SUPERMEMORY_API_URL={sm_url}",
        f"  LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN={supermemory.knobs.admin_token}",
        f"  LEAK_RESPONDER_GITHUB_KEYS_URL={gh_url}{KEYS_PATH}",
        f"  LEAK_RESPONDER_CHANNEL_ALLOWED_NETWORKS={host}/32",
        f"Channel receiver:    {rc_url}  (the seeded orgs' webhooks and Slack;"
        f" GET {rc_url}/_sandbox/received)",
        f"Send an alert: POST {gh_url}/_sandbox/send-alert"
        ' {"target": "http://127.0.0.1:8000/v1/alerts/github", "tokens": ["<token>"]}',
        "Knobs: POST /_sandbox/knobs on either; counters: GET /_sandbox/stats. Ctrl-C stops.",
    ]
    for line in lines:
        print(line, flush=True)
    logger.info("sandbox listening: supermemory %s, github %s", sm_url, gh_url)
