"""Tables of strings, printed (rich) or written (Markdown): the one writer of each for every summary."""

from __future__ import annotations

from rich.table import Table

# text columns; the rest are numbers (right-aligned)
LEFT = ("stage", "kind", "model", "group", "shape", "comparison", "verdict", "note")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def rich_table(header: list[str], rows: list[list[str]], title: str) -> Table:
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in LEFT else "right")
    for r in rows:
        table.add_row(*r)
    return table
