"""``normkit doctor``: check a model for normalization mistakes."""

from __future__ import annotations

from typing import Annotated

import typer


def doctor(
    model: Annotated[str, typer.Option(help="package.module:factory building the model.")],
    input_shape: Annotated[
        str | None, typer.Option(help="Shape of a random example input, e.g. 8,3,32,32.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Per-device training batch size.", min=1)
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="vision, sequence or style (default: guessed).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="A state_dict file to load (weights_only=True).")
    ] = None,
    eval_mode: Annotated[
        bool, typer.Option("--eval/--train", help="Check the model in eval or training mode.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Find normalization mistakes in a model: module, severity, why (with the paper) and fix.

    Also prints which normalizer the guideline advises for the task and per-device batch size.
    """
    import torch

    from normkit.tools.doctor import doctor as run_doctor
    from normkit.tools.loading import load_factory, load_weights, parse_shape

    network = load_factory(model)
    if weights is not None:
        load_weights(network, weights)
    network.train(not eval_mode)
    example = torch.randn(parse_shape(input_shape)) if input_shape else None
    report = run_doctor(network, example, batch_size=batch_size, task=task)
    if as_json:
        typer.echo(report.to_json(indent=2))
    else:
        report.print()
