"""normkit's lab: experiments that measure what normalization does, on data that ships offline.

Uses the public API as a user would. Needs the ``lab`` extra (scikit-learn, matplotlib, mnist1d).

- :func:`run_experiment` trains an experiment's trials into a run directory (config.json,
  metrics.jsonl, checkpoints, summary.json, report.md/html); ``resume=True`` continues a killed run.
- :func:`experiment_names`, :func:`get_experiment`: the registry; one file per experiment in
  ``normkit/lab/experiments/``.
- :func:`write_combined_report` puts several runs in one report; :class:`RunRecord` reads a run back.
- :func:`load_dataset`: Fashion-MNIST, the digits, MNIST-1D, CIFAR-10 (never downloaded).
"""

from normkit.lab.datasets import Dataset, DatasetNotFoundError, load_dataset
from normkit.lab.experiment import (
    Experiment,
    Settings,
    Setup,
    Trial,
    experiment_names,
    get_experiment,
    register,
)
from normkit.lab.records import RunRecord
from normkit.lab.report import write_combined_report, write_run_report
from normkit.lab.runner import run_experiment

__all__ = [
    "Dataset",
    "DatasetNotFoundError",
    "Experiment",
    "RunRecord",
    "Settings",
    "Setup",
    "Trial",
    "experiment_names",
    "get_experiment",
    "load_dataset",
    "register",
    "run_experiment",
    "write_combined_report",
    "write_run_report",
]
