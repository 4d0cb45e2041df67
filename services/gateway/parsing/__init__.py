"""Turn uploaded bytes into Markdown-like text for the parse stage.

Plain synchronous code without I/O, so the parse worker can run it in a child
process with resource limits. ``sniff_content_type`` picks the parser from
the first bytes, and ``parse_document`` returns the normalized text.
"""

from __future__ import annotations

from services.gateway.parsing.document import (
    PARSE_ERROR_CODES,
    SUPPORTED_TYPES,
    ParsedDocument,
    ParseError,
    ParseLimits,
    clean_text,
)
from services.gateway.parsing.encoding import decode_text
from services.gateway.parsing.html import html_to_text
from services.gateway.parsing.pdf import parse_pdf
from services.gateway.parsing.readability import check_readable
from services.gateway.parsing.sniffing import sniff_content_type

__all__ = [
    "PARSE_ERROR_CODES",
    "SUPPORTED_TYPES",
    "ParseError",
    "ParseLimits",
    "ParsedDocument",
    "parse_document",
    "sniff_content_type",
]


def parse_document(
    data: bytes,
    content_type: str,
    *,
    password: str | None = None,
    limits: ParseLimits | None = None,
) -> ParsedDocument:
    """Parse an upload of one of SUPPORTED_TYPES into normalized text.

    ``content_type`` may carry parameters such as "; charset=utf-8", which
    are ignored because the encoding is detected from the bytes. ``password``
    opens encrypted PDFs and is ignored for other types. ``limits`` defaults
    to ParseLimits(). Raises ParseError, with the code "limit_exceeded" for
    a document over a limit and "unreadable_text" for text that is mostly
    placeholders or garbled.
    """
    limits = limits or ParseLimits()
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/pdf":
        document = parse_pdf(data, password, limits)
    elif media_type == "text/html":
        html, encoding = decode_text(data, html=True)
        document = _text_document(html_to_text(html), encoding)
    elif media_type in ("text/markdown", "text/plain"):
        # Markdown is kept as written, and plain text is valid Markdown-like
        # text, so neither is escaped or converted.
        text, encoding = decode_text(data)
        # Checked before cleanup too, which copies the text several times.
        if len(text) > limits.max_chars:
            raise limits.chars_exceeded(len(text))
        document = _text_document(text, encoding)
    else:
        raise ParseError(
            "unsupported_type",
            f"unsupported content type {content_type!r}; expected one of "
            f"{', '.join(SUPPORTED_TYPES)}",
        )

    if len(document.markdown) > limits.max_chars:
        raise limits.chars_exceeded(len(document.markdown))
    check_readable(document.markdown, check_scripts=media_type == "application/pdf")
    return document


def _text_document(text: str, encoding: str) -> ParsedDocument:
    return ParsedDocument(
        markdown=clean_text(text), page_count=None, page_offsets=[], encoding=encoding
    )
