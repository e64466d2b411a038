from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import SentrySink, SmtpSink


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def sentry() -> Iterator[SentrySink]:
    with SentrySink() as sink:
        yield sink
