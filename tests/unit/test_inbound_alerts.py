import asyncio
import json

import pytest

from service.inbound import AlertItem, InboundError, parse_alert, read_limited
from service.reasons import Reason

TOKEN = "sm_" + "A1b2" * 10
R = Reason


def _body(*items: object) -> bytes:
    return json.dumps(list(items)).encode()


def _item(**fields: object) -> dict:
    return {
        "token": TOKEN,
        "type": "supermemory_api_key",
        "url": "https://github.com/o/r/blob/x",
        "source": "content",
    } | fields


@pytest.mark.parametrize(
    ("body", "reason", "message"),
    [
        pytest.param(b"not json", R.BODY_NOT_JSON, "body is not UTF-8 JSON", id="not-json"),
        pytest.param(b"", R.BODY_NOT_JSON, "body is not UTF-8 JSON", id="empty-bytes"),
        pytest.param(b"\xff\xfe[]", R.BODY_NOT_JSON, "body is not UTF-8 JSON", id="not-utf8"),
        pytest.param(json.dumps([_item()]).encode("utf-16"), R.BODY_NOT_JSON, None, id="utf16"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, R.BODY_NOT_JSON, None, id="deep-nesting"),
        pytest.param(b'{"token": "x"}', R.BODY_NOT_LIST, "body is not a JSON array", id="object"),
        pytest.param(b'"sm_x"', R.BODY_NOT_LIST, None, id="string"),
        pytest.param(b"[]", R.BODY_EMPTY, "body is an empty array", id="empty-list"),
        pytest.param(_body(_item(), "x"), R.ITEM_NOT_OBJECT, "item 1: not an object", id="item-string"),
        pytest.param(_body(None), R.ITEM_NOT_OBJECT, "item 0: not an object", id="item-null"),
        pytest.param(
            _body(_item(), _item(), _item(token=None)),
            R.ITEM_MISSING_TOKEN,
            "item 2: missing token",
            id="token-null",
        ),
        pytest.param(_body({"type": "t"}), R.ITEM_MISSING_TOKEN, "item 0: missing token", id="token-absent"),
        pytest.param(_body(_item(token="")), R.ITEM_MISSING_TOKEN, None, id="token-empty"),
        pytest.param(_body(_item(type=None)), R.ITEM_MISSING_TYPE, "item 0: missing type", id="type-null"),
        pytest.param(_body({"token": TOKEN}), R.ITEM_MISSING_TYPE, None, id="type-absent"),
        pytest.param(_body(_item(type="")), R.ITEM_MISSING_TYPE, None, id="type-empty"),
        pytest.param(
            _body(_item(token=12345)),
            R.ITEM_BAD_FIELD,
            "item 0: field 'token' must be a string",
            id="token-number",
        ),
        pytest.param(_body(_item(token=[TOKEN])), R.ITEM_BAD_FIELD, None, id="token-list"),
        pytest.param(_body(_item(type=True)), R.ITEM_BAD_FIELD, None, id="type-bool"),
        pytest.param(
            _body(_item(url={"href": "x"})),
            R.ITEM_BAD_FIELD,
            "item 0: field 'url' must be a string",
            id="url-dict",
        ),
        pytest.param(_body(_item(source=1)), R.ITEM_BAD_FIELD, None, id="source-number"),
    ],
)
def test_malformed_bodies(body: bytes, reason: Reason, message: str | None):
    with pytest.raises(InboundError) as caught:
        parse_alert(body)
    assert caught.value.reason is reason
    assert caught.value.status == 400
    if message is not None:
        assert str(caught.value) == message
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(caught.value)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {}, AlertItem(TOKEN, "supermemory_api_key", "https://github.com/o/r/blob/x", "content"), id="full"
        ),
        pytest.param(
            {"source": "Content"},
            AlertItem(TOKEN, "supermemory_api_key", "https://github.com/o/r/blob/x", "content"),
            id="capitalised-source",
        ),
        pytest.param(
            {"source": "NPM"},
            AlertItem(TOKEN, "supermemory_api_key", "https://github.com/o/r/blob/x", "npm"),
            id="unknown-source",
        ),
        pytest.param(
            {"url": None, "source": None}, AlertItem(TOKEN, "supermemory_api_key", None, None), id="nulls"
        ),
        pytest.param({"url": ""}, AlertItem(TOKEN, "supermemory_api_key", None, "content"), id="empty-url"),
        pytest.param(
            {"type": "mycompany_api_token"},
            AlertItem(TOKEN, "mycompany_api_token", "https://github.com/o/r/blob/x", "content"),
            id="any-type",
        ),
        pytest.param(
            {"extra": {"nested": 1}},
            AlertItem(TOKEN, "supermemory_api_key", "https://github.com/o/r/blob/x", "content"),
            id="extra-field",
        ),
    ],
)
def test_valid_items(fields: dict, expected: AlertItem):
    assert parse_alert(_body(_item(**fields))) == [expected]


def test_missing_url_and_source_and_order_kept():
    body = json.dumps(
        [{"token": "b", "type": "t"}, {"token": "a", "type": "t"}, {"token": "b", "type": "t"}]
    ).encode()
    assert parse_alert(body) == [
        AlertItem("b", "t", None, None),
        AlertItem("a", "t", None, None),
        AlertItem("b", "t", None, None),
    ]


def test_gitlabs_items_have_no_source_and_a_raw_file_url():
    """GitLab's shape, as its partner program sends it: normal, not malformed."""
    raw = "https://gitlab.com/acme/app/-/raw/9f2c1e0b7a3d4c5e6f708192a3b4c5d6e7f80912/config/.env"
    body = json.dumps([{"token": TOKEN, "type": "supermemory_api_key", "url": raw}]).encode()
    assert parse_alert(body) == [AlertItem(TOKEN, "supermemory_api_key", raw, None)]


def test_token_kept_exactly():
    weird = " sm_with spaces\u00e9 "
    assert parse_alert(_body(_item(token=weird)))[0].token == weird


def test_repr_hides_token():
    item = parse_alert(_body(_item()))[0]
    assert TOKEN not in repr(item)
    assert TOKEN not in str(item)
    assert "sm_A1b2…" in repr(item)


async def _chunks(parts: list[bytes], consumed: list[int]):
    for part in parts:
        consumed.append(len(part))
        yield part


def _read(parts: list[bytes], limit: int) -> tuple[bytes | InboundError, int]:
    consumed: list[int] = []

    async def main() -> bytes:
        return await read_limited(_chunks(parts, consumed), limit)

    try:
        return asyncio.run(main()), len(consumed)
    except InboundError as error:
        return error, len(consumed)


def test_read_limited_exact_limit_passes():
    assert _read([b"abc", b"def", b"", b"g"], 7) == (b"abcdefg", 4)


def test_read_limited_one_byte_over_fails():
    error, _ = _read([b"abc", b"def", b"gh"], 7)
    assert isinstance(error, InboundError)
    assert (error.reason, error.status) == (R.BODY_TOO_LARGE, 413)


def test_read_limited_stops_reading_at_the_limit():
    error, consumed = _read([b"x" * 10] * 1000, 25)
    assert isinstance(error, InboundError)
    assert error.reason is R.BODY_TOO_LARGE
    assert consumed == 3


def test_read_limited_single_oversized_chunk():
    error, consumed = _read([b"x" * 11], 10)
    assert isinstance(error, InboundError)
    assert consumed == 1
