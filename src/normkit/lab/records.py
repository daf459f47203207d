"""A run read back from its directory: config.json, metrics.jsonl and summary.json.

Reports are built from these files alone, so ``normkit lab report DIR`` can redo a report (or
combine several runs) long after the run, on another machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from normkit.errors import ConfigError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"


def read_rows(path: Path) -> list[dict]:
    """The complete lines of a metrics.jsonl file (a torn last line, from a kill, is ignored)."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.endswith("\n"):
                rows.append(json.loads(line))
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
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
        summary_path = directory / SUMMARY
        summary = (
            json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
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
