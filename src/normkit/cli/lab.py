"""``normkit lab``: list the experiments, run one, and build reports from finished runs."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="lab",
    help="Experiments that reproduce the literature's claims about normalization, with reports.",
    no_args_is_help=True,
)


@app.command("list")
def list_experiments() -> None:
    """The experiments, their presets and the claim each one measures."""
    from rich.console import Console
    from rich.table import Table

    from normkit.lab import experiment_names, get_experiment

    table = Table(title="normkit lab experiments")
    for column in ("name", "presets", "paper", "claim"):
        table.add_column(column, overflow="fold")
    for name in experiment_names():
        experiment = get_experiment(name)
        table.add_row(
            name, ", ".join(experiment.preset_names()), experiment.paper, experiment.claim
        )
    Console().print(table)


def _parse_overrides(pairs: list[str]) -> dict:
    from normkit.errors import ConfigError

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: write KEY=VALUE, e.g. --set steps=1000")
        overrides[key.strip().replace("-", "_")] = value.strip()
    return overrides


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="Experiment name (see `normkit lab list`).")],
    quick: Annotated[
        bool, typer.Option("--quick", help="The quick preset: about a minute on 2 cores.")
    ] = False,
    preset: Annotated[str | None, typer.Option(help="A preset by name (full, quick, ...).")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="auto, fashion-mnist, digits, mnist1d or cifar10.")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where the data files are (else NORMKIT_DATA, then system paths)."),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per trial.")] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed of the run.")] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Change a setting: --set KEY=VALUE (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/NAME[-PRESET]).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with ETA.")] = True,
) -> None:
    """Run an experiment: config.json, metrics.jsonl, summary.json, figures and report.md/html.

    Seeded and deterministic on the CPU; checkpoints atomically, and --resume continues a run that
    was interrupted (even by SIGKILL) to the same results.
    """
    from normkit.errors import ConfigError
    from normkit.lab import run_experiment

    if quick and preset not in (None, "quick"):
        raise ConfigError(f"--quick and --preset {preset} contradict each other; give one")
    overrides = _parse_overrides(settings or [])
    for key, value in (("dataset", dataset), ("steps", steps), ("seed", seed)):
        if value is not None:
            overrides[key] = str(value)
    record = run_experiment(
        name,
        "quick" if quick else preset,
        overrides,
        out=out,
        data_dir=data_dir,
        resume=resume,
        overwrite=overwrite,
        progress=progress and sys.stderr.isatty(),
        command=shlex.join(["normkit", *sys.argv[1:]]) if sys.argv[1:2] == ["lab"] else None,
        echo=lambda message: typer.echo(message, err=True),
    )
    headline = record.summary and _headline(record)
    if headline:
        typer.echo(headline)
    typer.echo(f"report: {record.directory / 'report.html'} (and report.md)")


def _headline(record) -> str:
    from normkit.lab.experiment import get_experiment

    try:
        return get_experiment(record.config["experiment"]).report(record).headline
    except Exception:  # a report problem must not hide where the run is
        return ""


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Where a report over several runs goes (default runs/report)."),
    ] = None,
) -> None:
    """Rebuild the report of one run in its directory, or combine several runs into one report."""
    from normkit.lab import RunRecord, write_combined_report, write_run_report

    if len(runs) == 1 and out is None:
        md, html = write_run_report(RunRecord.load(runs[0]), resummarize=True)
    else:
        md, html = write_combined_report(runs, out or Path("runs") / "report")
    typer.echo(f"report: {html} (and {md.name})")
