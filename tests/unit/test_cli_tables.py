"""List tables in wide and narrow terminals."""

from __future__ import annotations

import io

from rich.console import Console

from ingestd.cli.tables import Column, print_rows

COLUMNS = [
    Column("job"),
    Column("file", fold=True),
    Column("status"),
    Column("embedded", right_aligned=True),
]
ROWS = [
    [
        "3b4cf153-26f5-5a86-9fca-e9f47ffa8589",
        "system-design-primer_README.md",
        "embedding_in_progress",
        "640/1016",
    ],
    ["f93e7dab-d992-5505-9328-3786e26a0d5b", "[bold]odd[/bold].pdf", "complete", "3/3"],
]


def render(width: int) -> list[str]:
    output = io.StringIO()
    console = Console(file=output, width=width, color_system=None)
    print_rows(console, COLUMNS, ROWS)
    return output.getvalue().splitlines()


def test_wide_terminal_gets_table() -> None:
    lines = render(120)

    header = next(line for line in lines if "job" in line)
    assert all(column.name in header for column in COLUMNS)
    for row in ROWS:
        line = next(line for line in lines if row[0] in line)
        # Every field of a row stays whole on the row's line.
        assert all(cell in line for cell in row)


def test_narrow_terminal_gets_one_field_per_line() -> None:
    lines = render(80)

    assert all(len(line) <= 80 for line in lines)
    assert lines[0] == ROWS[0][0]
    assert "  file      system-design-primer_README.md" in lines
    assert "  status    embedding_in_progress" in lines
    assert "  embedded  640/1016" in lines
    assert ROWS[1][0] in lines
    # Markup in a value is printed as it is, not read.
    assert "  file      [bold]odd[/bold].pdf" in lines


def test_table_while_it_fits() -> None:
    # Cells of 36, 8, 8 and 8 characters, plus 3 per column and 1 border.
    short = [[ROWS[1][0], "notes.md", "complete", "3/3"]]
    for width, table in ((73, True), (72, False)):
        output = io.StringIO()
        console = Console(file=output, width=width, color_system=None)

        print_rows(console, COLUMNS, short)

        lines = output.getvalue().splitlines()
        row_lines = [line for line in lines if short[0][0] in line]
        assert ("notes.md" in row_lines[0]) is table, width
