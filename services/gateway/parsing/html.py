"""HTML to Markdown conversion with html-to-markdown."""

from __future__ import annotations

import logging
import re

import html_to_markdown
from html_to_markdown import ConversionOptions, PreprocessingOptions

from services.gateway.parsing.document import ParseError

logger = logging.getLogger(__name__)

# The "standard" preprocessing preset removes navigation and forms. Images
# are skipped because their alt text and URLs add noise, and the <head>
# metadata is not written as front matter. Hidden content (the default
# "drop") never appears, and script and style text is never written.
_CONVERSION_OPTIONS = ConversionOptions(
    preprocessing=PreprocessingOptions(
        enabled=True,
        preset="standard",
        remove_navigation=True,
        remove_forms=True,
    ),
    skip_images=True,
    inline_data_media="drop_element",
    extract_metadata=False,
)

_HTML_WHITESPACE = "\t\n\f\r "
_START_TAG = re.compile(r"<([A-Za-z][^\t\n\f\r />]*)(?:[^>\"']|\"[^\"]*\"|'[^']*')*+>")
_COMMENT_END = re.compile(r"--!?>")

# Elements whose content the HTML tokenizer reads as text up to the end tag,
# so a "<script" inside them is not a tag.
_RAW_TEXT_ELEMENTS = frozenset(
    {"textarea", "title", "xmp", "iframe", "noembed", "noframes", "noscript"}
)

# Tokens that change the state inside <script>, following the "script data"
# states of the HTML Standard's tokenizer.
_SCRIPT_END_TAG = rf"</script[{_HTML_WHITESPACE}/>]"
_SCRIPT_DATA_TOKEN = re.compile(rf"<!--|{_SCRIPT_END_TAG}", re.IGNORECASE)
_SCRIPT_ESCAPED_TOKEN = re.compile(
    rf"-->|{_SCRIPT_END_TAG}|<script[{_HTML_WHITESPACE}/>]", re.IGNORECASE
)
_SCRIPT_DOUBLE_ESCAPED_TOKEN = re.compile(rf"-->|{_SCRIPT_END_TAG}", re.IGNORECASE)


def html_to_text(html: str) -> str:
    """Convert an HTML document to Markdown without scripts and styles.

    Raises ParseError("corrupt_file") when html-to-markdown rejects the input.
    """
    try:
        result = html_to_markdown.convert(
            remove_scripts_and_styles(html), _CONVERSION_OPTIONS
        )
    except html_to_markdown.ConversionError as exc:
        raise ParseError(
            "corrupt_file",
            f"the HTML could not be converted to Markdown ({exc}); check that "
            "the file is a complete HTML document and upload it again",
        ) from exc

    # html-to-markdown skips elements nested deeper than its depth limit
    # (1024 levels in 3.21) and reports it only as a warning. The text in
    # them would be missing without a trace, so the document fails instead.
    for warning in result.warnings:
        if str(warning.kind) == "depth_limit_exceeded":
            raise ParseError(
                "limit_exceeded",
                f"the HTML nests elements too deeply to convert ({warning.message}); "
                "the text inside them would be lost, so flatten the nesting and "
                "upload it again",
            )
        logger.warning(
            "HTML conversion warning: %s (%s)", warning.message, warning.kind
        )
    return result.content or ""


def remove_scripts_and_styles(html: str) -> str:
    """Remove <script> and <style> elements, content included.

    html-to-markdown ends a script at the first "</script>", even one inside
    an HTML comment within the script, and then writes the rest of the script
    as text. This scan follows the HTML Standard instead. Comments, the
    content of raw-text elements and quoted attribute values are skipped, so
    a "<script" inside them is left alone.
    """
    pieces: list[str] = []
    copied_until = 0
    cursor = 0
    while (start := html.find("<", cursor)) != -1:
        if html.startswith("<!--", start):
            cursor = _comment_end(html, start)
            continue

        tag = _START_TAG.match(html, start)
        if tag is None:
            # An end tag, a doctype, a processing instruction or a literal "<".
            cursor = start + 1
            continue

        name = tag.group(1).lower()
        if name == "script":
            pieces.append(html[copied_until:start])
            copied_until = cursor = _script_end(html, tag.end())
        elif name == "style":
            pieces.append(html[copied_until:start])
            copied_until = cursor = _raw_text_end(html, tag.end(), name)
        elif name in _RAW_TEXT_ELEMENTS:
            cursor = _raw_text_end(html, tag.end(), name)
        else:
            cursor = tag.end()

    pieces.append(html[copied_until:])
    return "".join(pieces)


def _comment_end(html: str, start: int) -> int:
    """Return the index after the comment that starts at ``start``."""
    body = start + len("<!--")
    # "<!-->" and "<!--->" are complete (empty) comments.
    if html.startswith(">", body):
        return body + 1
    if html.startswith("->", body):
        return body + 2
    end = _COMMENT_END.search(html, body)
    return end.end() if end else len(html)


def _raw_text_end(html: str, position: int, name: str) -> int:
    """Return the index after the end tag of a raw-text element."""
    end_tag = re.compile(
        rf"</{re.escape(name)}[{_HTML_WHITESPACE}/>]", re.IGNORECASE
    ).search(html, position)
    if end_tag is None:
        return len(html)
    return _tag_end(html, end_tag.start())


def _script_end(html: str, position: int) -> int:
    """Return the index after the </script> that ends the script at ``position``.

    Inside "<!--" (the escaped state) a "<script" starts the double-escaped
    state, where "</script>" does not end the script. "-->" returns to the
    plain state from both.
    """
    state_tokens = _SCRIPT_DATA_TOKEN
    while (token := state_tokens.search(html, position)) is not None:
        text = token.group().lower()
        if text == "<!--":
            state_tokens = _SCRIPT_ESCAPED_TOKEN
            # The dashes of "<!--" also count toward a closing "-->", so
            # "<!-->" opens and closes the escaped state.
            position = token.start() + len("<!")
        elif text == "-->":
            state_tokens = _SCRIPT_DATA_TOKEN
            position = token.end()
        elif text.startswith("<script"):
            state_tokens = _SCRIPT_DOUBLE_ESCAPED_TOKEN
            position = token.end()
        elif state_tokens is _SCRIPT_DOUBLE_ESCAPED_TOKEN:
            state_tokens = _SCRIPT_ESCAPED_TOKEN
            position = token.end()
        else:
            return _tag_end(html, token.start())
    return len(html)


def _tag_end(html: str, start: int) -> int:
    end = html.find(">", start)
    return len(html) if end == -1 else end + 1
