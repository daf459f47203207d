"""Load a model for the command line: ``package.module:factory`` and an optional state_dict file.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint is data, and unpickling
arbitrary objects from it could run arbitrary code.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import torch
from torch import nn

from normkit.errors import ConfigError


def load_factory(spec: str) -> nn.Module:
    """Call ``factory`` from ``package.module:factory`` (no arguments) and return the model it builds.

    The current directory is importable, so ``my_models:resnet`` finds ``./my_models.py``; it is
    searched *after* the installed packages, so that a stray file there (``./sympy.py``) never
    shadows a package that torch or the model imports.
    """
    import sys

    module_name, sep, attribute = str(spec).partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"--model must look like package.module:factory (a function or class building the "
            f"model with no arguments), got {spec!r}"
        )
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import {module_name!r} for --model {spec!r}: {error}") from None
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ConfigError(f"{module_name!r} has no attribute {attribute!r} (--model {spec!r})")
    if not callable(factory):
        raise ConfigError(f"{spec!r} is not callable; point --model at a function or a class")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict (or a checkpoint dict holding one under ``"state_dict"``/``"model"``)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConfigError(
            f"{path} holds objects other than tensors and containers, which normkit does not "
            f"unpickle (weights_only=True); save model.state_dict() instead. ({error})"
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state_dict")
    model.load_state_dict(state)
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"`` -> (8, 3, 32, 32)."""
    try:
        shape = tuple(int(part) for part in str(text).replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise ConfigError(f"--input-shape must be positive integers like 8,3,32,32, got {text!r}")
    return shape
