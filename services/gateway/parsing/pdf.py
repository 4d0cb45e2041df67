"""PDF text extraction with PDFium (pypdfium2)."""

from __future__ import annotations

import re

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from services.gateway.parsing.document import (
    ParsedDocument,
    ParseError,
    ParseLimits,
    clean_text,
)

PAGE_SEPARATOR = "\n\n"

# PDFium joins a word hyphenated at a line end into one word and puts U+FFFE
# where the hyphen and the line break were, for example "con\ufffesectetuer".
_HYPHEN_MARK = re.compile("\ufffe")


def parse_pdf(
    data: bytes, password: str | None, limits: ParseLimits | None = None
) -> ParsedDocument:
    """Extract the text of every page and join the pages with a blank line.

    An empty ``password`` is the same as None. Raises ParseError with the code
    "corrupt_file", "encrypted_password_required", "encrypted_password_wrong",
    "no_text_layer" or "limit_exceeded". The page count is checked before
    any page is read, and extraction stops at the page that takes the text
    over the character limit.
    """
    limits = limits or ParseLimits()
    password = password or None
    try:
        document = pdfium.PdfDocument(data, password=password)
    except pdfium.PdfiumError as exc:
        raise _load_error(exc, password) from exc

    try:
        page_count = len(document)
        if page_count > limits.max_pages:
            raise limits.pages_exceeded(page_count)
        page_texts, image_page_count = _extract_pages(document, limits)
    finally:
        document.close()

    markdown = PAGE_SEPARATOR.join(text for text in page_texts if text)
    if not markdown and image_page_count:
        pages = "page" if image_page_count == 1 else "pages"
        raise ParseError(
            "no_text_layer",
            f"the PDF has {image_page_count} {pages} of images and no text "
            "layer; run OCR (for example ocrmypdf) and upload the result",
        )
    tail = data[-1024:]
    if not markdown and (b"%%EOF" not in tail or b"startxref" not in tail):
        # PDFium rebuilds a damaged file into blank pages rather than failing.
        # A file without text that also lacks the startxref and %%EOF trailer,
        # which readers look for in the last 1024 bytes, is taken as damaged
        # rather than blank.
        raise ParseError(
            "corrupt_file",
            f"the PDF ({len(data)} bytes) has no text and no startxref/%%EOF "
            "trailer, so it is probably truncated or damaged; upload the complete file",
        )

    return ParsedDocument(
        markdown=markdown,
        page_count=len(page_texts),
        page_offsets=_page_offsets(page_texts, len(markdown)),
        encoding=None,
    )


def _load_error(exc: pdfium.PdfiumError, password: str | None) -> ParseError:
    if exc.err_code == pdfium_c.FPDF_ERR_PASSWORD and password is None:
        return ParseError(
            "encrypted_password_required",
            "the PDF is encrypted and needs a password; upload it again with "
            "the document's user or owner password (`ingestd upload --password`, "
            "or the password field of the upload's metadata)",
        )
    if exc.err_code == pdfium_c.FPDF_ERR_PASSWORD:
        return ParseError(
            "encrypted_password_wrong",
            "the password given for the encrypted PDF is incorrect; upload it "
            "again with the document's user or owner password (`ingestd upload "
            "--password`, or the password field of the upload's metadata)",
        )
    if exc.err_code == pdfium_c.FPDF_ERR_SECURITY:
        return ParseError(
            "corrupt_file",
            f"the PDF uses an encryption scheme that PDFium does not support "
            f"({exc}); remove the encryption (for example with qpdf --decrypt) "
            "and upload the result",
        )
    return ParseError(
        "corrupt_file",
        f"the PDF could not be opened ({exc}); check that the upload is "
        "complete, or repair the file (for example with qpdf) and upload it "
        "again",
    )


def _extract_pages(
    document: pdfium.PdfDocument, limits: ParseLimits
) -> tuple[list[str], int]:
    """Return the cleaned text of each page and the number of image pages.

    Image pages are counted only while no page has text, because the count
    matters only for a PDF without any text. Raises ParseError
    ("limit_exceeded") as soon as the pages read so far have more than
    ``limits.max_chars`` characters.
    """
    page_texts: list[str] = []
    image_page_count = 0
    found_text = False
    total_chars = 0
    for index in range(len(document)):
        try:
            page = document[index]
        except pdfium.PdfiumError as exc:
            raise _page_error(index, exc) from exc
        try:
            text = _page_text(page, index)
            found_text = found_text or bool(text)
            if not found_text and _has_image(page):
                image_page_count += 1
        finally:
            page.close()
        page_texts.append(text)
        total_chars += len(text)
        if total_chars > limits.max_chars:
            raise limits.chars_exceeded(total_chars, at_least=True)
    return page_texts, image_page_count


def _page_text(page: pdfium.PdfPage, index: int) -> str:
    try:
        textpage = page.get_textpage()
    except pdfium.PdfiumError as exc:
        raise _page_error(index, exc) from exc
    try:
        raw_text = textpage.get_text_range()
    finally:
        textpage.close()

    # PDFium ends every line with CRLF. clean_text converts them to LF, so
    # each line of the page stays a line. It also removes leading blank
    # lines, which would put the page offset before the page's text.
    return clean_text(_resolve_hyphen_marks(raw_text))


def _resolve_hyphen_marks(text: str) -> str:
    """Join words at PDFium's hyphen marks only between lowercase letters.

    "con-sectetuer" becomes "consectetuer", but "Non-Latin" and "GPU-based"
    keep their hyphen.
    """

    def replace(mark: re.Match[str]) -> str:
        before = text[mark.start() - 1 : mark.start()]
        after = text[mark.end() : mark.end() + 1]
        return "" if before.islower() and after.islower() else "-"

    return _HYPHEN_MARK.sub(replace, text)


def _has_image(page: pdfium.PdfPage) -> bool:
    # get_objects also descends into form XObjects, so an image drawn through
    # a form counts too.
    images = page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE])
    return next(images, None) is not None


def _page_offsets(page_texts: list[str], length: int) -> list[int]:
    """Return where each page starts in the pages joined by PAGE_SEPARATOR.

    Pages without text are left out of the join, so such a page gets the
    offset of the next page with text, or ``length`` after the last one.
    """
    offsets: list[int] = []
    position = 0
    for text in page_texts:
        if text and position:
            position += len(PAGE_SEPARATOR)
        offsets.append(position)
        position += len(text)

    # Move each empty page forward to the start of the next page with text.
    next_start = length
    for index in reversed(range(len(page_texts))):
        if page_texts[index]:
            next_start = offsets[index]
        else:
            offsets[index] = next_start
    return offsets


def _page_error(index: int, exc: pdfium.PdfiumError) -> ParseError:
    return ParseError(
        "corrupt_file",
        f"page {index + 1} of the PDF could not be read ({exc}); repair the "
        "file (for example with qpdf) and upload it again",
    )
