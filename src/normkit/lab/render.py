"""The building blocks of reports and how they render: Markdown with PNG figures beside it, and a
self-contained HTML page (figures embedded as base64 PNGs, inline CSS, no external resources), so
one file can be mailed or attached to an issue.

Everything a report says passes through here; text from settings and trial names is escaped for
HTML, and table cells for Markdown.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIGURE_DPI = 110


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    """A matplotlib figure (``matplotlib.figure.Figure``, no pyplot state) and its caption."""

    name: str  # file stem: letters, digits, '-' and '_'
    figure: Any
    caption: str = ""
    _png: bytes | None = None

    def png(self) -> bytes:
        if self._png is None:
            buffer = io.BytesIO()
            self.figure.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
            self._png = buffer.getvalue()
        return self._png


@dataclass
class Section:
    heading: str
    blocks: list[str | Table | Figure] = field(default_factory=list)


def fmt(value, spec: str = ".3f", none: str = "–") -> str:
    """A number for a table: ``none`` for None/NaN, ints as they are."""
    if value is None or (isinstance(value, float) and value != value):
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def new_figure(width: float = 6.4, height: float = 4.0):
    """A matplotlib Figure that does not touch pyplot's global state (safe headless, in threads)."""
    from matplotlib.figure import Figure as MatplotlibFigure

    return MatplotlibFigure(figsize=(width, height), layout="constrained")


def markdown_table(table: Table) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in table.headers) + " |",
        "|" + "|".join("---" for _ in table.headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.rows]
    if table.caption:
        lines = [f"*{table.caption}*", ""] + lines
    return "\n".join(lines)


def markdown(blocks_by_section: list[Section], level: int, figures_dir: str) -> list[str]:
    out = []
    for section in blocks_by_section:
        out += [f"{'#' * level} {section.heading}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                out += [markdown_table(block), ""]
            elif isinstance(block, Figure):
                out += [
                    f"![{block.caption}]({figures_dir}/{block.name}.png)",
                    "",
                    f"*{block.caption}*",
                    "",
                ]
            else:
                out += [block, ""]
    return out


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![*\w])\*([^*\n]+)\*(?!\w)"), r"<em>\1</em>"),
]


def _inline_html(text: str) -> str:
    text = html.escape(text, quote=False)
    for pattern, replacement in _INLINE:
        text = pattern.sub(replacement, text)
    return text


def text_html(text: str) -> str:
    """The small Markdown the reports use: paragraphs, ``-`` lists, fenced code, inline code/bold."""
    parts = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        if chunk.startswith("```"):
            body = chunk.strip("`").strip("\n")
            parts.append(f"<pre>{html.escape(body)}</pre>")
        elif all(line.startswith("- ") for line in chunk.splitlines()):
            items = "".join(f"<li>{_inline_html(line[2:])}</li>" for line in chunk.splitlines())
            parts.append(f"<ul>{items}</ul>")
        else:
            parts.append(f"<p>{_inline_html(chunk)}</p>")
    return "\n".join(parts)


def html_table(table: Table) -> str:
    head = "".join(f"<th>{_inline_html(str(h))}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{_inline_html(str(v))}</td>" for v in row) + "</tr>"
        for row in table.rows
    )
    caption = f"<caption>{_inline_html(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_blocks(sections: list[Section], level: int) -> list[str]:
    out = []
    for section in sections:
        out.append(f"<h{level}>{html.escape(section.heading)}</h{level}>")
        for block in section.blocks:
            if isinstance(block, Table):
                out.append(html_table(block))
            elif isinstance(block, Figure):
                data = base64.b64encode(block.png()).decode("ascii")
                out.append(
                    f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>"
                )
            else:
                out.append(text_html(block))
    return out


_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #1a1a1a; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } caption { caption-side: top; text-align: left; font-style: italic; }
figure { margin: 1rem 0; } img { max-width: 100%; } figcaption { font-size: 0.9rem; color: #444; }
code, pre { background: #f6f6f6; font-family: ui-monospace, monospace; }
pre { padding: 0.6rem; overflow-x: auto; white-space: pre-wrap; }
"""


def html_page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def save_figures(sections: list[Section], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                (directory / f"{block.name}.png").write_bytes(block.png())


def close_figures(sections: list[Section]) -> None:
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                block.figure.clear()
