"""``normkit env``: a block to paste into an issue."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    check: Annotated[bool, typer.Option(help="Run each backend once per device and dtype.")] = True,
) -> None:
    """Versions, threads, devices, which backends work here, and where the data sets are."""
    from rich.console import Console
    from rich.table import Table

    from normkit.lab.environment import collect

    info = collect(check=check)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title="normkit environment", show_header=False)
    for key, value in info.items():
        if key in ("backend_check", "fashion_mnist", "fashion_mnist_searched"):
            continue
        table.add_row(key, "-" if value is None else str(value))
    fashion = info["fashion_mnist"] or (
        "not found (looked in " + ", ".join(info["fashion_mnist_searched"]) + "; install "
        "Debian's dataset-fashion-mnist or set NORMKIT_DATA)"
    )
    table.add_row("fashion_mnist", fashion)
    for device_dtype, row in info.get("backend_check", {}).items():
        table.add_row(f"backends {device_dtype}", ", ".join(f"{k}: {v}" for k, v in row.items()))
    Console().print(table)
