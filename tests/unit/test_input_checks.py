"""Tests for parse limits, the unreadable-text check and display file names."""

from __future__ import annotations

import pytest

from services.gateway.parsing import ParseError, ParseLimits, parse_document
from services.gateway.parsing.readability import MAX_PLACEHOLDER_RATIO, check_readable
from services.gateway.upload import (
    MAX_FILENAME_CHARS,
    declared_type_differs,
    display_filename,
)
from tests.pdfs import PdfPageSpec, build_pdf


def parse_error(data: bytes, content_type: str, limits: ParseLimits) -> ParseError:
    with pytest.raises(ParseError) as excinfo:
        parse_document(data, content_type, limits=limits)
    return excinfo.value


def test_pdf_page_limit_names_count() -> None:
    data = build_pdf([PdfPageSpec(lines=("page",)) for _ in range(4)])
    error = parse_error(data, "application/pdf", ParseLimits(max_pages=3))
    assert error.code == "limit_exceeded"
    assert "4 pages" in error.message
    assert "INGESTD_MAX_PAGES" in error.message


def test_pdf_at_page_limit_parses() -> None:
    data = build_pdf([PdfPageSpec(lines=("page",)) for _ in range(3)])
    parsed = parse_document(data, "application/pdf", limits=ParseLimits(max_pages=3))
    assert parsed.page_count == 3


def test_pdf_char_limit_stops_early() -> None:
    data = build_pdf([PdfPageSpec(lines=("y" * 50,)) for _ in range(10)])
    error = parse_error(data, "application/pdf", ParseLimits(max_chars=120))
    assert error.code == "limit_exceeded"
    assert "at least 150 characters" in error.message
    assert "INGESTD_MAX_PARSED_CHARS" in error.message


@pytest.mark.parametrize("media_type", ["text/plain", "text/markdown", "text/html"])
def test_text_char_limit(media_type: str) -> None:
    error = parse_error(b"z" * 101, media_type, ParseLimits(max_chars=100))
    assert error.code == "limit_exceeded"
    assert "101 characters" in error.message


def test_text_at_char_limit_parses() -> None:
    parsed = parse_document(b"z" * 100, "text/plain", limits=ParseLimits(max_chars=100))
    assert parsed.markdown == "z" * 100


def test_placeholder_ratio_boundary() -> None:
    visible = 100
    allowed = int(visible * MAX_PLACEHOLDER_RATIO)
    check_readable("\ufffd" * allowed + "a" * (visible - allowed), check_scripts=False)
    with pytest.raises(ParseError) as excinfo:
        check_readable(
            "\ufffd" * (allowed + 1) + "a" * (visible - allowed - 1),
            check_scripts=False,
        )
    assert excinfo.value.code == "unreadable_text"


def test_cid_placeholders_counted_whole() -> None:
    with pytest.raises(ParseError) as excinfo:
        check_readable("word " * 20 + "(cid:123)" * 3, check_scripts=False)
    assert "27 of the" in excinfo.value.message


def test_garbled_scripts_rejected_only_when_checked() -> None:
    garbled = "ԔϸЇΰÎߙΨ́ϣķϙʆϢ¢һӍΉʽী¢Ǌ\u0a52ඥഀဍ\u0cc5Ϣͳರ͟ȥ܅ହຏഀƹΉటҧ" * 10
    check_readable(garbled, check_scripts=False)
    with pytest.raises(ParseError) as excinfo:
        check_readable(garbled, check_scripts=True)
    assert excinfo.value.code == "unreadable_text"
    assert "mess ratio" in excinfo.value.message


@pytest.mark.parametrize(
    "text",
    [
        "Ordinary English prose with punctuation, numbers like 3.14 and (notes). " * 5,
        "Ein Satz mit Umlauten: Größe, Übung, Ähre und Straße. " * 6,
        "日本語の文章です。句読点もあります。" * 20,
        "Математика: ∀x ∈ ℝ, x² ≥ 0 и ∑ aᵢ = 1. " * 8,
    ],
)
def test_readable_scripts_pass(text: str) -> None:
    check_readable(text, check_scripts=True)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("report.pdf", "report.pdf"),
        ("a/b/../../secret.txt", "secret.txt"),
        ("dir\\sub\\notes.md", "notes.md"),
        ("tab\there\x00.txt", "tabhere.txt"),
        ("\u202egnp.exe", "gnp.exe"),
        ("zero\u200bwidth.txt", "zerowidth.txt"),
        ("  spaced  ", "spaced"),
        ("..", ""),
        ("", ""),
        ("e\u0301.txt", "é.txt"),
    ],
)
def test_display_filename(name: str, shown: str) -> None:
    assert display_filename(name) == shown


def test_display_filename_keeps_extension() -> None:
    shown = display_filename("a" * 10_000 + ".pdf")
    assert len(shown) == MAX_FILENAME_CHARS
    assert shown.endswith("a.pdf")


def test_display_filename_long_extension_cut() -> None:
    shown = display_filename("name." + "x" * 1000)
    assert len(shown) == MAX_FILENAME_CHARS


@pytest.mark.parametrize(
    ("declared", "detected", "differs"),
    [
        ("", "text/plain", False),
        ("application/pdf", "application/pdf", False),
        ("Application/PDF; charset=binary", "application/pdf", False),
        ("text/x-markdown", "text/markdown", False),
        ("application/pdf", "text/plain", True),
        ("image/png", "text/html", True),
    ],
)
def test_declared_type_differs(declared: str, detected: str, differs: bool) -> None:
    assert declared_type_differs(declared, detected) is differs
