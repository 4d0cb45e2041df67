"""Character encoding detection for text, Markdown and HTML uploads."""

from __future__ import annotations

import codecs
import re

import charset_normalizer

from services.gateway.parsing.document import ParseError

# UTF-32 BOMs first, because the UTF-32 LE BOM starts with the UTF-16 LE BOM.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

# Codecs tried, and the number of leading bytes examined, to recognize UTF-16
# or UTF-32 without a BOM.
_WIDE_ENCODINGS = ("utf_32_le", "utf_32_be", "utf_16_le", "utf_16_be")
_WIDE_SAMPLE_SIZE = 64 * 1024

# The HTML Standard's prescan reads at least the first 1024 bytes for a
# <meta> charset. 4 KiB also finds declarations placed after long <head> text.
_META_PRESCAN_SIZE = 4096
_META_CHARSET = re.compile(
    rb"""<meta[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE
)

# Labels that the WHATWG Encoding Standard maps to a wider encoding, because
# pages labelled with them use the wider repertoire. The standard also reads a
# <meta> that declares UTF-16 as UTF-8, because a page whose bytes contain an
# ASCII <meta> is not UTF-16.
_WHATWG_LABELS = {
    "ascii": "cp1252",
    "us-ascii": "cp1252",
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "euc-kr": "cp949",
    "big5": "big5hkscs",
    "utf-16": "utf-8",
    "utf-16le": "utf-8",
    "utf-16be": "utf-8",
}

# charset-normalizer's default maximum mess ratio (0.2) rejects short legacy
# texts, for example a one-line cp1252 string with typographic quotes. At
# 0.5 it still rejects random bytes.
_MAX_MESS_RATIO = 0.5


def decode_text(data: bytes, *, html: bool = False) -> tuple[str, str]:
    """Decode an upload and return the text and the Python codec name used.

    The order is: a byte order mark, UTF-16 or UTF-32 without a BOM (tried
    only when the bytes contain NUL), then (for HTML) a <meta> charset,
    strict UTF-8, and finally charset-normalizer's best guess. A leading
    U+FEFF is removed.
    Raises ParseError("decode_failed") when no encoding fits.
    """
    if not data:
        return "", "utf-8"

    bom_encoding = detect_byte_order_mark(data)
    if bom_encoding is not None:
        return _decode_trusted(data, bom_encoding), bom_encoding

    wide_encoding = detect_utf16_or_utf32(data[:_WIDE_SAMPLE_SIZE])
    if wide_encoding is not None:
        return _decode_trusted(data, wide_encoding), wide_encoding

    utf8_text = _decode_strict(data, "utf-8")
    if html:
        declared = _declared_html_charset(data[:_META_PRESCAN_SIZE])
        # Non-ASCII bytes that form valid UTF-8 are almost never text in a
        # legacy encoding, so they win over a declaration. Single-byte
        # charsets decode any bytes, so a strict decode cannot catch a lie.
        utf8_overrides = utf8_text is not None and not data.isascii()
        if declared is not None and not utf8_overrides:
            declared_text = _decode_strict(data, declared)
            if declared_text is not None:
                return declared_text.removeprefix("\ufeff"), declared

    if utf8_text is not None:
        return utf8_text.removeprefix("\ufeff"), "utf-8"

    return _decode_guessed(data)


def detect_byte_order_mark(data: bytes) -> str | None:
    """Return the codec named by the byte order mark at the start, if any.

    UTF-8 is returned as ``utf-8-sig``, whose decoder drops the mark. For the
    other codecs the caller removes the decoded U+FEFF.
    """
    for mark, encoding in _BYTE_ORDER_MARKS:
        if data.startswith(mark):
            return encoding
    return None


def detect_utf16_or_utf32(sample: bytes) -> str | None:
    """Recognize UTF-16 or UTF-32 without a BOM in a sample with NUL bytes.

    charset-normalizer compares only these codecs, so binary data and 8-bit
    text with stray NUL bytes return None.

    NOTE: a short ASCII text with a NUL byte, such as b"Hello\\x00 world", is
    also valid UTF-16 and is detected as UTF-16.
    """
    if b"\x00" not in sample:
        return None

    # charset-normalizer decodes strictly, so the sample must end on a whole
    # code unit. If it ends inside a surrogate pair, two bytes fewer fit.
    whole_units = len(sample) - len(sample) % 4
    for end in (whole_units, whole_units - 2):
        if end <= 0:
            break
        best = charset_normalizer.from_bytes(
            sample[:end], cp_isolation=list(_WIDE_ENCODINGS)
        ).best()
        if best is not None:
            return codecs.lookup(best.encoding).name
    return None


def _decode_strict(data: bytes, encoding: str) -> str | None:
    # A declared charset can name a codec that is not a text encoding (such
    # as "base64"), and decoding with it raises LookupError.
    try:
        return data.decode(encoding)
    except (UnicodeError, LookupError):
        return None


def _decode_trusted(data: bytes, encoding: str) -> str:
    # A BOM or a UTF-16/32 match is strong evidence for the encoding, so a few
    # invalid sequences (for example a truncated last character) become
    # U+FFFD instead of rejecting the whole upload.
    text = _decode_strict(data, encoding)
    if text is None:
        text = data.decode(encoding, errors="replace")
    return text.removeprefix("\ufeff")


def _declared_html_charset(head: bytes) -> str | None:
    """Return the codec for the first <meta> charset in ``head``, if known."""
    match = _META_CHARSET.search(head)
    if match is None:
        return None
    label = match.group(1).decode("ascii").lower()
    label = _WHATWG_LABELS.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def _decode_guessed(data: bytes) -> tuple[str, str]:
    matches = charset_normalizer.from_bytes(data, threshold=_MAX_MESS_RATIO)
    best = matches.best()
    if best is None:
        raise ParseError(
            "decode_failed",
            f"the {len(data)}-byte upload is not valid UTF-8 and matches no known "
            "character encoding; convert it to UTF-8 and upload it again",
        )

    # cp1250 and cp1252 often score the same on Western European text, and
    # charset-normalizer then lists cp1250 first. cp1252 is the more common
    # encoding and the HTML default for unlabelled Western pages.
    for match in matches:
        tied = (match.chaos, match.coherence) == (best.chaos, best.coherence)
        if tied and codecs.lookup(match.encoding).name == "cp1252":
            best = match
            break

    return str(best).removeprefix("\ufeff"), codecs.lookup(best.encoding).name
