from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Sandbox, Service
from tests.pgserver import PostgresServer

_databases = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the session, started on first use.

    Deliberately no skip: the project installs PostgreSQL itself (`make test` runs
    scripts/ensure-postgres), so a server that cannot start is a failure, not a reason to test less.
    """
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh, empty database of the session's cluster (no migrations applied)."""
    return pg_server.create_database(f"test_{next(_databases)}")


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture
def make_service(tmp_path: Path, sandbox: Sandbox) -> Iterator[object]:
    """Start services on the sandbox; each is stopped at the end of the test."""
    started: list[Service] = []

    def make(
        extra_env: dict[str, str] | None = None, *, ready: bool = True, workdir: Path | None = None
    ) -> Service:
        service = Service(workdir or tmp_path, {**sandbox.env(), **(extra_env or {})})
        started.append(service)
        return service.start(ready=ready)

    yield make
    for service in started:
        service.stop()


@pytest.fixture
def service(make_service) -> Service:
    return make_service()
