"""The building blocks of reports and how they render: Markdown with PNG figures beside it, and a
self-contained HTML page (figures embedded as base64 PNGs, inline CSS, no external resources), so
one file can be mailed or attached to an issue.

Everything a report says passes through here. Text that comes from the user (settings, paths,
names) goes in through :func:`literal`, which backslash-escapes what Markdown would read as syntax;
both renderers honour those escapes, so it shows exactly as written in report.md and report.html.
Raw HTML never passes: report.html escapes all text, and report.md writes a ``<`` that would open a
tag, or an ``&`` that would start an entity, as an entity (outside code).
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


# what Markdown could read as syntax inside a line; "_" only at a word's edge (intraword it is text)
_MARKDOWN_SYNTAX = re.compile(r"([\\`*\[\]<>&|~]|(?<!\w)_|_(?!\w))")


def literal(text) -> str:
    """``text`` as the reader should see it, whatever it holds: Markdown's syntax characters are
    backslash-escaped (CommonMark's rule; :func:`text_html` and :func:`html_table` follow it too)."""
    return _MARKDOWN_SYNTAX.sub(r"\\\1", str(text).replace("\n", " "))


_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_TAG_OR_ENTITY = re.compile(r"(?<!\\)(<(?=[A-Za-z/!?])|&(?=#?\w+;))")


def no_raw_html(text: str) -> str:
    """Markdown text with no HTML in it: ``<tag`` and ``&entity;`` become entities, code spans stay."""
    parts = []
    end = 0
    for match in _CODE_SPAN.finditer(text):
        parts.append(_TAG_OR_ENTITY.sub(lambda m: "&lt;" if m.group(0) == "<" else "&amp;",
                                        text[end : match.start()]))  # fmt: skip
        parts.append(match.group(0))
        end = match.end()
    parts.append(_TAG_OR_ENTITY.sub(lambda m: "&lt;" if m.group(0) == "<" else "&amp;", text[end:]))
    return "".join(parts)


def code_block(text: str) -> str:
    """A fenced code block whose fence is longer than any run of backticks in ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def markdown_table(table: Table) -> str:
    def cell(value) -> str:
        return no_raw_html(re.sub(r"(?<!\\)\|", r"\\|", str(value).replace("\n", " ")))

    lines = [
        "| " + " | ".join(cell(h) for h in table.headers) + " |",
        "|" + "|".join("---" for _ in table.headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.rows]
    if table.caption:
        lines = [f"*{no_raw_html(table.caption)}*", ""] + lines
    return "\n".join(lines)


def markdown(blocks_by_section: list[Section], level: int, figures_dir: str) -> list[str]:
    out = []
    for section in blocks_by_section:
        out += [f"{'#' * level} {no_raw_html(section.heading)}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                out += [markdown_table(block), ""]
            elif isinstance(block, Figure):
                caption = no_raw_html(block.caption)
                out += [f"![{caption}]({figures_dir}/{block.name}.png)", "", f"*{caption}*", ""]
            elif block.startswith("```"):
                out += [block, ""]
            else:
                out += [no_raw_html(block), ""]
    return out


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![*\w])\*([^*\n]+)\*(?!\w)"), r"<em>\1</em>"),
]


# a backslash before ASCII punctuation (CommonMark's escape), or a code span
_ESCAPE_OR_CODE = re.compile(r"\\([!-/:-@\[-`{-~])|`([^`]+)`")


def _inline_html(text: str) -> str:
    """Inline Markdown as HTML: code spans first (verbatim), then backslash escapes (the character
    itself, never syntax), then bold and italics; everything else escaped."""
    held: list[str] = []

    def hold(fragment: str) -> str:
        held.append(fragment)
        return f"\x00{len(held) - 1}\x00"

    def verbatim(match: re.Match) -> str:
        escaped, code = match.group(1), match.group(2)
        if escaped is not None:
            return hold(html.escape(escaped, quote=False))
        return hold(f"<code>{html.escape(code, quote=False)}</code>")

    text = _ESCAPE_OR_CODE.sub(verbatim, text)  # left to right, as CommonMark reads them
    text = html.escape(text, quote=False)
    for pattern, replacement in _INLINE[1:]:
        text = pattern.sub(replacement, text)
    return re.sub("\x00(\\d+)\x00", lambda m: held[int(m.group(1))], text)


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
