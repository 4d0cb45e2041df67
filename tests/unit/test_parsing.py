"""Tests for the parse stage's parsing library.

Tests marked by the ``corpus`` fixture read real-world files from the test
corpus next to the repository and are skipped when it is missing. The other
tests build their inputs, including small PDFs written byte by byte.
"""

from __future__ import annotations

import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pypdfium2 as pdfium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.parsing import (
    PARSE_ERROR_CODES,
    SUPPORTED_TYPES,
    ParsedDocument,
    ParseError,
    parse_document,
    sniff_content_type,
)
from services.gateway.parsing.html import remove_scripts_and_styles
from shared.hashing import normalize_text
from tests.pdfs import PdfPageSpec, build_pdf

CORPUS_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
CORPUS_FILES = (
    sorted(
        path.relative_to(CORPUS_DIR).as_posix()
        for path in CORPUS_DIR.rglob("*")
        if path.is_file() and path.name != "MANIFEST.tsv"
    )
    if CORPUS_DIR.is_dir()
    else []
)

# User and owner passwords of the encrypted corpus PDFs, as listed in the
# corpus manifest, with text from their first page.
ENCRYPTED_PDFS = [
    ("pdf/pm_encryption_aes-256-r6.pdf", "usersecret", "Hello World"),
    ("pdf/pm_encryption_aes-256-r6.pdf", "ownersecret", "Hello World"),
    ("pdf/pp_crazyones-encrypted-256.pdf", "password", "The Crazy Ones"),
    ("pdf/pp_encryption_r6-user-password.pdf", "asdfzxcv", "pdf encryption test"),
    ("pdf/sf_libreoffice-writer-password.pdf", "openpassword", "Lorem ipsum"),
    ("pdf/sf_libreoffice-writer-password.pdf", "permissionpassword", "Lorem ipsum"),
]
IMAGE_ONLY_PDFS = [
    "pdf/sf_imagemagick-CCITTFaxDecode.pdf",
    "pdf/pm_pdf-with-jbig2.pdf",
    "pdf/hs_non_text_searchable.pdf",
]

T = TypeVar("T")

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@pytest.fixture
def corpus() -> Path:
    if not CORPUS_DIR.is_dir():
        pytest.skip(f"test corpus not found at {CORPUS_DIR}")
    return CORPUS_DIR


def parse_corpus_file(
    corpus: Path, relative_path: str, password: str | None = None
) -> ParsedDocument:
    """Sniff and parse a corpus file the way the parse worker does."""
    data = (corpus / relative_path).read_bytes()
    content_type = sniff_content_type(data[:8192], filename=relative_path)
    return parse_document(data, content_type, password=password)


def call_or_parse_error(
    function: Callable[..., T], *args: Any, **kwargs: Any
) -> tuple[T | None, ParseError | None]:
    """Call ``function`` and return its result, or the ParseError it raised.

    Any other exception propagates and fails the test.
    """
    try:
        return function(*args, **kwargs), None
    except ParseError as error:
        return None, error


def count_table_rows(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("|"))


def parse_error(data: bytes, content_type: str, **kwargs: str) -> ParseError:
    with pytest.raises(ParseError) as excinfo:
        parse_document(data, content_type, **kwargs)
    return excinfo.value


# ParseError.


def test_parse_error_pickle_keeps_fields() -> None:
    error = pickle.loads(pickle.dumps(ParseError("corrupt_file", "bad xref")))
    assert isinstance(error, ParseError)
    assert error.code == "corrupt_file"
    assert error.message == "bad xref"


def test_parse_error_str_is_message() -> None:
    assert str(ParseError("decode_failed", "convert it to UTF-8")) == (
        "convert it to UTF-8"
    )


# sniff_content_type.


@pytest.mark.parametrize(
    "head",
    [
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj",
        b"x" * 1000 + b"%PDF-1.4\n",
        b"\x00\x01garbage\r\n%PDF-2.0\n",
    ],
)
def test_sniff_pdf_magic(head: bytes) -> None:
    assert sniff_content_type(head) == "application/pdf"


def test_sniff_pdf_magic_after_1kib_ignored() -> None:
    assert sniff_content_type(b"x" * 2000 + b"%PDF-1.4\n") == "text/plain"


@pytest.mark.parametrize(
    ("head", "detected"),
    [
        (b"PK\x03\x04\x14\x00\x06\x00" + b"\x00" * 40, "ZIP archive"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG image"),
        (b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 40, "ELF executable"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "gzip archive"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "JPEG image"),
        (b"GIF89a\x01\x00\x01\x00", "GIF image"),
        (b"MZ\x90\x00\x03\x00\x00\x00", "Windows executable (PE/MZ)"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00", "OLE2 compound file"),
        (b"{\\rtf1\\ansi\\deff0 {\\fonttbl}", "RTF document"),
    ],
)
def test_sniff_binary_magic_names_type(head: bytes, detected: str) -> None:
    with pytest.raises(ParseError) as excinfo:
        sniff_content_type(head, filename="upload.bin")
    assert excinfo.value.code == "unsupported_type"
    assert detected in excinfo.value.message
    assert "'upload.bin'" in excinfo.value.message


def test_sniff_nul_bytes_are_binary_data() -> None:
    head = b"\x00\x01\x02" + random.Random(7).randbytes(4096)
    with pytest.raises(ParseError) as excinfo:
        sniff_content_type(head)
    assert excinfo.value.code == "unsupported_type"
    assert "binary data" in excinfo.value.message


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_sniff_wide_text_without_bom(encoding: str) -> None:
    head = "Plain text line\nanother line\n".encode(encoding)
    assert sniff_content_type(head) == "text/plain"


def test_sniff_text_starting_with_mz() -> None:
    assert sniff_content_type(b"MZ is a postcode area in the report") == ("text/plain")


@pytest.mark.parametrize(
    "head",
    [
        b"<!DOCTYPE html>\n<title>t</title>",
        b"\n  <html lang=en><p>x</p></html>",
        b"<!-- saved page -->\n<head><title>t</title></head>",
        b'<body bgcolor="white">text</body>',
        b"\xef\xbb\xbf<!doctype html><p>bom</p>",
    ],
)
def test_sniff_html_document(head: bytes) -> None:
    assert sniff_content_type(head) == "text/html"


def test_sniff_html_utf16_without_bom() -> None:
    head = "<!DOCTYPE html>\r\n<html><body>x</body></html>".encode("utf-16-le")
    assert sniff_content_type(head) == "text/html"


def test_sniff_html_fragment_needs_hint() -> None:
    head = b"<div><p>fragment</p></div>"
    assert sniff_content_type(head) == "text/plain"
    assert sniff_content_type(head, filename="page.HTML") == "text/html"
    assert sniff_content_type(head, declared="text/html; charset=utf-8") == (
        "text/html"
    )


@pytest.mark.parametrize(
    "filename", ["README.md", "notes.markdown", "a.mdown", "UPPER.MD"]
)
def test_sniff_markdown_by_extension(filename: str) -> None:
    assert sniff_content_type(b"# Title\n\ntext", filename=filename) == (
        "text/markdown"
    )


def test_sniff_markdown_by_declared_type() -> None:
    head = b"# Title\n\ntext"
    assert sniff_content_type(head, declared="text/markdown; charset=utf-8") == (
        "text/markdown"
    )


def test_sniff_markdown_mentioning_html_tag() -> None:
    head = b"# Page layout\n\nEvery page starts with <html> and <body>.\n"
    assert sniff_content_type(head, filename="layout.md") == "text/markdown"


def test_sniff_plain_text_default() -> None:
    assert sniff_content_type(b"# Title\n\ntext", filename="notes.txt") == (
        "text/plain"
    )


def test_sniff_empty_is_plain_text() -> None:
    assert sniff_content_type(b"") == "text/plain"


def test_sniff_reads_only_first_8kib() -> None:
    head = b"a" * 8192 + b"\x00\x01\x02"
    assert sniff_content_type(head) == "text/plain"


def test_sniff_corpus_types(corpus: Path) -> None:
    expected_by_directory = {
        "pdf": "application/pdf",
        "html": "text/html",
        "md": "text/markdown",
        "txt": "text/plain",
    }
    for relative_path in CORPUS_FILES:
        data = (corpus / relative_path).read_bytes()
        expected = expected_by_directory[relative_path.split("/")[0]]
        if not data:
            expected = "text/plain"
        actual = sniff_content_type(data[:8192], filename=relative_path)
        assert actual == expected, relative_path


# parse_document: plain text and Markdown.


def test_text_line_endings_become_lf() -> None:
    result = parse_document(b"one\r\ntwo\rthree\nfour", "text/plain")
    assert result.markdown == "one\ntwo\nthree\nfour"


def test_text_result_fields() -> None:
    result = parse_document(b"hello", "text/plain")
    assert result.page_count is None
    assert result.page_offsets == []
    assert result.encoding == "utf-8"


def test_text_empty_input() -> None:
    result = parse_document(b"", "text/plain")
    assert result.markdown == ""
    assert result.encoding == "utf-8"


def test_text_utf16_without_bom() -> None:
    text = "Zürich and Köln\r\nSecond line\r\n"
    result = parse_document(text.encode("utf-16-le"), "text/plain")
    assert result.markdown == "Zürich and Köln\nSecond line"
    assert result.encoding == "utf-16-le"


def test_text_utf16_big_endian_without_bom() -> None:
    result = parse_document("plain text\n".encode("utf-16-be"), "text/plain")
    assert result.markdown == "plain text"
    assert result.encoding == "utf-16-be"


@pytest.mark.parametrize(
    ("bom_text", "encoding"),
    [
        (b"\xef\xbb\xbfhello", "utf-8-sig"),
        ("\ufeffhello".encode("utf-16-le"), "utf-16-le"),
        ("\ufeffhello".encode("utf-16-be"), "utf-16-be"),
        ("\ufeffhello".encode("utf-32-le"), "utf-32-le"),
    ],
)
def test_text_bom_stripped(bom_text: bytes, encoding: str) -> None:
    result = parse_document(bom_text, "text/plain")
    assert result.markdown == "hello"
    assert result.encoding == encoding


def test_text_cp1252_paragraph() -> None:
    text = (
        "Le cœur de l’été : déjà vu, naïveté, façade — « garçon » coûte 5 €. "
        "Über die Straße gehen Mädchen und Jungen; schöne Grüße aus München. "
    ) * 3
    result = parse_document(text.encode("cp1252"), "text/plain")
    assert result.markdown == text.rstrip()
    assert result.encoding == "cp1252"


def test_text_cp1252_short_line() -> None:
    text = "Café “naïve” – 5 €…"
    result = parse_document(text.encode("cp1252"), "text/plain")
    assert result.markdown == text


def test_text_control_characters_removed() -> None:
    data = b"alpha\x00beta gamma\x01delta\x7f epsilon\tzeta eta theta iota kappa"
    result = parse_document(data, "text/plain")
    assert result.markdown == "alphabeta gammadelta epsilon\tzeta eta theta iota kappa"


def test_text_leading_blank_lines_removed() -> None:
    result = parse_document(b"\r\n  \r\n    indented\n", "text/plain")
    assert result.markdown == "    indented"


def test_text_not_escaped() -> None:
    text = "*not emphasis* and <tag> and [link](x) and 1. item"
    assert parse_document(text.encode(), "text/plain").markdown == text


def test_text_undecodable_bytes_rejected() -> None:
    random_bytes = random.Random(0).randbytes(1000)
    data = random_bytes.replace(b"\x00", b"\x80")
    error = parse_error(data, "text/plain")
    assert error.code == "decode_failed"
    assert "1000-byte" in error.message


def test_markdown_kept_verbatim() -> None:
    text = (
        "# Title\n\n| a | b |\n| --- | --- |\n| 1 | *2* |\n\n"
        "```python\nif x < 1:\n    print('<br>')\n```\n\n<p align=center>x</p>"
    )
    assert parse_document(text.encode(), "text/markdown").markdown == text


def test_parse_content_type_parameters_ignored() -> None:
    result = parse_document(b"hello", "Text/Plain; charset=latin-1")
    assert result.markdown == "hello"


def test_parse_unknown_content_type() -> None:
    error = parse_error(b"\x89PNG", "image/png")
    assert error.code == "unsupported_type"
    assert "'image/png'" in error.message


# parse_document: HTML.


def test_html_scripts_and_styles_removed() -> None:
    html = (
        "<html><head><style>p { color: red }</style></head><body>"
        "<p>before</p><script>var s = '</p><p>leak</p>';</script>"
        "<p>after</p></body></html>"
    )
    markdown = parse_document(html.encode(), "text/html").markdown
    assert markdown == "before\n\nafter"


@pytest.mark.parametrize(
    "text",
    ["\u202e\u2066\u200b\ufeff" * 100, "\u0301" * 300, "\U000f0000 \ue000" * 50],
)
@pytest.mark.parametrize("content_type", ["text/plain", "text/markdown", "text/html"])
def test_text_without_visible_characters_unreadable(
    text: str, content_type: str
) -> None:
    error = parse_error(text.encode(), content_type)
    assert error.code == "unreadable_text"
    assert "is visible" in error.message


def test_text_with_some_visible_characters_kept() -> None:
    markdown = parse_document("\u200bzero\u200bwidth \u0301".encode(), "text/plain")
    assert "zero" in markdown.markdown


def test_html_replacement_characters_not_sent_to_ocr() -> None:
    error = parse_error(b"<p>" + b"&#xFFFD;" * 50 + b"</p>", "text/html")
    assert error.code == "unreadable_text"
    assert "damaged or decoded wrongly" in error.message
    assert "OCR" not in error.message


def test_html_deep_nesting_kept_within_limit() -> None:
    html = "<p>top</p>" + "<div>" * 500 + "deep text" + "</div>" * 500
    markdown = parse_document(html.encode(), "text/html").markdown
    assert "top" in markdown
    assert "deep text" in markdown


@pytest.mark.parametrize("depth", [2000, 100_000])
def test_html_nested_past_converter_limit_fails(depth: int) -> None:
    # The converter would skip the deep elements and lose their text.
    html = "<p>top</p>" + "<div>" * depth + "deep text" + "</div>" * depth
    error = parse_error(html.encode(), "text/html")
    assert error.code == "limit_exceeded"
    assert "nests elements too deeply" in error.message
    assert "flatten" in error.message


def test_html_script_comment_double_escape() -> None:
    html = (
        "<p>one</p><script><!--\ndocument.write('<script>x()</script>');\n"
        "still script\n--></script><p>two</p>"
    )
    assert parse_document(html.encode(), "text/html").markdown == "one\n\ntwo"


def test_html_script_empty_comment_closes() -> None:
    html = "<script><!--></script><p>shown</p>"
    assert parse_document(html.encode(), "text/html").markdown == "shown"


def test_html_script_unclosed_runs_to_end() -> None:
    html = "<p>shown</p><script>never closed <p>hidden</p>"
    assert parse_document(html.encode(), "text/html").markdown == "shown"


def test_remove_scripts_ignores_quoted_markup() -> None:
    html = (
        '<p title="<script>">kept</p><!-- <script> --><p>also kept</p>'
        "<textarea><script></textarea><p>third</p>"
    )
    assert remove_scripts_and_styles(html) == html


def test_html_navigation_forms_images_dropped() -> None:
    html = (
        "<html><body><nav><a href='/'>Home menu</a></nav><h1>Heading</h1>"
        "<form><input name=q><button>Search button</button></form>"
        "<img src='a.png' alt='picture alt'><p>Body text.</p></body></html>"
    )
    markdown = parse_document(html.encode(), "text/html").markdown
    assert markdown.startswith("# Heading")
    assert "Body text." in markdown
    assert "Home menu" not in markdown
    assert "Search button" not in markdown
    assert "picture alt" not in markdown
    assert "a.png" not in markdown


def test_html_table_and_pre_kept() -> None:
    html = (
        "<table><tr><th>name</th><th>size</th></tr><tr><td>a</td><td>1</td></tr>"
        "</table><pre>  code\n    indented</pre>"
    )
    markdown = parse_document(html.encode(), "text/html").markdown
    assert "| name | size |\n| ---- | ---- |\n| a    | 1    |" in markdown
    assert "```\n  code\n    indented\n```" in markdown


def test_html_no_metadata_front_matter() -> None:
    html = (
        "<html><head><title>Page title</title>"
        "<meta name='description' content='summary'></head>"
        "<body><p>text</p></body></html>"
    )
    markdown = parse_document(html.encode(), "text/html").markdown
    assert markdown == "text"


def test_html_declared_charset_used() -> None:
    html = "<meta charset='windows-1252'><p>café “quoted”</p>".encode("cp1252")
    result = parse_document(html, "text/html")
    assert result.markdown == "café “quoted”"
    assert result.encoding == "cp1252"


def test_html_latin1_label_means_cp1252() -> None:
    html = b'<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">'
    html += b"<p>\x93quoted\x94</p>"
    result = parse_document(html, "text/html")
    assert result.markdown == "“quoted”"
    assert result.encoding == "cp1252"


def test_html_utf8_wins_over_single_byte_label() -> None:
    html = "<meta charset=iso-8859-1><p>café</p>".encode()
    result = parse_document(html, "text/html")
    assert result.markdown == "café"
    assert result.encoding == "utf-8"


def test_html_unknown_charset_label_ignored() -> None:
    html = b"<meta charset=base64><p>plain</p>"
    result = parse_document(html, "text/html")
    assert result.markdown == "plain"
    assert result.encoding == "utf-8"


# parse_document: PDF built in the test.


def test_pdf_single_page() -> None:
    result = parse_document(build_pdf([PdfPageSpec(("Hello PDF",))]), "application/pdf")
    assert result.markdown == "Hello PDF"
    assert result.page_count == 1
    assert result.page_offsets == [0]
    assert result.encoding is None


def test_pdf_lines_use_lf() -> None:
    pdf = build_pdf([PdfPageSpec(("first line", "second line", "third line"))])
    markdown = parse_document(pdf, "application/pdf").markdown
    assert markdown == "first line\nsecond line\nthird line"


def test_pdf_page_offsets_exact() -> None:
    pages = [("Page one", "more one"), ("Page two",), ("Page three", "end")]
    pdf = build_pdf([PdfPageSpec(lines) for lines in pages])
    result = parse_document(pdf, "application/pdf")
    page_texts = ["\n".join(lines) for lines in pages]
    assert result.markdown == "\n\n".join(page_texts)
    assert result.page_count == 3
    assert result.page_offsets == [0, 19, 29]
    for offset, text in zip(result.page_offsets, page_texts, strict=True):
        assert result.markdown[offset : offset + len(text)] == text


def test_pdf_empty_page_offsets() -> None:
    pages = [
        PdfPageSpec(("First",)),
        PdfPageSpec(),
        PdfPageSpec(("Third",)),
        PdfPageSpec(),
    ]
    result = parse_document(build_pdf(pages), "application/pdf")
    assert result.markdown == "First\n\nThird"
    assert result.page_offsets == [0, 7, 7, 12]


def test_pdf_blank_pages_empty_success() -> None:
    result = parse_document(
        build_pdf([PdfPageSpec(), PdfPageSpec()]), "application/pdf"
    )
    assert result.markdown == ""
    assert result.page_count == 2
    assert result.page_offsets == [0, 0]


def test_pdf_hyphen_joined_only_lowercase() -> None:
    lines = ("Lorem ipsum con-", "sectetuer elit. Non-", "Latin and GPU-", "based.")
    result = parse_document(build_pdf([PdfPageSpec(lines)]), "application/pdf")
    assert "consectetuer" in result.markdown
    assert "Non-Latin" in result.markdown
    assert "GPU-based" in result.markdown
    assert "\ufffe" not in result.markdown


def test_pdf_images_without_text_rejected() -> None:
    pdf = build_pdf([PdfPageSpec(image=True), PdfPageSpec(image=True)])
    error = parse_error(pdf, "application/pdf")
    assert error.code == "no_text_layer"
    assert "2 pages of images" in error.message
    assert "ocrmypdf" in error.message


def test_pdf_image_with_text_parses() -> None:
    pdf = build_pdf([PdfPageSpec(image=True), PdfPageSpec(("Caption",), image=True)])
    result = parse_document(pdf, "application/pdf")
    assert result.markdown == "Caption"
    assert result.page_offsets == [0, 0]


def test_pdf_truncated_is_corrupt() -> None:
    pdf = build_pdf([PdfPageSpec(("Some text",))])
    error = parse_error(pdf[: len(pdf) // 2], "application/pdf")
    assert error.code == "corrupt_file"
    assert "Data format error" in error.message


def test_pdf_garbage_is_corrupt() -> None:
    error = parse_error(b"%PDF-1.4\nnot really a pdf", "application/pdf")
    assert error.code == "corrupt_file"


def test_pdf_empty_bytes_is_corrupt() -> None:
    assert parse_error(b"", "application/pdf").code == "corrupt_file"


def test_pdf_password_ignored_when_unencrypted() -> None:
    pdf = build_pdf([PdfPageSpec(("open",))])
    result = parse_document(pdf, "application/pdf", password="unused")
    assert result.markdown == "open"


# parse_document: corpus PDFs.


def test_pdf_tracemonkey_page_offsets(corpus: Path) -> None:
    data = (corpus / "pdf/pj_tracemonkey.pdf").read_bytes()
    result = parse_document(data, "application/pdf")
    assert result.page_count == 14
    assert len(result.page_offsets) == 14
    assert result.page_offsets[0] == 0
    assert result.markdown.startswith("Trace-based Just-in-Time Type")

    document = pdfium.PdfDocument(data)
    try:
        for index, offset in enumerate(result.page_offsets):
            page = document[index]
            textpage = page.get_textpage()
            first_line = textpage.get_text_range().split("\r\n")[0].rstrip()
            textpage.close()
            page.close()
            assert first_line, index
            assert result.markdown.startswith(first_line[:20], offset), index
    finally:
        document.close()

    for previous, offset in zip(
        result.page_offsets, result.page_offsets[1:], strict=False
    ):
        assert result.markdown[previous:offset].endswith("\n\n")


@pytest.mark.parametrize(
    "relative_path", sorted({path for path, _, _ in ENCRYPTED_PDFS})
)
def test_pdf_encrypted_needs_password(corpus: Path, relative_path: str) -> None:
    data = (corpus / relative_path).read_bytes()
    assert parse_error(data, "application/pdf").code == ("encrypted_password_required")
    assert parse_error(data, "application/pdf", password="").code == (
        "encrypted_password_required"
    )


def test_pdf_encrypted_wrong_password(corpus: Path) -> None:
    data = (corpus / "pdf/pm_encryption_aes-256-r6.pdf").read_bytes()
    error = parse_error(data, "application/pdf", password="not-the-password")
    assert error.code == "encrypted_password_wrong"


@pytest.mark.parametrize(("relative_path", "password", "expected"), ENCRYPTED_PDFS)
def test_pdf_encrypted_right_password(
    corpus: Path, relative_path: str, password: str, expected: str
) -> None:
    result = parse_corpus_file(corpus, relative_path, password=password)
    assert expected in result.markdown


@pytest.mark.parametrize("relative_path", IMAGE_ONLY_PDFS)
def test_pdf_scans_have_no_text_layer(corpus: Path, relative_path: str) -> None:
    with pytest.raises(ParseError) as excinfo:
        parse_corpus_file(corpus, relative_path)
    assert excinfo.value.code == "no_text_layer"
    assert "1 page of images" in excinfo.value.message


def test_pdf_empty_corpus_page(corpus: Path) -> None:
    result = parse_corpus_file(corpus, "pdf/pj_empty.pdf")
    assert result.markdown == ""
    assert result.page_count == 1
    assert result.page_offsets == [0]


def test_pdf_without_trailer_is_corrupt(corpus: Path) -> None:
    with pytest.raises(ParseError) as excinfo:
        parse_corpus_file(corpus, "pdf/pj_issue15590.pdf")
    assert excinfo.value.code == "corrupt_file"
    assert "startxref" in excinfo.value.message


def test_pdf_ligatures_become_letters(corpus: Path) -> None:
    markdown = parse_corpus_file(corpus, "pdf/pj_copy_paste_ligatures.pdf").markdown
    assert not re.search("[\ufb00-\ufb06]", markdown)
    assert "ffi" in markdown
    assert "fl" in markdown


def test_pdf_multicolumn_hyphens_joined(corpus: Path) -> None:
    markdown = parse_corpus_file(corpus, "pdf/sf_multicolumn.pdf").markdown
    assert "consectetuer" in markdown
    assert "con-" not in markdown
    assert "\ufffe" not in markdown


def test_pdf_standard_fonts_no_controls(corpus: Path) -> None:
    markdown = parse_corpus_file(corpus, "pdf/pj_standard_fonts.pdf").markdown
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", markdown)


def test_pdf_truncated_corpus_file(corpus: Path) -> None:
    data = (corpus / "pdf/pj_tracemonkey.pdf").read_bytes()[:3000]
    assert parse_error(data, "application/pdf").code == "corrupt_file"


# parse_document: corpus HTML and text.


def test_html_lying_charset_decoded_as_utf8(corpus: Path) -> None:
    result = parse_corpus_file(corpus, "html/readability_qq.source.html")
    assert result.encoding == "utf-8"
    assert "首页" in result.markdown


def test_html_shift_jis_without_charset(corpus: Path) -> None:
    path = "html/chardet_shift-jis_no_encoding_specified.html"
    result = parse_corpus_file(corpus, path)
    assert result.encoding in ("cp932", "shift_jis")
    assert "衆院議院運営委員会" in result.markdown


def test_html_utf16le_without_bom(corpus: Path) -> None:
    result = parse_corpus_file(corpus, "html/chardet_plane1-utf-16le.html")
    assert result.encoding == "utf-16-le"
    assert "Unicode Plane 1 Example" in result.markdown
    assert any(ord(character) > 0xFFFF for character in result.markdown)


def test_html_gb2312_page(corpus: Path) -> None:
    result = parse_corpus_file(corpus, "html/chardet_gb2312_mozilla_bug171813.html")
    assert result.encoding == "gb18030"
    assert "搜狐在线" in result.markdown


def test_html_comment_inside_script_hidden(corpus: Path) -> None:
    path = "html/readability_comment-inside-script-parsing.source.html"
    markdown = parse_corpus_file(corpus, path).markdown
    assert markdown.startswith("# Lorem")
    assert "-->" not in markdown
    assert "Silly test" not in markdown
    assert "foo.js" not in markdown


def test_html_data_url_image_dropped(corpus: Path) -> None:
    path = "html/readability_data-url-image.source.html"
    markdown = parse_corpus_file(corpus, path).markdown
    assert "base64" not in markdown
    assert "data:" not in markdown
    assert "Lorem ipsum dolor sit amet" in markdown


def test_html_corpus_tables_kept(corpus: Path) -> None:
    path = "html/readability_keep-tabular-data.source.html"
    markdown = parse_corpus_file(corpus, path).markdown
    assert "| Load map" in markdown
    assert "| ---" in markdown


def test_html_corpus_pre_blocks_kept(corpus: Path) -> None:
    markdown = parse_corpus_file(corpus, "html/readability_ietf-1.source.html").markdown
    assert markdown.count("```") >= 2


@pytest.mark.parametrize(
    "relative_path",
    ["txt/gutenberg_pg1661_sherlock_crlf.txt", "txt/gutenberg_pg11_alice_crlf.txt"],
)
def test_text_gutenberg_crlf_removed(corpus: Path, relative_path: str) -> None:
    # read_bytes, because read_text would translate CRLF itself.
    raw_text = (corpus / relative_path).read_bytes().decode("utf-8").strip()
    markdown = parse_corpus_file(corpus, relative_path).markdown
    assert "\r" not in markdown
    assert len(markdown.split("\n")) == len(raw_text.split("\r\n"))


def test_text_utf8_bom_corpus_stripped(corpus: Path) -> None:
    result = parse_corpus_file(corpus, "txt/chardet_utf-8-bom.txt")
    assert result.encoding == "utf-8-sig"
    assert not result.markdown.startswith("\ufeff")


def test_text_utf16le_corpus_without_bom(corpus: Path) -> None:
    result = parse_corpus_file(corpus, "txt/chardet_utf-16le_nobom.txt")
    assert result.encoding == "utf-16-le"
    assert result.markdown.startswith("DateTime,Bid,Ask\n07/19/2015")


def test_text_windows1252_ellipsis(corpus: Path) -> None:
    markdown = parse_corpus_file(corpus, "txt/chardet_windows-1252.txt").markdown
    assert "dat zij al…. Ach" in markdown


def test_text_shift_jis_cr_only(corpus: Path) -> None:
    result = parse_corpus_file(corpus, "txt/chardet_shift-jis_cr-only.txt")
    assert result.encoding == "cp932"
    assert "\r" not in result.markdown
    assert result.markdown.count("\n") > 700
    assert "羅生門" in result.markdown


@pytest.mark.parametrize(
    "relative_path",
    [
        "md/system-design-primer_README.md",
        "md/public-apis_README.md",
        "md/commonmark-spec.md",
        "md/system-design-primer_pastebin_README.md",
    ],
)
def test_markdown_corpus_unchanged(corpus: Path, relative_path: str) -> None:
    raw = (corpus / relative_path).read_text(encoding="utf-8")
    markdown = parse_corpus_file(corpus, relative_path).markdown
    assert markdown == normalize_text(raw).lstrip("\n")
    assert markdown.count("```") == raw.count("```")
    assert count_table_rows(markdown) == count_table_rows(raw)


def test_markdown_commonmark_long_fences(corpus: Path) -> None:
    markdown = parse_corpus_file(corpus, "md/commonmark-spec.md").markdown
    assert markdown.count("`" * 32) == 1310
    assert markdown.startswith("---\ntitle: CommonMark Spec")


# Every corpus file.


@pytest.mark.parametrize("relative_path", CORPUS_FILES)
def test_corpus_file_parses_or_raises(corpus: Path, relative_path: str) -> None:
    result, error = call_or_parse_error(parse_corpus_file, corpus, relative_path)
    if error is not None:
        assert error.code in PARSE_ERROR_CODES
        assert error.message
        return

    assert result is not None
    markdown = result.markdown
    assert "\x00" not in markdown
    assert not LONE_SURROGATE.search(markdown)
    assert "\r" not in markdown
    assert "\ufffe" not in markdown
    assert normalize_text(markdown) == markdown
    if result.page_count is None:
        assert result.page_offsets == []
    else:
        assert len(result.page_offsets) == result.page_count
        assert result.page_offsets[0] == 0
        assert result.page_offsets == sorted(result.page_offsets)
        assert result.page_offsets[-1] <= len(markdown)


# Arbitrary input.


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048), content_type=st.sampled_from(SUPPORTED_TYPES))
def test_parse_arbitrary_bytes(data: bytes, content_type: str) -> None:
    result, error = call_or_parse_error(parse_document, data, content_type)
    if error is not None:
        assert error.code in PARSE_ERROR_CODES
        return
    assert result is not None
    assert "\x00" not in result.markdown
    assert not LONE_SURROGATE.search(result.markdown)


@settings(max_examples=200, deadline=None)
@given(head=st.binary(max_size=2048), filename=st.sampled_from(["", "a.md", "b.html"]))
def test_sniff_arbitrary_bytes(head: bytes, filename: str) -> None:
    content_type, error = call_or_parse_error(
        sniff_content_type, head, filename=filename
    )
    if error is not None:
        assert error.code == "unsupported_type"
        return
    assert content_type in SUPPORTED_TYPES


@settings(max_examples=300, deadline=None)
@given(
    html=st.text(alphabet=st.sampled_from(list("<>/!-'\"= ascriptyle")), max_size=200)
)
def test_remove_scripts_arbitrary_markup(html: str) -> None:
    cleaned = remove_scripts_and_styles(html)
    assert len(cleaned) <= len(html)
