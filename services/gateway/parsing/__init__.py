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
    clean_text,
)
from services.gateway.parsing.encoding import decode_text
from services.gateway.parsing.html import html_to_text
from services.gateway.parsing.pdf import parse_pdf
from services.gateway.parsing.sniffing import sniff_content_type

__all__ = [
    "PARSE_ERROR_CODES",
    "SUPPORTED_TYPES",
    "ParseError",
    "ParsedDocument",
    "parse_document",
    "sniff_content_type",
]


def parse_document(
    data: bytes, content_type: str, *, password: str | None = None
) -> ParsedDocument:
    """Parse an upload of one of SUPPORTED_TYPES into normalized text.

    ``content_type`` may carry parameters such as "; charset=utf-8", which
    are ignored because the encoding is detected from the bytes. ``password``
    opens encrypted PDFs and is ignored for other types. Raises ParseError.
    """
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/pdf":
        return parse_pdf(data, password)

    if media_type == "text/html":
        html, encoding = decode_text(data, html=True)
        return _text_document(html_to_text(html), encoding)

    # Markdown is kept as written, and plain text is valid Markdown-like text,
    # so neither is escaped or converted.
    if media_type in ("text/markdown", "text/plain"):
        text, encoding = decode_text(data)
        return _text_document(text, encoding)

    raise ParseError(
        "unsupported_type",
        f"unsupported content type {content_type!r}; expected one of "
        f"{', '.join(SUPPORTED_TYPES)}",
    )


def _text_document(text: str, encoding: str) -> ParsedDocument:
    return ParsedDocument(
        markdown=clean_text(text), page_count=None, page_offsets=[], encoding=encoding
    )
