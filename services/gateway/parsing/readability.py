"""Detection of extracted text that is too garbled to index.

A PDF font without a usable Unicode mapping makes extractors emit U+FFFD,
``(cid:N)`` placeholders, or characters from unrelated scripts in place of
the real text. Indexed, such text matches nothing useful, so the parse fails
with ``unreadable_text`` and the user learns that the document needs OCR.
"""

from __future__ import annotations

import re
import unicodedata

from charset_normalizer.md import mess_ratio

from services.gateway.parsing.document import ParseError

# Share of the non-whitespace characters that may be U+FFFD or part of a
# "(cid:N)" placeholder before the text counts as unreadable.
MAX_PLACEHOLDER_RATIO = 0.1

# charset-normalizer's mess ratio scores how implausible a decoded text is:
# the share of characters in suspicious sequences such as neighbouring
# letters from unrelated scripts. On the PDFs that
# tests/e2e/test_corpus_hostile.py parses, readable text, multilingual pages
# and mathematics scored at most 0.55, and a calligraphy font without a
# Unicode mapping scored 1.9.
# NOTE: the threshold comes from that sample of about 30 PDFs; raise it if
# real documents of unusual scripts are rejected.
MAX_MESS_RATIO = 1.0
# The mess ratio of a few characters is unreliable, and a long text is judged
# by a sample from its start.
MESS_MIN_CHARS = 200
MESS_SAMPLE_CHARS = 100_000

_CID_PLACEHOLDER = re.compile(r"\(cid:\d+\)")
# Unicode general categories of characters that show a glyph of their own:
# letters, numbers, punctuation and symbols.
_GLYPH_CATEGORIES = frozenset("LNPS")
_WHITESPACE = re.compile(r"\s+")


def check_readable(text: str, *, check_scripts: bool) -> None:
    """Raise ParseError("unreadable_text") when text shows nothing or is mostly placeholders.

    ``check_scripts`` also rejects text whose characters form implausible
    sequences, which is how a PDF font without a usable ToUnicode map
    usually comes out. Empty text passes.
    """
    visible = len(_WHITESPACE.sub("", text))
    if visible == 0:
        return
    if not any(unicodedata.category(char)[0] in _GLYPH_CATEGORIES for char in text):
        raise ParseError(
            "unreadable_text",
            f"none of the {visible} non-space characters of the text is visible: "
            "they are format controls, zero-width characters, private-use code "
            "points or combining marks without a base letter; upload a file that "
            "contains readable text",
        )
    placeholders = text.count("\ufffd") + sum(
        len(match) for match in _CID_PLACEHOLDER.findall(text)
    )
    if placeholders / visible > MAX_PLACEHOLDER_RATIO:
        # check_scripts is set for PDFs, where placeholders come from fonts.
        fix = (
            "the document's fonts cannot be read as text; run OCR (for example "
            "ocrmypdf --force-ocr) and upload the result"
            if check_scripts
            else "the file was damaged or decoded wrongly before it was uploaded; "
            "upload an undamaged copy"
        )
        raise ParseError(
            "unreadable_text",
            f"{placeholders} of the {visible} non-space characters of the extracted "
            f"text are U+FFFD or (cid:N) placeholders, so {fix}",
        )
    if check_scripts and visible >= MESS_MIN_CHARS:
        ratio = mess_ratio(text[:MESS_SAMPLE_CHARS], maximum_threshold=MAX_MESS_RATIO)
        if ratio >= MAX_MESS_RATIO:
            raise ParseError(
                "unreadable_text",
                f"the extracted text is garbled (mess ratio {ratio:.2f}, the maximum "
                f"is {MAX_MESS_RATIO}), which happens when a font has no usable "
                "Unicode mapping; run OCR (for example ocrmypdf --force-ocr) and "
                "upload the result",
            )
