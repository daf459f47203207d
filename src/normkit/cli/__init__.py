"""The ``normkit`` command. ``main.py`` assembles it; each command group has its own file."""
