"""Reports: ``report.md`` and a self-contained ``report.html`` for one run, and the scoreboard of
several runs.

An experiment describes what it says about a run as a :class:`RunReport` (the claims card first,
then figures and at most one section of its own); this module adds what every report has (data,
deviations, the command that reproduces the run, the environment, timing) and renders it with
:mod:`normkit.lab.render`. The caller passes the experiment object, so this module never looks
experiments up (the catalog sits above it).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from normkit.lab.claims import CARD_HEADERS, card_row, roll_up
from normkit.lab.records import RunRecord
from normkit.lab.render import (
    Figure,
    Section,
    Table,
    close_figures,
    code_block,
    fmt,
    html_blocks,
    html_page,
    html_table,
    literal,
    markdown,
    markdown_table,
    new_figure,
    no_raw_html,
    save_figures,
    text_html,
)

__all__ = ["Figure", "RunReport", "Section", "Table", "fmt", "literal", "new_figure"]


@dataclass
class RunReport:
    """What an experiment says about one run: a one-line headline, its sections (the claims card
    first), and the deviations from the paper's protocol."""

    headline: str
    sections: list[Section]
    deviations: list[str] = field(default_factory=list)


def claims_card(entries: list[dict], caption: str = "") -> Table:
    """claim | published (source) | ours (mean [95% CI], seeds) | verdict, one row per claim."""
    return Table(CARD_HEADERS, [card_row(e) for e in entries], caption)


def ran_settings(record: RunRecord) -> dict[str, str]:
    """Each setting as it ran, as the user typed it (1e-4 stays 1e-4, not "0.000"); a setting that
    a sweep replaced shows the picked value(s) (per group) and says the setting's own went unused."""
    picks: dict[str, list[str]] = {}
    for sweep in (record.summary or {}).get("sweeps", []):
        group = ", ".join(f"{k} {v}" for k, v in sweep["group"].items())
        picks.setdefault(sweep["setting"], []).append(
            fmt(sweep["value"], "g") + (f" ({group})" if group else ""))  # fmt: skip
    ran = {key: fmt(value, "g") for key, value in record.settings.items()}
    for key, values in picks.items():
        unused = f" (the setting's {ran[key]} was not used)" if key in ran else ""
        ran[key] = f"{'; '.join(values)}: picked by the sweep{unused}"
    return ran


def _standard_sections(record: RunRecord, report: RunReport) -> list[Section]:
    config = record.config
    data = config["data"]
    sections = []
    # what the user chose (settings, paths, names) goes in through literal(): shown as written
    data_blocks: list[str | Table | Figure] = [
        f"{literal(data['name'])} from {literal(data['source'])}: {data['train']} training, "
        f"{data.get('validation', 0)} validation and {data['test']} test examples of shape "
        f"{tuple(data['sample_shape'])}."
    ]
    data_blocks += [f"**Note:** {literal(note)}" for note in data.get("notes", [])]
    sections.append(Section("Data", data_blocks))
    if report.deviations:
        sections.append(
            Section(
                "Deviations from the paper's protocol",
                ["\n".join(f"- {d}" for d in report.deviations)],
            )
        )
    ran = ran_settings(record)
    settings = Table(["setting", "value"], [[literal(k), literal(v)] for k, v in ran.items()],
                     "The values that ran: a setting a sweep replaced shows the sweep's picks.")  # fmt: skip
    timing = (record.summary or {}).get("timing", {})
    execution = config.get("execution", {})
    how = f"{config['torch_threads']} torch threads"
    if execution:
        how = (
            f"{execution['threads']} torch thread(s) per worker, {execution['workers']} worker(s)"
            f" ({execution['executor']}), device {execution['device']}"
        )
    run_blocks: list[str | Table | Figure] = [
        "Reproduce with:",
        code_block(config["command"]),
        f"Preset {literal(config['preset'])}, created {config['created']}, {how}; training took "
        f"{fmt(timing.get('total_seconds'), '.1f')} s of wall time (summed over trials).",
        settings,
    ]
    sections.append(Section("Reproducing this run", run_blocks))
    environment = config.get("environment", {})
    keep = ("normkit", "python", "platform", "torch", "numpy", "scikit-learn", "matplotlib",
            "cpu_count", "torch_threads", "cuda", "backend")  # fmt: skip
    sections.append(
        Section(
            "Environment",
            [Table(["", ""], [[k, literal(fmt(environment.get(k)))] for k in keep if k in environment])],
        )
    )
    return sections


def _title(record: RunRecord) -> str:
    config = record.config
    return f"{config['title']} ({config['experiment']}, {config['preset']})"


def _intro(record: RunRecord, experiment, report: RunReport) -> str:
    return f"**Paper:** {experiment.paper}.\n\n**Claim:** {experiment.claim}" + (
        f"\n\n**Result:** {report.headline}" if report.headline else ""
    )


def _parts(record: RunRecord, experiment, prefix: str = "") -> tuple[str, str, list[Section]]:
    report = experiment.run_report(record)
    for section in report.sections:
        for block in section.blocks:
            if isinstance(block, Figure) and prefix:
                block.name = f"{prefix}{block.name}"
    sections = report.sections + _standard_sections(record, report)
    return _title(record), _intro(record, experiment, report), sections


def write_run_report(record: RunRecord, experiment) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into the run's folder."""
    title, intro, sections = _parts(record, experiment)
    save_figures(sections, record.directory / "figures")
    md_path = record.directory / "report.md"
    md_path.write_text("\n".join([f"# {no_raw_html(title)}", "", no_raw_html(intro), ""]
                                  + markdown(sections, 2, "figures")),
                       encoding="utf-8")  # fmt: skip
    page = html_page(
        title, [f"<h1>{html.escape(title)}</h1>", text_html(intro)] + html_blocks(sections, 2)
    )
    html_path = record.directory / "report.html"
    html_path.write_text(page, encoding="utf-8")
    close_figures(sections)
    return md_path, html_path


def scoreboard(records: list[RunRecord]) -> tuple[Table, Table]:
    """Every claim of every run (run | claim | published | ours | verdict), and each run's roll-up."""
    claims = Table(["run", *CARD_HEADERS], [], "Every claim of every run, from its summary.json.")
    runs = Table(["run", "experiment", "preset", "data", "verdict", "claims"], [])
    for record in records:
        entries = (record.summary or {}).get("claims", [])
        name = literal(f"{record.config['experiment']} ({record.config['preset']})")
        claims.rows += [[name, *card_row(e)] for e in entries]
        verdicts = [e["verdict"] for e in entries]
        counts = {v: verdicts.count(v) for v in dict.fromkeys(v for v in verdicts if v)}
        runs.rows.append([
            literal(record.directory), literal(record.config["experiment"]),
            literal(record.config["preset"]), literal(record.config["data"]["name"]),
            (record.summary or {}).get("verdict") or roll_up(verdicts) or "–",
            ", ".join(f"{n} {v}" for v, n in counts.items()) or "–",
        ])  # fmt: skip
    return runs, claims


def write_combined_report(records: list[RunRecord], experiments: list, out: Path) -> tuple[Path, Path]:
    """One report over several runs: the scoreboard, then each run's report, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    runs, claims = scoreboard(records)
    markdown_lines, body, all_sections = [], [], []
    for index, (record, experiment) in enumerate(zip(records, experiments, strict=True), start=1):
        title, intro, sections = _parts(record, experiment, prefix=f"run{index}-")
        all_sections += sections
        markdown_lines += [f"## {index}. {no_raw_html(title)}", "", no_raw_html(intro), ""]
        markdown_lines += markdown(sections, 3, "figures")
        body += [f"<h2>{index}. {html.escape(title)}</h2>", text_html(intro)] + html_blocks(sections, 3)
    title = f"normkit lab: {len(records)} runs"
    save_figures(all_sections, out / "figures")
    md_path, html_path = out / "report.md", out / "report.html"
    head = [f"# {title}", "", "## Scoreboard", "", markdown_table(runs), "", markdown_table(claims), ""]
    md_path.write_text("\n".join(head + markdown_lines), encoding="utf-8")
    html_path.write_text(
        html_page(title, [f"<h1>{html.escape(title)}</h1>", "<h2>Scoreboard</h2>", html_table(runs),
                          html_table(claims)] + body),  # fmt: skip
        encoding="utf-8",
    )
    close_figures(all_sections)
    return md_path, html_path
