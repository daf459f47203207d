"""``normkit``: the command-line entry point. Assembles the commands; holds no logic of its own."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from normkit.cli.bench import bench
from normkit.cli.demo import demo
from normkit.cli.doctor import doctor
from normkit.cli.env import env
from normkit.cli.fold import fold
from normkit.cli.lab import app as lab_app

app = typer.Typer(
    name="normkit",
    help="Batch normalization and its family for PyTorch: layers, tools, benchmarks and a lab.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"normkit {version('normkit')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True,
                     help="Print normkit's version and exit."),  # fmt: skip
    ] = False,
) -> None:
    pass


app.command()(env)
app.command()(demo)
app.command()(bench)
app.command()(doctor)
app.command()(fold)
app.add_typer(lab_app, name="lab")


def main() -> None:
    """Run the app; known errors become one line and a hint (NORMKIT_DEBUG=1 shows the traceback)."""
    from normkit.errors import NormkitError

    try:
        app()
    except (NormkitError, FileNotFoundError) as error:
        if os.environ.get("NORMKIT_DEBUG"):
            raise
        typer.secho(f"error: {error}", err=True, fg="red")
        typer.echo("(set NORMKIT_DEBUG=1 for the full traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
