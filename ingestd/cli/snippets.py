"""Plain-text snippets of Markdown chunks, for search results in a terminal."""

from __future__ import annotations

import re

from markdown_it import MarkdownIt
from markdown_it.token import Token

# Tables and strikethrough are not CommonMark, but the parsers write them
# for PDF and HTML documents, so both rules are enabled.
_MARKDOWN = MarkdownIt("commonmark").enable(["table", "strikethrough"])

# Characters of a snippet in search results.
SNIPPET_CHARS = 300

# A line of table cells. A chunk that starts inside a table has rows
# without the header, which the table rule needs, so they parse as text.
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")

_HTML_TAG = re.compile(r"<[^>]*>")

# Block tokens whose content is shown as it is.
_LITERAL_BLOCKS = frozenset({"fence", "code_block"})


def plain_text(markdown: str) -> str:
    """Return the text of a Markdown chunk without its markup, on one line.

    The markup of headings, emphasis, links and tables is dropped, and
    their text is kept. An image keeps its alt text, and code its content.
    HTML keeps only the text between its tags. Text without any Markdown
    comes back with its whitespace collapsed.
    """
    blocks: list[str] = []
    for token in _MARKDOWN.parse(markdown):
        if token.type in _LITERAL_BLOCKS:
            blocks.append(token.content)
        elif token.type == "html_block":
            blocks.append(_HTML_TAG.sub(" ", token.content))
        elif token.type == "inline":
            inline = token
            if token.content and all(
                _TABLE_ROW.match(line) for line in token.content.splitlines()
            ):
                # The rows' cells are read as one line of inline text.
                (inline,) = _MARKDOWN.parseInline(token.content.replace("|", " "))
            blocks.append(
                "".join(_inline_text(child) for child in inline.children or [])
            )
    text = " ".join(" ".join(blocks).split())
    # A chunk of only rules or tags has no text of its own. Its raw text is
    # shown instead of an empty line.
    return text or " ".join(markdown.split())


def _inline_text(token: Token) -> str:
    """Return the visible text of one inline token: markup gives none."""
    if token.type in ("text", "code_inline", "image"):
        # An image token's content is its alt text.
        return token.content
    if token.type in ("softbreak", "hardbreak", "html_inline"):
        # An inline tag such as <br> separates words.
        return " "
    return ""


def shorten(text: str, limit: int) -> str:
    """Return text cut to at most limit characters at a space, with "…" if cut."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    if cut < limit // 2:
        cut = limit - 1
    return text[:cut].rstrip() + "…"
