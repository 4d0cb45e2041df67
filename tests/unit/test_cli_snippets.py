"""Search result snippets without Markdown markup."""

from __future__ import annotations

import pytest

from ingestd.cli.snippets import plain_text, shorten


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        (
            "## Leases\n\nA lease is **renewed** by its heartbeat.",
            "Leases A lease is renewed by its heartbeat.",
        ),
        (
            "Read [the guide](https://example.com/a/long/path) first.",
            "Read the guide first.",
        ),
        ("Set `INGESTD_HOST` and *restart*.", "Set INGESTD_HOST and restart."),
        ("- one\n- two\n  1. three", "one two three"),
        ("| name | port |\n|---|---|\n| gateway | 50051 |", "name port gateway 50051"),
        ("```sh\npip install ingestd\n```", "pip install ingestd"),
        ("![a heron at dusk](heron.png)", "a heron at dusk"),
        ('<p align="center"><b>ingestd</b></p>', "ingestd"),
        ("> quoted\n> text", "quoted text"),
        ("un**break**able", "unbreakable"),
        ("winter.<br>They left", "winter. They left"),
        ("~~old~~ new", "old new"),
        # Rows of a table whose header is in the chunk before.
        (
            "| Open-Meteo | **Global** weather | No |\n| Licenses | [MIT](https://x.org) | Yes |",
            "Open-Meteo Global weather No Licenses MIT Yes",
        ),
    ],
)
def test_markup_removed(markdown: str, expected: str) -> None:
    assert plain_text(markdown) == expected


def test_plain_text_whitespace_collapsed() -> None:
    assert plain_text("It was a dark\r\n\r\nand   stormy night.") == (
        "It was a dark and stormy night."
    )


def test_rule_only_chunk_keeps_raw_text() -> None:
    assert plain_text("* * *\n\n---") == "* * * ---"


def test_shorten_cuts_at_space_with_ellipsis() -> None:
    assert shorten("a job resumes from its step", 14) == "a job resumes…"
    assert shorten("short", 14) == "short"
    # A single long word is cut inside it.
    assert shorten("x" * 30, 10) == "x" * 9 + "…"
