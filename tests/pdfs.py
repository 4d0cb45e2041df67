"""Small PDF files written byte by byte, for parser and pipeline tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PdfPageSpec:
    """Content of one generated PDF page, as text lines and an optional image."""

    lines: tuple[str, ...] = ()
    image: bool = False


def build_pdf(pages: list[PdfPageSpec], *, to_unicode: bytes | None = None) -> bytes:
    """Write a PDF 1.4 file with Helvetica text lines and 2x2 gray images.

    ``to_unicode``, when given, is the ToUnicode CMap of the font, which
    decides the text that extractors read from the glyphs.
    """
    font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica"
    objects: dict[int, bytes] = {1: b"<< /Type /Catalog /Pages 2 0 R >>"}
    next_id = 4
    if to_unicode is not None:
        objects[next_id] = (
            b"<< /Length %d >>\nstream\n" % len(to_unicode)
            + to_unicode
            + b"\nendstream"
        )
        font += b" /ToUnicode %d 0 R" % next_id
        next_id += 1
    objects[3] = font + b" >>"
    page_ids: list[int] = []
    for page in pages:
        page_id, content_id = next_id, next_id + 1
        next_id += 2
        operators: list[bytes] = []
        resources = b"/Font << /F1 3 0 R >>"
        if page.lines:
            operators.append(b"BT /F1 12 Tf 14 TL 72 720 Td")
            for line in page.lines:
                escaped = (
                    line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
                )
                operators.append(b"(" + escaped.encode("ascii") + b") Tj T*")
            operators.append(b"ET")
        if page.image:
            image_id = next_id
            next_id += 1
            objects[image_id] = (
                b"<< /Type /XObject /Subtype /Image /Width 2 /Height 2 "
                b"/ColorSpace /DeviceGray /BitsPerComponent 8 /Length 4 >>\n"
                b"stream\n\x00\xff\xff\x00\nendstream"
            )
            resources += b" /XObject << /Im1 %d 0 R >>" % image_id
            operators.append(b"q 200 0 0 200 100 300 cm /Im1 Do Q")
        stream = b"\n".join(operators)
        objects[content_id] = (
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
        )
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << " + resources + b" >> /Contents %d 0 R >>" % content_id
        )
        page_ids.append(page_id)
    kids = b" ".join(b"%d 0 R" % page_id for page_id in page_ids)
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(page_ids))

    output = bytearray(b"%PDF-1.4\n")
    offsets: dict[int, int] = {}
    for object_id in sorted(objects):
        offsets[object_id] = len(output)
        output += b"%d 0 obj\n" % object_id + objects[object_id] + b"\nendobj\n"
    xref_offset = len(output)
    size = max(objects) + 1
    output += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for object_id in range(1, size):
        output += b"%010d 00000 n \n" % offsets[object_id]
    output += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        size,
        xref_offset,
    )
    return bytes(output)


def replacement_cmap() -> bytes:
    """Return a ToUnicode CMap that maps every one-byte code to U+FFFD.

    A font with this map is what a PDF with a broken font encoding looks
    like to an extractor: every glyph reads as the replacement character.
    """
    targets = b" ".join(b"<FFFD>" for _ in range(256))
    return (
        b"/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n"
        b"/CMapName /ReplacementOnly def\n/CMapType 2 def\n"
        b"1 begincodespacerange\n<00> <FF>\nendcodespacerange\n"
        b"1 beginbfrange\n<00> <FF> [" + targets + b"]\nendbfrange\n"
        b"endcmap\nCMapName currentdict /CMap defineresource pop\nend\nend"
    )
