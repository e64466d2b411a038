"""The partner scanners as data: they differ only in the header names they sign under and where
their keys live."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeaderPair:
    """The two headers one signing convention uses: `<prefix>-Public-Key-Identifier/-Signature`."""

    prefix: str

    @property
    def identifier(self) -> str:
        return f"{self.prefix}-Public-Key-Identifier"

    @property
    def signature(self) -> str:
        return f"{self.prefix}-Public-Key-Signature"


@dataclass(frozen=True)
class Reporter:
    """`header_pairs` in order of preference: a reporter whose senders disagree on the header names
    (deps.dev's feed is read as `DepsDev-…` by some registries and `GOSST-…` by others) lists every
    pair it signs under, and a request is verified under the first pair it carries in full."""

    name: str
    header_pairs: tuple[HeaderPair, ...]
    keys_url: str | None


def reporters(github_url: str | None, gitlab_url: str | None, depsdev_url: str | None) -> dict[str, Reporter]:
    """Only the reporters with a keys URL: without one no alert of theirs could ever be verified,
    so the route for them should not exist at all."""
    candidates = (
        Reporter("github", (HeaderPair("Github"),), github_url),
        Reporter("gitlab", (HeaderPair("Gitlab"),), gitlab_url),
        Reporter("depsdev", (HeaderPair("DepsDev"), HeaderPair("GOSST")), depsdev_url),
    )
    return {reporter.name: reporter for reporter in candidates if reporter.keys_url}
