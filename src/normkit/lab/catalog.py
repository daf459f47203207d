"""The experiments by name: every module in ``normkit.lab.experiments`` registers its experiment.

This module sits above the experiments (it imports them); nothing they import imports it.
"""

from __future__ import annotations

import importlib
import pkgutil

import normkit.lab.experiments as package
from normkit.errors import ConfigError
from normkit.lab.experiment import REGISTRY


def _discover() -> None:
    """Import every module in ``normkit.lab.experiments``: a new file there is all it takes."""
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def experiment_names() -> list[str]:
    _discover()
    return sorted(REGISTRY)


def get_experiment(name: str):
    """An instance of the experiment registered as ``name``."""
    _discover()
    if name not in REGISTRY:
        raise ConfigError(
            f"no experiment named {name!r}; `normkit lab list` shows them: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name]()
