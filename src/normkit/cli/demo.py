"""``normkit demo``: batch normalization's headline effect, measured in seconds on real data."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def demo(
    steps: Annotated[int, typer.Option(help="SGD steps per run.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed for data split, weights and batches.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Train a sigmoid MLP with and without BatchNorm on scikit-learn's digits and compare.

    Ioffe & Szegedy (2015), Fig. 1 in miniature: same data, weights and batches; four learning rates;
    test accuracy in eval mode (BN uses its running statistics).
    """
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from normkit.lab.digits_demo import DemoConfig, run_demo, summarize

    config = DemoConfig(steps=steps, seed=seed, eval_every=max(1, min(250, steps // 4)))
    total = steps * 2 * len(config.learning_rates)
    with Progress(transient=True, disable=as_json) as progress:
        task = progress.add_task("training 8 networks", total=total)
        results = run_demo(config, on_step=lambda: progress.advance(task))
    summary = summarize(results, config)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    target = f"steps to {config.target_accuracy:.0%}"
    table = Table(title="Sigmoid MLP on 8x8 digits: plain vs BatchNorm (test accuracy, eval mode)")
    for column in (
        "network",
        "learning rate",
        f"after {config.eval_every} steps",
        "final",
        target,
        "time",
    ):
        table.add_column(column, justify="right")
    for run in results:
        reached = run.steps_to(config.target_accuracy)
        table.add_row(
            "BatchNorm" if run.batch_norm else "plain",
            f"{run.learning_rate:g}",
            f"{run.curve[0][1]:.1%}",
            f"{run.final_accuracy:.1%}",
            "never" if reached is None else str(reached),
            f"{run.seconds:.1f} s",
        )
    console = Console()
    console.print(table)
    reach = summary["learning_rates_reaching_target"]
    console.print(
        f"Learning rates at which the network reached {config.target_accuracy:.0%} within "
        f"{steps} steps: plain {reach['plain'] or 'none'}, BatchNorm {reach['batch_norm'] or 'none'}."
    )
