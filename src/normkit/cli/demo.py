"""``normkit demo``: batch normalization's headline effect, measured in seconds on real data."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer


def demo(
    steps: Annotated[int, typer.Option(help="SGD steps per run.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed for data split, weights and batches.")] = 0,
    threads: Annotated[
        int | None,
        typer.Option(help="Torch threads (default: $NORMKIT_THREADS, else the free cores)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Train a sigmoid MLP with and without BatchNorm on scikit-learn's digits and compare.

    Ioffe & Szegedy (2015), Fig. 1 in miniature: same data, weights and batches; four learning rates;
    test accuracy in eval mode (BN uses its running statistics).
    """
    from normkit.cli.extras import require_lab_extra

    require_lab_extra("normkit demo")  # before any work: one line, no traceback

    import torch
    from rich.console import Console
    from rich.table import Table

    from normkit.errors import ConfigError
    from normkit.lab.digits_demo import DemoConfig, run_demo, summarize
    from normkit.lab.executors import default_threads
    from normkit.lab.progress import TrainingProgress

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: give 1 or more")
    threads, rule = (threads, f"--threads {threads}") if threads else default_threads(1)
    config = DemoConfig(steps=steps, seed=seed, eval_every=max(1, min(250, steps // 4)))
    if not as_json:
        typer.echo(f"normkit demo: {threads} torch thread(s) ({rule}; --threads N to change)", err=True)
    runs = [(lr, bn) for lr in config.learning_rates for bn in (False, True)]
    total = steps * len(runs)
    done = 0
    mode = "off" if as_json else "rich" if sys.stderr.isatty() else "plain"
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with TrainingProgress(mode, "normkit demo") as display:

            def on_step() -> None:
                nonlocal done
                done += 1
                index, step = divmod(done - 1, steps)
                lr, bn = runs[index]
                display.plan(total, done, len(runs), (done // steps))
                display.trial(f"{'BatchNorm' if bn else 'plain'} lr={lr:g}", step + 1, steps,
                              step + 1 == steps)  # fmt: skip

            results = run_demo(config, on_step=on_step)
    finally:
        torch.set_num_threads(previous)
    summary = summarize(results, config)
    summary["threads"], summary["threads_rule"] = threads, rule
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
