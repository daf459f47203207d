"""The ``[lab]`` extra: what the lab, ``normkit demo`` and ``make demo`` need, checked before any work.

``python -m normkit.cli.extras`` exits 1 with the one-line message when the extra is missing (the
Makefile's demo runs it first).
"""

from __future__ import annotations

import importlib
import sys

LAB_MODULES = ("matplotlib", "scipy", "sklearn")  # what every lab command needs (the lab extra)


def missing_lab_module() -> str | None:
    """The first module of the lab extra that does not import, or None when all do."""
    for module in LAB_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def lab_extra_message(command: str, module: str) -> str:
    return f"error: {command} needs the lab extra ({module} is missing): pip install 'normkit[lab]'"


def require_lab_extra(command: str) -> None:
    """Exit 1 with one line naming the missing module and the install command (no traceback)."""
    module = missing_lab_module()
    if module is not None:
        import typer

        typer.secho(lab_extra_message(command, module), err=True, fg="red")
        raise typer.Exit(1)


if __name__ == "__main__":
    name = " ".join(sys.argv[1:]) or "normkit demo"
    missing = missing_lab_module()
    if missing is not None:
        print(lab_extra_message(name, missing), file=sys.stderr)
        sys.exit(1)
