"""The partner alert body, parsed strictly after its signature holds.

Strict because a 400 tells the partner to fix its request, while a silently skipped item would be a
leaked key nobody revokes.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from service.inbound.reasons import InboundError
from service.reasons import Reason
from service.tokens import redact


class AlertItem(NamedTuple):
    """One item of an alert. A named tuple: as immutable as a frozen dataclass, and made in a third
    of its time (a big alert has tens of thousands)."""

    token: str
    type: str
    url: str | None
    source: str | None

    def __repr__(self) -> str:
        # Items end up in logs and tracebacks; the token must not.
        return (
            f"AlertItem(token={redact(self.token)!r}, type={self.type!r}, "
            f"url={self.url!r}, source={self.source!r})"
        )


def parse_alert(body: bytes) -> list[AlertItem]:
    """Items in the order received; item indexes in error messages are 0-based, as in the array."""
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: a deeply nested array is not an alert, and must not become a 500.
        raise InboundError(Reason.BODY_NOT_JSON, "body is not UTF-8 JSON") from None
    if not isinstance(document, list):
        raise InboundError(Reason.BODY_NOT_LIST, "body is not a JSON array")
    if not document:
        raise InboundError(Reason.BODY_EMPTY, "body is an empty array")
    return [_item(index, raw) for index, raw in enumerate(document)]


def _item(index: int, raw: object) -> AlertItem:
    if not isinstance(raw, dict):
        raise InboundError(Reason.ITEM_NOT_OBJECT, f"item {index}: not an object")
    token, type_, url, source = raw.get("token"), raw.get("type"), raw.get("url"), raw.get("source")
    # Every field text (or url and source missing): the item as it is, checked once. Anything
    # else goes through the checks one by one, for the refusal that names the field.
    if not (
        isinstance(token, str)
        and token
        and isinstance(type_, str)
        and type_
        and (url is None or isinstance(url, str))
        and (source is None or isinstance(source, str))
    ):
        token = _optional_string(raw, "token", index)
        if not token:
            raise InboundError(Reason.ITEM_MISSING_TOKEN, f"item {index}: missing token")
        type_ = _optional_string(raw, "type", index)
        if not type_:
            raise InboundError(Reason.ITEM_MISSING_TYPE, f"item {index}: missing type")
        source = _optional_string(raw, "source", index)
        url = _optional_string(raw, "url", index)
    return AlertItem(
        token,
        type_,
        url or None,
        # Reporters send "Content" as well as "content"; one spelling keeps sightings comparable.
        source.lower() if source else None,
    )


def _optional_string(raw: dict[str, object], field: str, index: int) -> str | None:
    """The field's string, or None when missing or null; any other JSON type is refused by name only,
    because the value could be the token itself."""
    value = raw.get(field)
    if value is None or isinstance(value, str):
        return value
    raise InboundError(Reason.ITEM_BAD_FIELD, f"item {index}: field {field!r} must be a string")
