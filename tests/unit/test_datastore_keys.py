"""Datastore key rules: every kind of bad key is refused with a message naming it and the rule."""

from __future__ import annotations

import pytest

from herder.datastore import MAX_KEY_LENGTH, ObjectInfo, check_key, check_prefix
from herder.errors import BadKey, DatastoreError

BAD_KEYS = [
    ("", "is empty"),
    ("x" * (MAX_KEY_LENGTH + 1), "1025 bytes long; the limit is 1024"),
    ("é" * 513, "1026 bytes long"),  # 513 characters, 1026 UTF-8 bytes
    ("/etc/passwd", "is absolute"),
    ("/", "is absolute"),
    ("..", "'..' segment"),
    ("../x", "'..' segment"),
    ("a/../b", "'..' segment"),
    ("a/..", "'..' segment"),
    (".", "'.' segment"),
    ("./a", "'.' segment"),
    ("a/./b", "'.' segment"),
    ("a//b", "empty segment"),
    ("a/", "empty segment"),
    ("a\\b", "backslash"),
    ("..\\x", "backslash"),
    ("a\x00b", "NUL character at position 1"),
    ("a\nb", "control character U+000A"),
    ("a\tb", "control character U+0009"),
    ("\x1f", "control character U+001F"),
    ("a\x7f", "control character U+007F"),
    (".herder-meta/x", "reserved prefix '.herder-'"),
    (".herder-tmp/x", "reserved prefix '.herder-'"),
    (".herder-tmp", "reserved prefix '.herder-'"),
    (".herder-anything/else", "reserved prefix '.herder-'"),
    ("a/" + "s" * 256, "segment longer than 255 bytes"),
    ("bad\udc80surrogate", "lone surrogate"),
]


@pytest.mark.parametrize(("key", "rule"), BAD_KEYS)
def test_bad_key_is_refused_naming_key_and_rule(key: str, rule: str) -> None:
    with pytest.raises(BadKey) as caught:
        check_key(key)
    message = str(caught.value)
    assert rule in message
    assert message.startswith("bad datastore key ")
    assert repr(key)[:40] in message  # the key itself, quoted (long ones shortened)
    assert caught.value.context["key"] == key


def test_non_string_key_is_refused() -> None:
    with pytest.raises(BadKey, match="must be a string, not bytes"):
        check_key(b"a/b")  # type: ignore[arg-type]


GOOD_KEYS = [
    "a",
    "runs/2024-05-01/output.parquet",
    "...",
    "a..b",
    ".hidden",
    "a/.b/c",
    ".herder",  # only '.herder-' is reserved
    "herder-meta/x",
    "x/.herder-meta",  # reserved only as the first segment
    "with space/and+plus&amp?=#%",
    "ünïcödé/日本語",
    "/".join(["s" * 255] * 4),  # 1023 bytes, each segment at its limit
    ("s" * 254 + "/") * 4 + "abcd",  # exactly 1024 bytes
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_good_key_is_returned(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("prefix", ["", "a", "a/", "runs/2024", "runs/2024-05-01/", "..."])
def test_good_prefixes(prefix: str) -> None:
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize(
    ("prefix", "rule"),
    [
        ("/", "is absolute"),
        ("/a", "is absolute"),
        ("a//", "empty segment"),
        ("../", "'..' segment"),
        ("a/./", "'.' segment"),
        ("a\\", "backslash"),
        ("a\x00", "NUL"),
        (".herder-meta/", "reserved prefix"),
        ("x" * (MAX_KEY_LENGTH + 1), "limit is 1024"),
    ],
)
def test_bad_prefixes(prefix: str, rule: str) -> None:
    with pytest.raises(BadKey, match="bad datastore prefix") as caught:
        check_prefix(prefix)
    assert rule in str(caught.value)


def test_object_info_round_trips_through_json() -> None:
    info = ObjectInfo("a/b", 12, "ab" * 32, 1700000000.5)
    assert ObjectInfo.from_json(info.to_json()) == info
    assert info.to_json() == {
        "key": "a/b",
        "size": 12,
        "sha256": "ab" * 32,
        "modified": 1.7e9 + 0.5,
    }


def test_malformed_object_info_is_a_datastore_error() -> None:
    with pytest.raises(DatastoreError, match="malformed object info"):
        ObjectInfo.from_json({"key": "a", "size": "many"})
