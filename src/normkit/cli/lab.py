"""``normkit lab``: list and show the experiments, run one, report on runs, regenerate the docs."""

from __future__ import annotations

import json
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="lab",
    help="Experiments that reproduce the literature's claims about normalization, with reports.",
    no_args_is_help=True,
)


@app.callback()
def _needs_the_lab_extra() -> None:
    """Say which extra to install, in one line, before any work (no traceback)."""
    from normkit.cli.extras import require_lab_extra

    require_lab_extra("normkit lab")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _citation(paper: str) -> str:
    """``Ioffe & Szegedy 2015``-style authors and year of a paper string (first one if several)."""
    import re

    match = re.search(r"\b(19|20)\d\d\b", paper)
    authors = paper[: match.start()].strip(" ,(") if match else paper.split(",")[0]
    if "(" in authors:
        authors = authors.split("(")[-1]
    if "," in authors or len(authors) > 16:
        authors = re.split(r"[ ,&]", authors.strip())[0] + " et al."
    return f"{authors} {match.group(0)}" if match else _short(authors, 20)


def _describe(experiment) -> dict:
    from dataclasses import asdict

    settings = experiment.settings("full")
    claims = experiment.claims(settings)
    return {
        "name": experiment.name,
        "title": experiment.title,
        "paper": experiment.paper,
        "claim": " ".join(experiment.claim.split()),
        "presets": experiment.preset_names(),
        "protocol": textwrap.dedent(sys.modules[type(experiment).__module__].__doc__ or "").strip(),
        "claims": [
            {"name": c.name, "quantity": c.quantity, "published": asdict(c.published),
             "criterion": None if c.criterion is None else f"ours {c.criterion.text}",
             "ours": c.ours.text, "needs_gpu": c.needs_gpu}
            for c in claims
        ],  # fmt: skip
        "settings": {
            key: {"default": value, **{p: experiment.presets[p][key] for p in experiment.presets
                                       if key in experiment.presets[p]}}
            for key, value in asdict(settings).items()
        },  # fmt: skip
    }


@app.command("list")
def list_experiments(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """One line per experiment: name, paper, the claim it measures (80 columns)."""
    from normkit.lab import experiment_names, get_experiment

    experiments = [get_experiment(name) for name in experiment_names()]
    if as_json:
        rows = [{k: v for k, v in _describe(e).items() if k not in ("protocol", "settings")}
                for e in experiments]  # fmt: skip
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    width = max(len(e.name) for e in experiments)
    for e in experiments:
        line = f"{e.name:<{width}} {_citation(e.paper):<21} {' '.join(e.claim.split())}"
        typer.echo(_short(line, 80))


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Experiment name (see `normkit lab list`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The protocol, the claims with their published values and sources, the settings and presets."""
    from normkit.lab import get_experiment

    info = _describe(get_experiment(name))
    if as_json:
        typer.echo(json.dumps(info, indent=2, ensure_ascii=False, default=str))
        return
    out = [f"{info['name']}: {info['title']}", f"Paper: {info['paper']}", "", info["protocol"], "",
           "Claims:"]  # fmt: skip
    for c in info["claims"]:
        p = c["published"]
        out.append(f"  - {c['quantity']}: {c['criterion'] or 'measured, no criterion'}")
        flag = " [unverified]" if p["unverified"] else ""
        out.append(f"    published: {p['text']} ({p['source']}){flag}")
        if c["needs_gpu"]:
            out.append(f"    needs GPU scale: {c['needs_gpu']}")
    presets = [p for p in info["presets"] if p != "full"]
    out += ["", "Settings (full" + "".join(f" | {p}" for p in presets) + "):"]
    for key, values in info["settings"].items():
        cells = [repr(values["default"])] + [repr(values[p]) if p in values else "·" for p in presets]
        out.append(f"  {key} = " + " | ".join(cells))
    typer.echo("\n".join(out))


def _parse_overrides(pairs: list[str]) -> dict:
    from normkit.errors import ConfigError

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: write KEY=VALUE, e.g. --set steps=1000")
        overrides[key.strip().replace("-", "_")] = value.strip()
    return overrides


def _option(help: str, *names: str):
    return typer.Option(*names, help=help)


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="Experiment name (see `normkit lab list`).")],
    quick: Annotated[bool, _option("The quick preset: a minute or two.", "--quick")] = False,
    preset: Annotated[str | None, _option("A preset by name (full, quick, tiny, gpu...).")] = None,
    dataset: Annotated[str | None, _option("auto, fashion-mnist, digits, mnist1d or cifar10.")] = None,
    data_dir: Annotated[
        Path | None, _option("Where the data files are (else NORMKIT_DATA, then system paths).")
    ] = None,
    steps: Annotated[int | None, _option("Training steps per trial.")] = None,
    seed: Annotated[int | None, _option("Base seed of the run.")] = None,
    settings: Annotated[
        list[str] | None, _option("Change a setting: --set KEY=VALUE (repeatable).", "--set")
    ] = None,
    out: Annotated[Path | None, _option("Run folder (default runs/NAME[-PRESET]).")] = None,
    resume: Annotated[bool, _option("Continue the interrupted run in --out.")] = False,
    overwrite: Annotated[bool, _option("Replace the normkit run in --out (only its files).")] = False,
    workers: Annotated[int, _option("Trials trained at once, in worker processes.")] = 1,
    scheduler: Annotated[
        str | None, _option("Send the trials to this Dask scheduler (tcp://HOST:PORT).")
    ] = None,
    device: Annotated[
        str | None, _option("cpu, cuda or auto (default: as recorded, else cpu).")
    ] = None,
    threads: Annotated[
        int | None, _option("Torch threads per worker (default: free cores ÷ workers).")
    ] = None,
    amp: Annotated[bool, _option("bfloat16 autocast in the training step (CUDA only).")] = False,
    dry_run: Annotated[
        bool, _option("Print the trial plan and its estimated cost; train nothing.", "--dry-run")
    ] = False,
    progress: Annotated[
        bool, _option("Show progress (a live display on a terminal, else lines).")
    ] = True,
) -> None:
    """Run an experiment: config.json, metrics.jsonl, summary.json with its claims, figures and
    report.md/html.

    Seeded and deterministic for a given torch build, device and threads per worker, whatever
    --workers or --scheduler; checkpoints atomically, and --resume continues a run that was
    interrupted (even by SIGKILL) to the same results.
    """
    from normkit.errors import ConfigError
    from normkit.lab import dry_run as plan_run
    from normkit.lab import run_experiment

    if quick and preset not in (None, "quick"):
        raise ConfigError(f"--quick and --preset {preset} contradict each other; give one")
    overrides = _parse_overrides(settings or [])
    for key, value in (("dataset", dataset), ("steps", steps), ("seed", seed)):
        if value is not None:
            overrides[key] = str(value)
    preset = "quick" if quick else preset
    if dry_run:
        _print_plan(plan_run(name, preset, overrides, data_dir=data_dir, workers=workers,
                             threads=threads, device=device))  # fmt: skip
        return
    record = run_experiment(
        name, preset, overrides, out=out, data_dir=data_dir, resume=resume, overwrite=overwrite,
        progress=("rich" if sys.stderr.isatty() else "plain") if progress else False,
        command=shlex.join(["normkit", *sys.argv[1:]]) if sys.argv[1:2] == ["lab"] else None,
        echo=lambda message: typer.echo(message, err=True), workers=workers, scheduler=scheduler,
        device=device, threads=threads, amp=amp,
    )  # fmt: skip
    typer.echo(f"report: {record.directory / 'report.html'} (and report.md)")
    _print_claims(record)


def _print_plan(plan: dict) -> None:
    trials = plan["trials"]
    typer.echo(f"{plan['experiment']} ({plan['preset']}) on {plan['data']}: {len(trials)} trials, "
               f"{plan['total_steps']} steps; device {plan['device']}, {plan['workers']} worker(s) × "
               f"{plan['threads']} thread(s)")  # fmt: skip
    for t in trials[:60]:
        typer.echo(f"  {t['key']:<48} {t['steps']:>7} steps  ~{t['estimated_s']:.0f} s")
    if len(trials) > 60:
        typer.echo(f"  ... and {len(trials) - 60} more")
    typer.echo(f"estimated cost: ~{plan['estimated_s'] / 60:.1f} min "
               f"({plan['estimated_s_one_worker'] / 60:.1f} min on one worker); {plan['note']}")  # fmt: skip


def _print_claims(record) -> None:
    """A line per judged claim, then the run's last line: how many checks held, what a failure means."""
    from normkit.lab.claims import check

    entries = [e for e in (record.summary or {}).get("claims", []) if e["verdict"] is not None]
    for entry in entries:
        c = check(entry)
        mark = {True: "reproduced", False: "not reproduced"}.get(c.passed, "inconclusive")
        if c.passed is None and entry["reason"].startswith("at "):
            mark += " " + entry["reason"].split(",")[0]  # "inconclusive at quick scale"
        typer.echo(f"  [{mark}] {c.name}: {c.detail}")
    if not entries:
        typer.echo("verdict: none (this run's quantities are measured, not judged against a criterion)")
        return
    verdicts = [e["verdict"] for e in entries]
    held, failed = verdicts.count("reproduced"), verdicts.count("not reproduced")
    typer.echo(f"verdict: {(record.summary or {}).get('verdict')}: {held} of {len(entries)} checks "
               f"held, {failed} failed, {len(entries) - held - failed} inconclusive. A failed check "
               "(not reproduced) means the 95% interval over seeds lies wholly on the wrong side of "
               "the published claim's criterion at the protocol's scale: a result, not a broken "
               "install; inconclusive names why it could not be judged here.")  # fmt: skip


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (e.g. runs/full/*).")],
    out: Annotated[
        Path | None, _option("Where a report over several runs goes (default runs/report).")
    ] = None,
) -> None:
    """Rebuild one run's report in its folder, or make the scoreboard of several runs."""
    from normkit.lab import rebuild_report, write_combined_report

    if len(runs) == 1 and out is None:
        md, html = rebuild_report(runs[0])
    else:
        md, html = write_combined_report(runs, out or Path("runs") / "report")
    typer.echo(f"report: {html} (and {md.name})")


@app.command()
def docs(
    page: Annotated[Path, typer.Argument(help="The Markdown page, e.g. docs/reproductions.md.")],
    runs: Annotated[list[Path], typer.Argument(help="The finished run folders its tables come from.")],
    check: Annotated[bool, _option("Fail if the page differs from the runs.", "--check")] = False,
) -> None:
    """Regenerate the marked tables of PAGE from the runs' summaries (prose stays as written)."""
    from normkit.lab.docs_tables import regenerate_file

    changed, notes = regenerate_file(page, runs, check=check)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    if check and changed:
        typer.echo(f"{page} differs from the runs; regenerate it with `normkit lab docs {page} ...`")
        raise typer.Exit(1)
    typer.echo(f"{page}: {'regenerated' if changed and not check else 'up to date'}")
