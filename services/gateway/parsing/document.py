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
        "limit_exceeded",
        "unreadable_text",
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
class ParseLimits:
    """Limits a parse enforces, with the settings that set them.

    The defaults match the defaults of INGESTD_MAX_PAGES and
    INGESTD_MAX_PARSED_CHARS.
    """

    max_pages: int = 2000
    max_chars: int = 5_000_000

    def pages_exceeded(self, pages: int) -> ParseError:
        """Return the error for a PDF with more pages than max_pages."""
        return ParseError(
            "limit_exceeded",
            f"the PDF has {pages} pages, more than the maximum of {self.max_pages} "
            "(INGESTD_MAX_PAGES); split the document or raise the limit",
        )

    def chars_exceeded(self, chars: int, *, at_least: bool = False) -> ParseError:
        """Return the error for text longer than max_chars.

        ``at_least`` marks a count taken when parsing stopped early, so the
        whole text is longer still.
        """
        count = f"at least {chars}" if at_least else str(chars)
        return ParseError(
            "limit_exceeded",
            f"the document's text has {count} characters, more than the maximum "
            f"of {self.max_chars} (INGESTD_MAX_PARSED_CHARS); split the document "
            "or raise the limit",
        )


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
