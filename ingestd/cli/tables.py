"""Tables of the list commands, with a layout for terminals too narrow for them."""

from __future__ import annotations

from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

# The narrowest a folding column (a file name) may become in a table. Below
# it the rows are printed one field per line instead.
MIN_FOLD_WIDTH = 16


@dataclass(frozen=True)
class Column:
    """One column: its header and how its cells behave when space is short."""

    name: str
    # A folding column breaks long values over lines. The others never
    # wrap, because ids and statuses are copied into other commands.
    fold: bool = False
    right_aligned: bool = False


def print_rows(console: Console, columns: list[Column], rows: list[list[str]]) -> None:
    """Print rows as a table, or one field per line if the table cannot fit.

    Cells are printed as plain text: rich markup in them is not read. The
    first column is the row's id, and in the narrow layout it heads each
    row's block.
    """
    if _table_width(columns, rows) <= console.width:
        table = Table()
        for column in columns:
            table.add_column(
                column.name,
                no_wrap=not column.fold,
                overflow="fold",
                justify="right" if column.right_aligned else "left",
            )
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
        return
    label_width = max(cell_len(column.name) for column in columns[1:])
    for number, row in enumerate(rows):
        if number:
            console.print()
        console.print(row[0], markup=False, highlight=False, soft_wrap=True)
        for column, cell in zip(columns[1:], row[1:], strict=True):
            console.print(
                f"  {column.name.ljust(label_width)}  {cell}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )


def _table_width(columns: list[Column], rows: list[list[str]]) -> int:
    """Return the width the table needs, with folding columns at their narrowest."""
    total = 1
    for index, column in enumerate(columns):
        natural = max([cell_len(column.name)] + [cell_len(row[index]) for row in rows])
        # Each column has one space of padding on each side and a border.
        total += (min(natural, MIN_FOLD_WIDTH) if column.fold else natural) + 3
    return total
