"""Content type detection from the first bytes of an upload."""

from __future__ import annotations

import codecs
import os
import re
from typing import NamedTuple

from services.gateway.parsing.document import ParseError
from services.gateway.parsing.encoding import (
    detect_byte_order_mark,
    detect_utf16_or_utf32,
)

SNIFF_SIZE = 8 * 1024

# PDF readers accept up to 1 KiB of data before the header.
_PDF_HEADER = re.compile(rb"%PDF-\d\.\d")
_PDF_HEADER_SEARCH_END = 1024 + len(b"%PDF-1.7")

_MARKDOWN_EXTENSIONS = frozenset(
    {".md", ".markdown", ".mdown", ".mkd", ".mkdn", ".mdwn"}
)
_MARKDOWN_TYPES = frozenset({"text/markdown", "text/x-markdown"})
_HTML_EXTENSIONS = frozenset({".html", ".htm", ".xhtml"})
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})

# Number of leading characters searched for the tags that mark a document.
_HTML_SEARCH_LENGTH = 1024
_HTML_DOCUMENT_TAG = re.compile(
    r"<(?:!doctype\s+html|html|head|body)[\s>/]", re.IGNORECASE
)
_ANY_TAG = re.compile(r"<[a-zA-Z!/]")


class _Magic(NamedTuple):
    name: str
    # (offset, bytes) pairs that must all match.
    signature: tuple[tuple[int, bytes], ...]
    # Set for short signatures, such as "MZ", that can also start ordinary
    # text. They count only when the sample also contains a NUL byte.
    needs_nul: bool = False


_MAGIC_NUMBERS = (
    _Magic("ZIP archive", ((0, b"PK\x03\x04"),)),
    _Magic("ZIP archive", ((0, b"PK\x05\x06"),)),
    _Magic("ZIP archive", ((0, b"PK\x07\x08"),)),
    _Magic("gzip archive", ((0, b"\x1f\x8b"),)),
    _Magic("bzip2 archive", ((0, b"BZh"), (4, b"1AY&SY"))),
    _Magic("xz archive", ((0, b"\xfd7zXZ\x00"),)),
    _Magic("7-Zip archive", ((0, b"7z\xbc\xaf\x27\x1c"),)),
    _Magic("RAR archive", ((0, b"Rar!\x1a\x07"),)),
    _Magic("Zstandard archive", ((0, b"\x28\xb5\x2f\xfd"),)),
    _Magic("tar archive", ((257, b"ustar"),), needs_nul=True),
    _Magic("PNG image", ((0, b"\x89PNG\r\n\x1a\n"),)),
    _Magic("JPEG image", ((0, b"\xff\xd8\xff"),)),
    _Magic("GIF image", ((0, b"GIF87a"),)),
    _Magic("GIF image", ((0, b"GIF89a"),)),
    _Magic("WebP image", ((0, b"RIFF"), (8, b"WEBP"))),
    _Magic("TIFF image", ((0, b"II*\x00"),)),
    _Magic("TIFF image", ((0, b"MM\x00*"),)),
    _Magic("BMP image", ((0, b"BM"),), needs_nul=True),
    _Magic("Photoshop image", ((0, b"8BPS"),)),
    _Magic("MP4, QuickTime, HEIC or AVIF media", ((4, b"ftyp"),)),
    _Magic("WAV audio", ((0, b"RIFF"), (8, b"WAVE"))),
    _Magic("AVI video", ((0, b"RIFF"), (8, b"AVI "))),
    _Magic("MP3 audio", ((0, b"ID3"),)),
    _Magic("Ogg media", ((0, b"OggS"),)),
    _Magic("FLAC audio", ((0, b"fLaC"),)),
    _Magic("Matroska or WebM video", ((0, b"\x1a\x45\xdf\xa3"),)),
    _Magic("ELF executable", ((0, b"\x7fELF"),)),
    _Magic("Windows executable (PE/MZ)", ((0, b"MZ"),), needs_nul=True),
    _Magic("Mach-O executable", ((0, b"\xfe\xed\xfa\xce"),)),
    _Magic("Mach-O executable", ((0, b"\xfe\xed\xfa\xcf"),)),
    _Magic("Mach-O executable", ((0, b"\xce\xfa\xed\xfe"),)),
    _Magic("Mach-O executable", ((0, b"\xcf\xfa\xed\xfe"),)),
    _Magic("Java class file or Mach-O universal binary", ((0, b"\xca\xfe\xba\xbe"),)),
    _Magic("WebAssembly module", ((0, b"\x00asm"),)),
    _Magic(
        "OLE2 compound file (for example DOC, XLS or PPT)",
        ((0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"),),
    ),
    _Magic("SQLite database", ((0, b"SQLite format 3\x00"),)),
    _Magic("RTF document", ((0, b"{\\rtf"),)),
    _Magic("PostScript document", ((0, b"%!PS"),)),
    _Magic("WOFF font", ((0, b"wOFF"),)),
    _Magic("WOFF2 font", ((0, b"wOF2"),)),
)


def sniff_content_type(head: bytes, filename: str = "", declared: str = "") -> str:
    """Detect the content type of an upload from its first bytes.

    ``head`` is the start of the upload. Only the first 8 KiB are examined.
    Returns one of SUPPORTED_TYPES. The bytes decide between PDF, text and
    binary data. For text, <!doctype html>, <html>, <head> or <body> near the
    start means HTML. With an .html name or a declared HTML type, any tag near
    the start is enough. Otherwise a Markdown extension of
    ``filename`` or a declared Markdown type means Markdown, and anything
    else is plain text. Empty input is plain text.

    Raises ParseError("unsupported_type") naming the detected format, for
    example "ZIP archive" or "binary data".
    """
    head = head[:SNIFF_SIZE]
    if not head:
        return "text/plain"
    if _PDF_HEADER.search(head, 0, _PDF_HEADER_SEARCH_END):
        return "application/pdf"

    binary_name = _detect_binary_format(head)
    if binary_name is not None:
        raise _unsupported_type_error(binary_name, filename)

    encoding = detect_byte_order_mark(head)
    if encoding is None and b"\x00" in head:
        encoding = detect_utf16_or_utf32(head)
        if encoding is None:
            raise _unsupported_type_error("binary data", filename)

    text = _text_view(head, encoding)
    extension = os.path.splitext(filename)[1].lower()
    declared_type = declared.split(";", 1)[0].strip().lower()
    html_hinted = extension in _HTML_EXTENSIONS or declared_type in _HTML_TYPES
    if _looks_like_html(text, html_hinted):
        return "text/html"
    if extension in _MARKDOWN_EXTENSIONS or declared_type in _MARKDOWN_TYPES:
        return "text/markdown"
    return "text/plain"


def _detect_binary_format(head: bytes) -> str | None:
    for magic in _MAGIC_NUMBERS:
        if magic.needs_nul and b"\x00" not in head:
            continue
        if all(head.startswith(part, offset) for offset, part in magic.signature):
            return magic.name
    return None


def _text_view(head: bytes, encoding: str | None) -> str:
    """Decode ``head`` well enough to look for HTML tags.

    Without a BOM or a UTF-16/32 match the bytes are read as Latin-1, which
    keeps ASCII tags intact in every ASCII-compatible encoding.
    """
    if encoding is None:
        return head.decode("latin-1")
    decoder = codecs.getincrementaldecoder(encoding)("replace")
    return decoder.decode(head, final=False).removeprefix("\ufeff")


def _looks_like_html(text: str, html_hinted: bool) -> bool:
    start = text[:_HTML_SEARCH_LENGTH]
    if html_hinted:
        return _ANY_TAG.search(start) is not None
    # Markdown may mention <html> in prose, so the text must also start with
    # a tag or a comment.
    if not start.lstrip().startswith("<"):
        return False
    return _HTML_DOCUMENT_TAG.search(start) is not None


def _unsupported_type_error(detected: str, filename: str) -> ParseError:
    source = f" in {filename!r}" if filename else ""
    return ParseError(
        "unsupported_type",
        f"unsupported file type: detected {detected}{source}; upload a PDF, "
        "Markdown, HTML or plain-text file instead, for example by exporting "
        "the document to PDF",
    )
