"""Property tests of text decoding, content sniffing and text parsing."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.parsing import (
    SUPPORTED_TYPES,
    ParseError,
    parse_document,
    sniff_content_type,
)
from services.gateway.parsing.encoding import decode_text

FUZZ = settings(max_examples=150, deadline=None)
# Text without NUL, because NUL bytes make ASCII text look like UTF-16, and
# without a leading U+FEFF, which decoding removes as a byte order mark.
TEXT = st.text(
    st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=300
).filter(lambda text: not text.startswith("\ufeff"))
T = TypeVar("T")
_CONTROLS = {chr(code) for code in range(0x20) if chr(code) not in "\t\n"} | {
    chr(code) for code in range(0x7F, 0xA0)
}


@FUZZ
@given(text=TEXT)
def test_utf8_round_trips(text: str) -> None:
    assert decode_text(text.encode("utf-8")) == (text, "utf-8")


@FUZZ
@given(text=TEXT, codec=st.sampled_from(["utf-8-sig", "utf-16", "utf-32"]))
def test_byte_order_mark_round_trips(text: str, codec: str) -> None:
    decoded, _ = decode_text(text.encode(codec))
    assert decoded == text


def outcome(function: Callable[..., T], *args: object) -> tuple[T | None, str | None]:
    """Return (result, None), or (None, error code) when function raises ParseError."""
    try:
        return function(*args), None
    except ParseError as error:
        return None, error.code


@FUZZ
@given(data=st.binary(max_size=2000))
def test_decode_any_bytes(data: bytes) -> None:
    decoded, code = outcome(decode_text, data)
    if decoded is None:
        assert code == "decode_failed"
        return
    text, encoding = decoded
    assert isinstance(text, str)
    assert encoding


@FUZZ
@given(data=st.binary(max_size=2000), filename=st.text(max_size=20))
def test_sniff_any_bytes(data: bytes, filename: str) -> None:
    detected, code = outcome(sniff_content_type, data, filename)
    if detected is None:
        assert code == "unsupported_type"
        return
    assert detected in SUPPORTED_TYPES


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=2000),
        st.text(max_size=500).map(lambda text: text.encode("utf-8", "surrogatepass")),
    ),
    media_type=st.sampled_from(["text/plain", "text/markdown", "text/html"]),
)
def test_parsed_text_is_clean(data: bytes, media_type: str) -> None:
    parsed, code = outcome(parse_document, data, media_type)
    if parsed is None:
        assert code in {"decode_failed", "unreadable_text", "corrupt_file"}
        return
    text = parsed.markdown
    assert not _CONTROLS & set(text)
    assert not any(0xD800 <= ord(character) <= 0xDFFF for character in text)
    assert unicodedata.is_normalized("NFC", text)
    assert text == text.rstrip()
