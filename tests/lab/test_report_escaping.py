"""report.md and report.html show what the user typed (settings, paths, names) as text: no HTML
runs and no Markdown formatting applies, checked by rendering report.md with a CommonMark parser."""

import html

from markdown_it import MarkdownIt

from normkit.lab import run_experiment
from normkit.lab.render import Section, Table, html_blocks, literal, markdown, markdown_table

HOSTILE = "<img src=x onerror=alert(1)>/*bold*/_a_|b&amp;[l](u)`c`\\"


def rendered(markdown_text: str) -> str:
    """What a Markdown viewer shows: CommonMark with GitHub's tables, raw HTML allowed."""
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown_text)


def test_literal_text_renders_as_written_in_markdown_and_html():
    table = Table(["setting", "value"], [["runs", literal(HOSTILE)]])
    cell = f"<td>{html.escape(HOSTILE, quote=False)}</td>"
    assert cell in rendered(markdown_table(table))
    assert cell in html_blocks([Section("Settings", [table])], 2)[1]
    paragraph = f"Data from {literal(HOSTILE)}."
    expected = f"<p>Data from {html.escape(HOSTILE, quote=False)}.</p>"
    assert expected in rendered("\n".join(markdown([Section("Data", [paragraph])], 2, "figures")))
    assert expected in html_blocks([Section("Data", [paragraph])], 2)[1]


def test_raw_html_in_text_the_report_did_not_escape_stays_text_in_markdown():
    """Text written by an experiment (a trial name, a note) keeps its Markdown, never its HTML."""
    lines = markdown([Section("S", ["**bold** <script>x</script> `<b>code</b>`"])], 2, "figures")
    shown = rendered("\n".join(lines))
    assert "<strong>bold</strong>" in shown and "<script>" not in shown
    assert "&lt;script&gt;x&lt;/script&gt;" in shown and "<code>&lt;b&gt;code&lt;/b&gt;</code>" in shown


def test_a_run_report_escapes_its_settings(tmp_path):
    """The guideline experiment trains nothing and takes a free-text setting (a path)."""
    record = run_experiment("guideline", "tiny", {"runs": HOSTILE}, out=tmp_path / "g")
    report_md = (record.directory / "report.md").read_text(encoding="utf-8")
    shown = rendered(report_md)
    assert "<img" not in shown  # anywhere, the experiment's own text included
    assert f"<td>runs</td>\n<td>{html.escape(HOSTILE, quote=False)}</td>" in shown
    page = (record.directory / "report.html").read_text(encoding="utf-8")
    assert "<img src=x" not in page
    assert f"<td>runs</td><td>{html.escape(HOSTILE, quote=False)}</td>" in page
