"""The parse result, the parse error and the final text cleanup shared by formats."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.hashing import normalize_text

SUPPORTED_TYPES = ("application/pdf", "text/markdown", "text/html", "text/plain")

PARSE_ERROR_CODES = frozenset(
    {
        "unsupported_type",
        "corrupt_file",
        "encrypted_password_required",
        "encrypted_password_wrong",
        "no_text_layer",
        "decode_failed",
    }
)

# A Python str stores a valid astral character as one code point, so any
# code point in this range is an unpaired UTF-16 surrogate.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class ParseError(Exception):
    """Error for uploaded bytes that cannot be turned into text.

    ``code`` is a stable machine-readable reason from PARSE_ERROR_CODES.
    ``message`` is a sentence for people that names the value and the fix.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[ParseError], tuple[str, str]]:
        # The default pickling passes only ``args`` (the message) back to
        # __init__, which would fail when the error crosses a process boundary.
        return (type(self), (self.code, self.message))


@dataclass(frozen=True)
class ParsedDocument:
    """Text extracted from one upload, normalized with ``normalize_text``.

    ``page_count`` is set for PDFs only. ``page_offsets`` contains, for each PDF
    page, the index in ``markdown`` where that page's text starts. The first
    offset is 0, and a page without text gets the offset of the next text
    (or ``len(markdown)`` at the end). It is empty for other types.
    ``encoding`` is the Python codec name that decoded a text or HTML upload,
    and None for PDFs.
    """

    markdown: str
    page_count: int | None
    page_offsets: list[int]
    encoding: str | None


def clean_text(text: str) -> str:
    """Apply ``normalize_text`` and remove leading blank lines.

    Unpaired surrogates become U+FFFD first. ``normalize_text`` removes NUL
    and the other control characters, so the result can be stored in a
    PostgreSQL text column and encoded as UTF-8.
    """
    text = normalize_text(_LONE_SURROGATE.sub("\ufffd", text))
    # Every blank line is empty after normalize_text, so this keeps the
    # indentation of the first line with text.
    return text.lstrip("\n")
