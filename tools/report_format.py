"""The building blocks of a report and their two renderings: self-contained HTML, and Markdown.

Images are embedded as base64 data URIs in both, so one file carries everything.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass


@dataclass(frozen=True)
class Heading:
    """A section title; level 1 is the document's title."""

    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    """Plain text (escaped on rendering)."""

    text: str


@dataclass(frozen=True)
class Table:
    """A header row and rows of cells, all text."""

    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    """A PNG with its caption."""

    caption: str
    png: bytes


Block = Heading | Paragraph | Table | Image

_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.45;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #bbb;"
    "padding:.25em .6em;text-align:left;vertical-align:top}th{background:#eee}"
    "figure{margin:1em 0}figcaption{font-size:.9em;color:#555}"
)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{e(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{e(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{e(c)}</th>" for c in block.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"
    return (
        f'<figure><img alt="{e(block.caption)}" src="{_data_uri(block.png)}">'
        f"<figcaption>{e(block.caption)}</figcaption></figure>"
    )


def to_html(blocks: list[Block]) -> str:
    """One HTML page with inline CSS and images."""
    title = next((b.text for b in blocks if isinstance(b, Heading)), "report")
    body = "\n".join(_html_block(b) for b in blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Table):
        lines = [
            "| " + " | ".join(_md_cell(c) for c in block.header) + " |",
            "|" + "---|" * len(block.header),
        ]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    return f"![{block.caption}]({_data_uri(block.png)})"


def to_markdown(blocks: list[Block]) -> str:
    """One Markdown document (GitHub-flavoured tables, images as data URIs)."""
    return "\n\n".join(_md_block(b) for b in blocks) + "\n"
