"""docs/reproductions.md's tables come from the runs: `normkit lab docs` rewrites only the marked
blocks, from summary.json, and --check fails when the page and the runs disagree."""

import pytest
from typer.testing import CliRunner

from normkit.cli.main import app
from normkit.errors import ConfigError
from normkit.lab import run_experiment
from normkit.lab.claims import card_row
from normkit.lab.docs_tables import regenerate, regenerate_file

PAGE = """# Reproductions

Hand-written prose that stays as it is.

<!-- normkit-lab: claims placement -->
an old table
<!-- /normkit-lab -->

More prose, *untouched*.

<!-- normkit-lab: claims renorm -->
renorm's table, whose run is not given
<!-- /normkit-lab -->

<!-- normkit-lab: scoreboard -->
<!-- /normkit-lab -->
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_experiment("placement", "tiny", {"dataset": "digits"},
                          out=tmp_path_factory.mktemp("docs") / "placement", write_report=False)  # fmt: skip


def test_only_the_marked_tables_change_and_they_hold_the_summaries_numbers(run):
    page, notes = regenerate(PAGE, [run])
    for prose in ("Hand-written prose that stays as it is.", "More prose, *untouched*.",
                  "renorm's table, whose run is not given"):  # fmt: skip
        assert prose in page
    assert "an old table" not in page and notes == ["no run of renorm given: its table is left as it was"]
    for entry in run.summary["claims"]:
        cells = [cell.replace("|", "\\|") for cell in card_row(entry)]
        assert "| " + " | ".join(cells) + " |" in page
    assert f"`{run.directory}` (preset `tiny`, 2 seeds" in page
    assert regenerate(page, [run])[0] == page  # idempotent


def test_the_command_writes_the_page_and_check_catches_drift(run, tmp_path):
    path = tmp_path / "reproductions.md"
    path.write_text(PAGE)
    cli = CliRunner()
    result = cli.invoke(app, ["lab", "docs", str(path), str(run.directory), "--check"])
    assert result.exit_code == 1 and "differs from the runs" in result.output
    assert path.read_text() == PAGE  # --check writes nothing
    assert cli.invoke(app, ["lab", "docs", str(path), str(run.directory)]).exit_code == 0
    assert cli.invoke(app, ["lab", "docs", str(path), str(run.directory), "--check"]).exit_code == 0
    path.write_text(path.read_text().replace(card_row(run.summary["claims"][0])[2], "0.999"))
    assert regenerate_file(path, [run.directory], check=True)[0]  # a hand-edited number is caught


def test_pages_without_markers_and_unfinished_runs_are_refused(run, tmp_path):
    plain = tmp_path / "plain.md"
    plain.write_text("no markers here\n")
    with pytest.raises(ConfigError, match="no <!-- normkit-lab"):
        regenerate_file(plain, [run.directory])
    with pytest.raises(ConfigError, match="two runs of placement"):
        regenerate(PAGE, [run, run])
