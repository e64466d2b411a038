"""What to clean up, by where the key was found: the right steps depend on the sighting's `source`.

GitHub names the place in `source` (its secret-scanning partner documentation lists the values:
file content and commits, pull request / issue / discussion titles, bodies and comments, commit
comments, gist content and comments, wiki content and commits, npm, unknown), in any capitalisation.
GitLab sends no `source`, and its `url` is the raw URL of a file in a repository. Manual reports come
from an operator, public reports from anyone; neither says more than a URL, if that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.store import Sighting


@dataclass(frozen=True, slots=True)
class Place:
    """One kind of place a key can leak to, and what cleaning it up takes."""

    title: str
    steps: tuple[str, ...]


REPOSITORY = Place(
    "In a file or commit of a repository",
    (
        "Remove the key from the file and commit the change.",
        "Rewrite the repository's history to drop it from every commit (git filter-repo or BFG),"
        " then force-push every branch and tag that held it.",
        "Consider the key public for good anyway: forks, clones, caches and mirrors keep the old"
        " commits, and rewriting your history does not reach them.",
    ),
)
GITLAB = Place(
    "In a file of a GitLab repository",
    (
        "Remove the key from the file and commit the change.",
        "Rewrite the repository's history to drop it (git filter-repo), force-push, then run"
        " GitLab's repository cleanup so the old blobs are purged from the server.",
        "Consider the key public for good anyway: forks and clones keep the old commits.",
    ),
)
COMMENT = Place(
    "In a title, description or comment (issue, pull request, discussion or commit comment)",
    (
        "Edit the text to remove the key.",
        "Then delete the old revision from the edit history too: an edited comment keeps its"
        " earlier versions, readable by anyone who opens the history.",
        "Notification emails already sent to watchers still hold the original text.",
    ),
)
GIST = Place(
    "In a gist or a gist comment",
    (
        "Delete the gist (or the comment): editing is not enough, because a gist keeps every"
        " revision and anyone can read the old ones.",
        "Forks of the gist keep their own copy; ask their owners to delete them.",
    ),
)
WIKI = Place(
    "In a wiki",
    (
        "Edit the page to remove the key.",
        "A wiki keeps its page history: clone the wiki's own repository, rewrite its history to drop"
        " the key, and force-push it.",
    ),
)
NPM = Place(
    "In a published npm package",
    (
        "Publish a fixed version without the key.",
        "Unpublish the version that holds it (npm unpublish name@version, while npm's policy still"
        " allows it), or deprecate it (npm deprecate) so nobody installs it again.",
        "Registry mirrors and caches keep published tarballs: the key stays public.",
    ),
)
MANUAL = Place(
    "Reported by a security engineer",
    (
        "Look at the place named in the report and remove the key from it, with its history.",
        "Check where else the same key was copied: CI variables, logs, chat messages and pastes.",
    ),
)
PUBLIC = Place(
    "Reported publicly",
    (
        "Someone found the key in public and reported it; where, they may not have said.",
        "Search your repositories, packages, CI logs, chat and pastes for the key and remove it,"
        " with its history.",
    ),
)
UNKNOWN = Place(
    "Somewhere public",
    (
        "Find where the key was published (the link above, when there is one) and remove it, with"
        " its history.",
    ),
)

_BY_SOURCE = {
    "content": REPOSITORY,
    "commit": REPOSITORY,
    **dict.fromkeys(
        (
            "pull_request_title",
            "pull_request_description",
            "pull_request_comment",
            "issue_title",
            "issue_description",
            "issue_comment",
            "discussion_title",
            "discussion_body",
            "discussion_comment",
            "commit_comment",
        ),
        COMMENT,
    ),
    "gist_content": GIST,
    "gist_comment": GIST,
    "wiki_content": WIKI,
    "wiki_commit": WIKI,
    "npm": NPM,
    "unknown": UNKNOWN,
}


def place(sighting: Sighting) -> Place:
    if sighting.reporter == "gitlab":
        return GITLAB
    if sighting.reporter == "manual":
        return MANUAL
    if sighting.reporter == "public":
        return PUBLIC
    return _BY_SOURCE.get((sighting.source or "unknown").strip().lower(), UNKNOWN)


def places(sightings: Sequence[Sighting]) -> list[Place]:
    """Each kind of place the key was found in, once, in the order first seen."""
    found: list[Place] = []
    for sighting in sightings:
        p = place(sighting)
        if p not in found:
            found.append(p)
    return found or [UNKNOWN]
