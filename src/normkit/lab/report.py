"""Reports: ``report.md`` and a self-contained ``report.html`` for one run or several.

An experiment describes its report as a :class:`Report` (text, tables, matplotlib figures, the
comparison with the published numbers, checks, deviations); this module adds what every report has
(data, the command that reproduces the run, the environment, timing) and renders it twice: Markdown
with the figures as PNG files beside it, and HTML with the figures embedded as base64 PNGs, inline
CSS and no external resources, so the one file can be mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normkit.lab.records import RunRecord

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
class Check:
    """A pass/fail criterion of the protocol, with the numbers behind the verdict."""

    name: str
    passed: bool | None  # None: could not be evaluated (e.g. a trial diverged)
    detail: str


@dataclass
class Section:
    heading: str
    blocks: list[str | Table | Figure] = field(default_factory=list)


@dataclass
class Report:
    """What an experiment says about one run."""

    comparison: Table  # quantity | published | ours | verdict
    sections: list[Section] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    deviations: list[str] = field(default_factory=list)
    headline: str = ""  # one sentence for the overview of a combined report


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


# --------------------------------------------------------------------------------------- building


def _standard_sections(record: RunRecord, report: Report) -> list[Section]:
    config = record.config
    data = config["data"]
    sections = []
    data_blocks: list[str | Table | Figure] = [
        f"{data['name']} from `{data['source']}`: {data['train']} training, "
        f"{data.get('validation', 0)} validation and {data['test']} test examples of shape "
        f"{tuple(data['sample_shape'])}."
    ]
    data_blocks += [f"**Note:** {note}" for note in data.get("notes", [])]
    sections.append(Section("Data", data_blocks))
    if report.deviations:
        sections.append(
            Section(
                "Deviations from the paper's protocol",
                ["\n".join(f"- {d}" for d in report.deviations)],
            )
        )
    # settings as the user typed them: 1e-4 stays 1e-4 (not "0.000"), 0.1 stays 0.1
    settings = Table(["setting", "value"], [[k, fmt(v, "g")] for k, v in record.settings.items()])
    timing = (record.summary or {}).get("timing", {})
    run_blocks: list[str | Table | Figure] = [
        f"Reproduce with:\n\n```\n{config['command']}\n```",
        f"Preset `{config['preset']}`, created {config['created']}, {config['torch_threads']} torch "
        f"threads; training took {fmt(timing.get('total_seconds'), '.1f')} s of wall time.",
        settings,
    ]
    sections.append(Section("Reproducing this run", run_blocks))
    environment = config.get("environment", {})
    keep = (
        "normkit",
        "python",
        "platform",
        "torch",
        "numpy",
        "scikit-learn",
        "matplotlib",
        "cpu_count",
        "torch_threads",
        "cuda",
        "backend",
    )
    sections.append(
        Section(
            "Environment",
            [Table(["", ""], [[k, fmt(environment.get(k))] for k in keep if k in environment])],
        )
    )
    return sections


def _run_parts(record: RunRecord, prefix: str = "") -> tuple[str, Report, list[Section]]:
    from normkit.lab.experiment import get_experiment

    experiment = get_experiment(record.config["experiment"])
    report = experiment.report(record)
    for section in report.sections:
        for block in section.blocks:
            if isinstance(block, Figure) and prefix:
                block.name = f"{prefix}{block.name}"
    title = f"{record.config['title']} ({record.config['experiment']}, {record.config['preset']})"
    sections = [Section("Published beside ours", [report.comparison])]
    if report.checks:
        sections.append(
            Section(
                "Checks",
                [
                    Table(
                        ["check", "result", "numbers"],
                        [
                            [c.name, {True: "pass", False: "FAIL", None: "n/a"}[c.passed], c.detail]
                            for c in report.checks
                        ],
                    )
                ],
            )
        )
    sections += report.sections + _standard_sections(record, report)
    return title, report, sections


# ---------------------------------------------------------------------------------------- rendering


def _markdown_table(table: Table) -> str:
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


def _markdown(blocks_by_section: list[Section], level: int, figures_dir: str) -> list[str]:
    out = []
    for section in blocks_by_section:
        out += [f"{'#' * level} {section.heading}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                out += [_markdown_table(block), ""]
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


def _text_html(text: str) -> str:
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


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{_inline_html(str(h))}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{_inline_html(str(v))}</td>" for v in row) + "</tr>"
        for row in table.rows
    )
    caption = f"<caption>{_inline_html(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(sections: list[Section], level: int) -> list[str]:
    out = []
    for section in sections:
        out.append(f"<h{level}>{html.escape(section.heading)}</h{level}>")
        for block in section.blocks:
            if isinstance(block, Table):
                out.append(_html_table(block))
            elif isinstance(block, Figure):
                data = base64.b64encode(block.png()).decode("ascii")
                out.append(
                    f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>"
                )
            else:
                out.append(_text_html(block))
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


def _html_page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _save_figures(sections: list[Section], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                (directory / f"{block.name}.png").write_bytes(block.png())


def _intro(record: RunRecord, report: Report) -> str:
    from normkit.lab.experiment import get_experiment

    experiment = get_experiment(record.config["experiment"])
    return f"**Paper:** {experiment.paper}.\n\n**Claim:** {experiment.claim}" + (
        f"\n\n**Result:** {report.headline}" if report.headline else ""
    )


def _resummarize(record: RunRecord) -> None:
    """Recompute summary.json from the rows (keeping the recorded timing), so a report always
    reflects the current summarizing code."""
    from normkit.errors import ConfigError
    from normkit.lab.experiment import get_experiment
    from normkit.lab.runner import write_summary

    if not record.complete:
        raise ConfigError(
            f"{record.directory} has not finished; finish it with `normkit lab run "
            f"{record.config['experiment']} --out {record.directory} --resume` first"
        )
    write_summary(
        get_experiment(record.config["experiment"]), record, record.summary.get("timing", {})
    )


def write_run_report(record: RunRecord, resummarize: bool = False) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into the run's directory.

    ``resummarize``: first recompute summary.json from metrics.jsonl (``normkit lab report``).
    """
    if resummarize:
        _resummarize(record)
    title, report, sections = _run_parts(record)
    intro = _intro(record, report)
    _save_figures(sections, record.directory / "figures")
    markdown = [f"# {title}", "", intro, ""] + _markdown(sections, 2, "figures")
    md_path = record.directory / "report.md"
    md_path.write_text("\n".join(markdown), encoding="utf-8")
    page = _html_page(
        title, [f"<h1>{html.escape(title)}</h1>", _text_html(intro)] + _html(sections, 2)
    )
    html_path = record.directory / "report.html"
    html_path.write_text(page, encoding="utf-8")
    _close_figures(sections)
    return md_path, html_path


def write_combined_report(directories: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """One report over several runs (an overview table, then each run's report) in ``out``."""
    out = Path(out)
    records = [RunRecord.load(d) for d in directories]
    for record in records:
        _resummarize(record)
    out.mkdir(parents=True, exist_ok=True)
    overview = Table(["run", "experiment", "preset", "data", "result"], [])
    markdown, body, all_sections = [], [], []
    for index, record in enumerate(records, start=1):
        title, report, sections = _run_parts(record, prefix=f"run{index}-")
        all_sections += sections
        overview.rows.append(
            [
                str(record.directory),
                record.config["experiment"],
                record.config["preset"],
                record.config["data"]["name"],
                report.headline,
            ]
        )
        intro = _intro(record, report)
        markdown += [f"## {index}. {title}", "", intro, ""] + _markdown(sections, 3, "figures")
        body += [f"<h2>{index}. {html.escape(title)}</h2>", _text_html(intro)] + _html(sections, 3)
    title = f"normkit lab: {len(records)} runs"
    _save_figures(all_sections, out / "figures")
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(
        "\n".join([f"# {title}", "", _markdown_table(overview), ""] + markdown), encoding="utf-8"
    )
    html_path.write_text(
        _html_page(title, [f"<h1>{html.escape(title)}</h1>", _html_table(overview)] + body),
        encoding="utf-8",
    )
    _close_figures(all_sections)
    return md_path, html_path


def _close_figures(sections: list[Section]) -> None:
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                block.figure.clear()
