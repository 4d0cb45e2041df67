"""Plain-text snippets of Markdown chunks, for search results in a terminal."""

from __future__ import annotations

import re

from markdown_it import MarkdownIt
from markdown_it.token import Token

# Tables are not CommonMark, but the parsers write them for PDF and HTML
# tables, so the table rule is enabled to read their cells.
_MARKDOWN = MarkdownIt("commonmark").enable("table")

_HTML_TAG = re.compile(r"<[^>]*>")

# Block tokens whose content is shown as it is.
_LITERAL_BLOCKS = frozenset({"fence", "code_block"})


def plain_text(markdown: str) -> str:
    """Return the text of a Markdown chunk without its markup, on one line.

    The markup of headings, emphasis, links and tables is dropped, and
    their text is kept. An image keeps its alt text, and code its content. HTML
    keeps only the text between its tags. Text without any Markdown comes
    back with its whitespace collapsed.
    """
    blocks: list[str] = []
    for token in _MARKDOWN.parse(markdown):
        if token.type in _LITERAL_BLOCKS:
            blocks.append(token.content)
        elif token.type == "html_block":
            blocks.append(_HTML_TAG.sub(" ", token.content))
        elif token.type == "inline":
            blocks.append(
                "".join(_inline_text(child) for child in token.children or [])
            )
    text = " ".join(" ".join(blocks).split())
    # A chunk of only rules or tags has no text of its own. Its raw text is
    # shown instead of an empty line.
    return text or " ".join(markdown.split())


def _inline_text(token: Token) -> str:
    """Return the visible text of one inline token: markup and HTML give none."""
    if token.type in ("text", "code_inline", "image"):
        # An image token's content is its alt text.
        return token.content
    if token.type in ("softbreak", "hardbreak"):
        return " "
    return ""
