"""normkit's lab: experiments that reproduce published claims about normalization, on data that
ships offline, with every verdict judged over seeds. Needs the ``lab`` extra (scikit-learn,
matplotlib, scipy, mnist1d); ``--scheduler`` needs the ``dask`` extra.

- :func:`run_experiment` trains an experiment's trials into a run folder (config.json,
  metrics.jsonl, summary.json with its claims, report.md/html); ``resume=True`` continues a killed
  run; ``workers=N`` trains trials in N processes, ``scheduler=ADDRESS`` on a Dask cluster.
- :func:`experiment_names`, :func:`get_experiment`: the catalog; one file per experiment in
  ``normkit/lab/experiments/``; docs/lab.md says how to write one.
- :func:`write_combined_report`: the scoreboard of several runs; :class:`RunRecord` reads a run back.
- :func:`load_dataset`: Fashion-MNIST, the digits, MNIST-1D, CIFAR-10 (never downloaded).

What an experiment file uses: :mod:`normkit.lab.experiment` (``Experiment``, ``Setup``,
``register``), :mod:`normkit.lab.plan` (``Plan``, ``Arm``, ``Sweep``, sweep rules),
:mod:`normkit.lab.claims` (``Claim``, ``Published``, quantities, criteria) and
:mod:`normkit.lab.figures`.
"""

from normkit.lab.catalog import experiment_names, get_experiment
from normkit.lab.datasets import Dataset, DatasetNotFoundError, load_dataset
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.plan import Arm, Plan, Sweep, Trial
from normkit.lab.records import RunRecord
from normkit.lab.runner import (
    dry_run,
    rebuild_report,
    run_experiment,
    write_combined_report,
    write_run_report,
)
from normkit.lab.settings import Settings

__all__ = [
    "Arm",
    "Dataset",
    "DatasetNotFoundError",
    "Experiment",
    "Plan",
    "RunRecord",
    "Settings",
    "Setup",
    "Sweep",
    "Trial",
    "dry_run",
    "experiment_names",
    "get_experiment",
    "load_dataset",
    "rebuild_report",
    "register",
    "run_experiment",
    "write_combined_report",
    "write_run_report",
]
