"""A run read back from its folder: config.json, metrics.jsonl and summary.json.

Reports are built from these files alone, so ``normkit lab report DIR`` can redo a report (or
combine several runs) long after the run, on another machine. A damaged or foreign file gives one
line that names it and says what to do (:class:`RunFolderError`), never a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from normkit.errors import ConfigError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"  # one file per trial in progress
LEGACY_CHECKPOINT = "checkpoint.pt"  # the single checkpoint of runs made before Lab v2
LOCK = ".normkit.lock"
TIMING = "timing.json"  # training seconds of each finished trial (not in the rows: not reproducible)
SCHEMA = "normkit-lab-run"  # config.json's "schema": what marks a folder as a normkit run
SCHEMA_VERSION = 2
# Everything a run writes into its folder (figures/ holds only the PNGs it wrote).
RUN_FILES = (CONFIG, METRICS, SUMMARY, TIMING, LEGACY_CHECKPOINT, "report.md", "report.html")
RUN_FOLDERS = (CHECKPOINTS, "figures")


class RunFolderError(ConfigError):
    """A run folder's file is damaged, foreign or unwritable; the message names it and the fix."""


def read_json(path: Path, what: str, fix: str) -> dict:
    """A JSON object from ``path``; a damaged file raises :class:`RunFolderError` naming ``fix``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(f"{path} is damaged ({what} that is not valid JSON: {error}); {fix}") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} is damaged ({what} that is not a JSON object); {fix}")
    return value


def is_run_config(config: dict) -> bool:
    """Whether a config.json was written by normkit's lab (this schema, or the one before it)."""
    if config.get("schema") == SCHEMA:
        return True
    legacy = ("experiment", "settings", "preset", "command", "environment")
    return all(k in config for k in legacy) and "normkit" in (config.get("environment") or {})


def read_rows(path: Path) -> list[dict]:
    """The complete lines of a metrics.jsonl file (a torn last line, from a kill, is ignored)."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunFolderError(
                    f"{path} is damaged (line {number} is not a JSON row); a run folder's "
                    "metrics.jsonl is written by normkit only: restore it or start a new run"
                ) from None
    return rows


@dataclass
class RunRecord:
    """Everything a run wrote. ``rows`` are the metrics rows in the order they were written."""

    directory: Path
    config: dict
    rows: list[dict]
    summary: dict | None = None

    @classmethod
    def load(cls, directory: str | Path) -> RunRecord:
        directory = Path(directory)
        if not (directory / CONFIG).is_file():
            raise ConfigError(
                f"{directory} is not a lab run (no {CONFIG}); runs are made by `normkit lab run`"
            )
        config = read_json(
            directory / CONFIG, "a run's configuration", "this folder cannot be read as a run"
        )
        summary_path = directory / SUMMARY
        summary = None
        if summary_path.exists():
            summary = read_json(
                summary_path,
                "a run's summary",
                f"delete it and run `normkit lab run {config.get('experiment')} --out {directory} "
                "--resume`, which writes it again from metrics.jsonl",
            )
        return cls(directory, config, read_rows(directory / METRICS), summary)

    @property
    def settings(self) -> dict:
        return self.config["settings"]

    @property
    def complete(self) -> bool:
        return bool(self.summary and self.summary.get("complete"))

    def trial_keys(self) -> list[str]:
        """Keys of the trials that have rows, in the order they ran."""
        return list(dict.fromkeys(row["trial"] for row in self.rows))

    def curve(self, trial: str) -> list[dict]:
        """The evaluation rows of one trial, in step order."""
        return [r for r in self.rows if r["trial"] == trial and r["kind"] == "eval"]

    def finals(self) -> dict[str, dict]:
        """The final row of each finished trial, by key."""
        return {r["trial"]: r for r in self.rows if r["kind"] == "final"}


def find_run(root: Path, experiment: str) -> RunRecord | None:
    """The finished run of ``experiment`` under ``root``: ``root/experiment`` if it is one, else
    the first (by name) subdirectory whose config.json names the experiment."""
    for directory in [root / experiment] + sorted(p for p in root.glob("*") if p.is_dir()):
        try:
            record = RunRecord.load(directory)
        except (OSError, ValueError):  # not a run (no config.json), or a damaged one
            continue
        if record.config.get("experiment") == experiment and record.complete:
            return record
    return None
