from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Sandbox, Service


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
