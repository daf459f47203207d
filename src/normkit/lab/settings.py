"""An experiment's settings: a frozen dataclass whose defaults are the full protocol, and presets.

Presets are overrides of the defaults by name (``quick``, ``tiny``, ``gpu``, ...); ``--set KEY=VALUE``
overrides on top of a preset, parsed to the default's type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from normkit.errors import ConfigError

GPU_PRESET_PREFIX = "gpu"  # presets named gpu, gpu-large, ... run at the paper's scale on a GPU


@dataclass(frozen=True)
class Settings:
    """Settings every experiment has; experiments subclass this with their own fields."""

    seed: int = 0
    dataset: str = "auto"  # see normkit.lab.datasets.DATASET_NAMES


def resolve(
    name: str,
    settings_class: type[Settings],
    presets: dict[str, dict[str, Any]],
    preset: str = "full",
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """The settings of ``preset`` with ``overrides`` applied (values parsed from strings)."""
    if preset != "full" and preset not in presets:
        raise ConfigError(
            f"{name}: preset {preset!r} is not known; choose one of {', '.join(['full', *presets])}"
        )
    values = dict(presets.get(preset, {}))
    fields = {f.name: f for f in dataclasses.fields(settings_class)}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"{name} has no setting {key!r}; its settings are {', '.join(fields)}")
        default = values.get(key, fields[key].default)
        values[key] = parse_setting(key, value, default)
    return settings_class(**values)


def from_json(settings_class: type[Settings], values: dict) -> Settings:
    """Settings read back from config.json (JSON turned tuples into lists; they become tuples)."""
    result = dict(values)
    for f in dataclasses.fields(settings_class):
        if isinstance(f.default, tuple) and isinstance(result.get(f.name), list):
            result[f.name] = tuple(result[f.name])
    known = {f.name for f in dataclasses.fields(settings_class)}
    return settings_class(**{k: v for k, v in result.items() if k in known})


def parse_setting(key: str, value: Any, default: Any) -> Any:
    """A setting given as a string on the command line, converted to the default's type."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            items = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
            if default:
                return tuple(parse_setting(key, v, default[0]) for v in items)
            return tuple(_number_or_string(v) for v in items)
        if default is None:
            return None if value.lower() == "none" else _number_or_string(value)
    except ValueError as error:
        raise ConfigError(
            f"setting {key}={value!r} does not parse as {type(default).__name__} (default {default!r})"
        ) from error
    return value


def _number_or_string(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
