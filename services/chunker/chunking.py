"""Markdown-aware chunking sized in the embedding model's own tokens.

semantic-text-splitter's MarkdownSplitter cuts at the highest Markdown level
that fits (sections, then blocks, lists, code fences and table rows, then
sentences and words), counting tokens with the model's tokenizer.json, and
overlaps neighbouring chunks. This module adds what the pipeline needs on
top: exact offsets, the heading path and page range of each chunk, and a
final check that no chunk exceeds the model's limit.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from markdown_it import MarkdownIt
from semantic_text_splitter import MarkdownSplitter
from tokenizers import Tokenizer

from shared.hashing import chunk_sha

CHUNKER_NAME = "markdown-splitter"

# The splitter's time grows faster than linearly with the length of its
# input. A 750,000-character log with a 330,000-character line took 155 s
# in one call and 8 s in windows of this size (semantic-text-splitter
# 0.33.1 on a shared two-core machine). So the text is first cut into
# windows of at most this many characters, at a blank line, a line break
# or a space in the window's second half. Chunks never cross a window
# boundary, so neighbouring windows have no overlap.
WINDOW_CHARS = 16384
# Raised whenever a change to this module moves chunk boundaries or changes
# the metadata stored with each chunk, so that the chunker version, and
# with it every chunk id, changes too. Revision 3 reads setext headings.
CUT_REVISION = 3

# A CommonMark parser that runs only the block pass: the headings and
# their line numbers come from it, and skipping the inline pass (links,
# emphasis) keeps a large document fast.
#
# The preset's nesting limit of 20 levels made the parse skip the rest of a
# document after a list nested 10 deep; 200 keeps Python's recursion within
# its limit. The link reference rule is off: it parses an unclosed title
# again for every further line, which took over a minute on 5 MB, and it
# only decides whether "[a]: /url" above a "===" line is a heading.
_BLOCK_PARSER = MarkdownIt("commonmark", {"maxNesting": 200}).disable(
    ["inline", "text_join", "reference"]
)
# A heading path repeats in every chunk's metadata, and a setext heading can
# be a whole paragraph, so a title is cut to this many characters.
MAX_TITLE_CHARS = 200
# CommonMark's line endings: markdown-it numbers lines split at any of them.
_LINE_END = re.compile(r"\r\n|\r|\n")
# YAML front matter: a first line "---", then a "key: value" line, up to a
# closing "---" or "..." line. A document that merely opens with a rule has
# no key line there.
_FRONT_MATTER = re.compile(
    r"---[ \t]*\n[\w\"'-][^\n]*:[^\n]*\n(?:.*\n){0,200}?(?:---|\.\.\.)[ \t]*(?:\n|$)"
)


@dataclass(frozen=True)
class Chunk:
    """One chunk of a normalized text."""

    ord: int
    text: str
    start: int
    end: int
    token_count: int
    sha: str
    heading_path: list[str] = field(default_factory=list)
    page_start: int | None = None
    page_end: int | None = None

    def meta(self) -> dict[str, object]:
        """Metadata stored beside the chunk in the buffer and search table."""
        meta: dict[str, object] = {
            "start": self.start,
            "end": self.end,
            "token_count": self.token_count,
            "heading_path": self.heading_path,
        }
        if self.page_start is not None:
            meta["page_start"] = self.page_start
            meta["page_end"] = self.page_end
        return meta


def heading_index(text: str) -> list[tuple[int, int, str]]:
    """List (offset, level, title) of the document's top-level headings.

    ATX (``# Title``) and setext (a title line underlined with ``=`` or
    ``-``) headings both count. Headings inside code blocks, block quotes,
    list items and YAML front matter do not. Titles longer than
    MAX_TITLE_CHARS are cut at a space and end with an ellipsis.
    """
    line_starts = [0] + [match.end() for match in _LINE_END.finditer(text)]
    front = _FRONT_MATTER.match(text)
    front_end = front.end() if front else 0
    try:
        tokens = _BLOCK_PARSER.parse(text)
    except RecursionError:
        # Nesting that still runs out of stack: the preset's own limit
        # stops early instead, so the headings before that point are found.
        tokens = MarkdownIt("commonmark").disable(["inline", "text_join"]).parse(text)
    headings: list[tuple[int, int, str]] = []
    for opening, inline in itertools.pairwise(tokens):
        if opening.type != "heading_open" or opening.level != 0 or opening.map is None:
            continue
        offset = line_starts[opening.map[0]]
        title = _short_title(inline.content)
        if title and offset >= front_end:
            headings.append((offset, int(opening.tag[1:]), title))
    return headings


def _short_title(content: str) -> str:
    title = " ".join(content.split())
    if len(title) <= MAX_TITLE_CHARS:
        return title
    cut = title[: MAX_TITLE_CHARS - 1]
    if " " in cut[MAX_TITLE_CHARS // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut + "…"


class HeadingPaths:
    """The headings in force at increasing positions, found in one pass.

    Each call to at() moves on from where the last one stopped, so the
    paths of all chunks cost one walk over the headings, not one walk per
    chunk. A position before the previous one starts the walk again.
    """

    def __init__(self, headings: list[tuple[int, int, str]]) -> None:
        self._headings = headings
        self._next = 0
        self._stack: list[tuple[int, str]] = []
        self._position = 0

    def at(self, position: int) -> list[str]:
        """Return the headings in force at position, outermost first."""
        if position < self._position:
            self._next = 0
            self._stack = []
        self._position = position
        while self._next < len(self._headings):
            offset, level, title = self._headings[self._next]
            if offset > position:
                break
            while self._stack and self._stack[-1][0] >= level:
                self._stack.pop()
            self._stack.append((level, title))
            self._next += 1
        return [title for _, title in self._stack]


def heading_path_at(headings: list[tuple[int, int, str]], position: int) -> list[str]:
    """Return the headings in force at position, outermost first."""
    return HeadingPaths(headings).at(position)


def split_windows(text: str, size: int) -> list[tuple[int, str]]:
    """Cut text into consecutive (offset, window) pairs of at most size characters.

    Each cut falls at the last blank line in the second half of the window,
    else the last line break there, else the last space there, else at size.
    Joining the windows gives back text.
    """
    windows: list[tuple[int, str]] = []
    start = 0
    while len(text) - start > size:
        end = start + size
        half = start + size // 2
        for separator in ("\n\n", "\n", " "):
            cut = text.rfind(separator, half, end)
            if cut != -1:
                end = cut + len(separator)
                break
        windows.append((start, text[start:end]))
        start = end
    if start < len(text):
        windows.append((start, text[start:]))
    return windows


class MarkdownChunker:
    """Chunks text for one embedding model's tokenizer and limits."""

    def __init__(
        self,
        tokenizer_path: Path,
        *,
        min_tokens: int,
        max_tokens: int,
        overlap_tokens: int,
        max_chars: int = 4096,
    ) -> None:
        self.min_tokens = min_tokens
        self.max_chars = max_chars
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # tokenizer.json files often ship with truncation and padding on;
        # both would hide a chunk's true length from the splitter.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        # The splitter counts tokens without the special tokens ([CLS] and
        # [SEP] for BERT models) that the model adds to every input, so the
        # capacity leaves room for them.
        self.special_tokens = len(
            self.tokenizer.encode("", add_special_tokens=True).ids
        )
        capacity = (
            max(1, min_tokens - self.special_tokens),
            max_tokens - self.special_tokens,
        )
        self._splitter = MarkdownSplitter.from_huggingface_tokenizer(
            self.tokenizer, capacity, overlap=overlap_tokens
        )
        tokenizer_sha = hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()[:12]
        # Any change of library, tokenizer or sizes changes the version, and
        # with it every chunk id, so old chunks are never silently reused.
        self.version = (
            f"sts-{version('semantic-text-splitter')}"
            f"-tok-{tokenizer_sha}-t{min_tokens}-{max_tokens}-o{overlap_tokens}-c{max_chars}"
            f"-w{WINDOW_CHARS}-r{CUT_REVISION}"
        )
        self.name = CHUNKER_NAME

    def count_tokens(self, text: str) -> int:
        """Return the model's token count for text, special tokens included."""
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def chunk(self, text: str, page_offsets: list[int] | None = None) -> list[Chunk]:
        """Chunk normalized text; page_offsets maps offsets to 1-based pages."""
        headings = HeadingPaths(heading_index(text))
        pieces: list[tuple[int, str, int | None]] = []
        for window_start, window in split_windows(text, WINDOW_CHARS):
            for offset, piece in self._splitter.chunk_indices(window):
                start = window_start + offset
                # The character cut comes first, because cutting a long word
                # can turn one [UNK] token into dozens of word pieces. The
                # token cut never lengthens a piece.
                for part_start, part in self._enforce_char_limit(start, piece):
                    pieces.extend(self._enforce_limit(part_start, part))
        # With overlap, the splitter's next chunk can start inside a piece
        # that the character or token cut has split, so the parts are put in
        # order of their start. Of parts with the same start the longest is
        # kept, since it covers the others.
        longest: dict[int, tuple[str, int | None]] = {}
        for start, piece, tokens in pieces:
            if len(piece) > len(longest.get(start, ("", None))[0]):
                longest[start] = (piece, tokens)
        chunks = []
        for ordinal, (start, (piece, tokens)) in enumerate(sorted(longest.items())):
            end = start + len(piece)
            page_start = page_end = None
            if page_offsets:
                page_start = bisect.bisect_right(page_offsets, start)
                page_end = bisect.bisect_right(page_offsets, max(start, end - 1))
            chunks.append(
                Chunk(
                    ord=ordinal,
                    text=piece,
                    start=start,
                    end=end,
                    token_count=self.count_tokens(piece) if tokens is None else tokens,
                    sha=chunk_sha(piece),
                    heading_path=headings.at(start),
                    page_start=page_start,
                    page_end=page_end,
                )
            )
        return chunks

    def _enforce_char_limit(self, start: int, piece: str) -> list[tuple[int, str]]:
        # WordPiece turns any word over 100 characters into one [UNK] token,
        # so text without spaces fits the token limit at any length. Such a
        # piece is cut at max_chars, at the last space in its second half
        # when there is one.
        parts = []
        offset = 0
        while len(piece) - offset > self.max_chars:
            end = offset + self.max_chars
            space = piece.rfind(" ", offset + self.max_chars // 2, end)
            if space > offset:
                end = space + 1
            parts.append((start + offset, piece[offset:end]))
            offset = end
        parts.append((start + offset, piece[offset:]))
        return [(part_start, part) for part_start, part in parts if part.strip()]

    def _enforce_limit(
        self, start: int, piece: str
    ) -> list[tuple[int, str, int | None]]:
        # The splitter keeps to its capacity, but a tokenizer can count a
        # piece differently once it is encoded on its own, because word
        # boundaries change. Anything over the limit is cut at token offsets.
        # A piece within the limit keeps the token count of this encoding. A
        # cut part gets None, because it is counted again on its own.
        encoding = self.tokenizer.encode(piece, add_special_tokens=False)
        tokens = len(encoding.ids) + self.special_tokens
        if tokens <= self.max_tokens:
            return [(start, piece, tokens)]
        # Each part begins where the one before it ended, so characters the
        # tokenizer drops (controls, private-use and unassigned code points)
        # stay in the text instead of falling between two parts.
        window = self.max_tokens - self.special_tokens
        parts = []
        begin = 0
        for first in range(0, len(encoding.ids), window):
            last = min(first + window, len(encoding.ids)) - 1
            finish = encoding.offsets[last][1]
            if first + window >= len(encoding.ids):
                finish = len(piece)
            part = piece[begin:finish]
            if part.strip():
                parts.append((start + begin, part, None))
            begin = finish
        return parts
