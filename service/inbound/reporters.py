"""The partner scanners as data: they differ only in a header prefix and where their keys live."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reporter:
    name: str
    header_prefix: str
    keys_url: str | None

    @property
    def identifier_header(self) -> str:
        return f"{self.header_prefix}-Public-Key-Identifier"

    @property
    def signature_header(self) -> str:
        return f"{self.header_prefix}-Public-Key-Signature"


def reporters(github_url: str | None, gitlab_url: str | None, depsdev_url: str | None) -> dict[str, Reporter]:
    """Only the reporters with a keys URL: without one no alert of theirs could ever be verified,
    so the route for them should not exist at all."""
    candidates = (
        Reporter("github", "Github", github_url),
        Reporter("gitlab", "Gitlab", gitlab_url),
        Reporter("depsdev", "GOSST", depsdev_url),
    )
    return {reporter.name: reporter for reporter in candidates if reporter.keys_url}
