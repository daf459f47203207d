"""``normkit fold``: fold a model's BatchNorm layers for inference and save the state_dict."""

from __future__ import annotations

from typing import Annotated

import typer


def fold(
    model: Annotated[str, typer.Option(help="package.module:factory building the model.")],
    out: Annotated[str, typer.Option(help="Where to save the folded model's state_dict.")],
    weights: Annotated[
        str | None, typer.Option(help="A state_dict file to load first (weights_only=True).")
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(help="Shape of a random example input (checks shapes, measures the error)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Fold every eval-mode BatchNorm into the Conv/Linear before it and save the state_dict.

    To use the file, fold a model from the same factory the same way (nk.tools.fold_batchnorm, with
    an example input of the same shape when --input-shape was given) and load it into the result:
    ``folded.load_state_dict(torch.load(FILE, weights_only=True))``. The folded model is the
    factory's own class less the folded layers' tensors (a torch.fx GraphModule only where the
    report says why); BatchNorm + activation layers keep their activation. See docs/tools.md.
    """
    import json

    import torch

    from normkit.tools.fold import fold_batchnorm
    from normkit.tools.loading import load_factory, load_weights, parse_shape

    network = load_factory(model)
    if weights is not None:
        load_weights(network, weights)
    network.eval()
    example = torch.randn(parse_shape(input_shape)) if input_shape else None
    folded, report = fold_batchnorm(network, example, inplace=True)
    torch.save(folded.state_dict(), out)
    torch.load(out, weights_only=True)  # the file reads back as plain tensors
    if as_json:
        typer.echo(json.dumps(report.as_dict() | {"out": out}, indent=2))
    else:
        typer.echo(str(report))
        typer.echo(f"saved the folded state_dict to {out}")
