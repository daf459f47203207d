"""Which normalizer to use: the guideline's table beside the evidence from the lab's own runs.

The rule is :data:`normkit.tools.ADVICE_TABLE` (large-batch vision → BatchNorm, small-batch vision →
GroupNorm, sequences → LayerNorm, style → InstanceNorm), the same table ``nk.tools.doctor`` advises
from: this experiment imports it, so the two cannot drift apart. For each row it collects what the
lab measured, from finished runs of the other experiments found under ``runs`` (a directory holding
one run directory per experiment, as ``normkit lab run NAME --out DIR/NAME`` writes them):

- ``batch-size`` (part 3): error against the per-device batch for BN and GN;
- ``train-test-gap``: BN's error at a small normalization batch against a large one (a test of the
  small-batch row), and how far population statistics fall behind batch statistics there (a note);
- ``variance-bias``: how much the choice of variance estimator matters at m ≤ 4 (a note on the
  small-batch row: a choice within BN, not a comparison with GN);
- ``population-stats`` and the AdaBN half of ``domain-shift``: how to keep BN's statistics right when
  BN is the choice (notes on the BN row);
- ``sequence-norms``: LN/RMSNorm against BN on a character-level model, at batch 32 and 1;
- ``domain-shift``: IN against BN under intensity scaling and the mixed style shift (tests), under
  inversion and on clean data (notes), and BIN's learned gates.

Each piece of evidence carries its run directory and the command that produced it (from the run's
config.json) and says whether it supports the row. A missing run is listed with the command that
makes it. The experiment trains nothing itself; its ``dataset`` setting is not used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from normkit.lab.legacy import Experiment, Settings, register
from normkit.lab.records import CONFIG, RunRecord
from normkit.lab.report import Report, Section, Table
from normkit.tools import ADVICE_TABLE, Advice, advise

EVIDENCE_SOURCES = (
    "batch-size",
    "train-test-gap",
    "variance-bias",
    "population-stats",
    "sequence-norms",
    "domain-shift",
)


def guideline_rows() -> dict[str, Advice]:
    """Every row of :data:`normkit.tools.ADVICE_TABLE`, in its order, by a short key: vision rows
    are told apart by :func:`normkit.tools.advise` at batch 64 and batch 2, as the doctor picks them."""
    keys = {
        advise("vision", batch_size=64): "vision-large",
        advise("vision", batch_size=2): "vision-small",
    }
    return {keys.get(row, f"{row.task} {row.batches}" if row.task == "vision" else row.task): row
            for row in ADVICE_TABLE}  # fmt: skip


def find_run(root: Path, experiment: str) -> RunRecord | None:
    """The finished run of ``experiment`` under ``root``: ``root/experiment`` if it is one, else
    the first (by name) subdirectory whose config.json names the experiment."""
    candidates = [root / experiment] + sorted(p for p in root.glob("*") if p.is_dir())
    for directory in candidates:
        config = directory / CONFIG
        if not config.is_file():
            continue
        try:
            if json.loads(config.read_text(encoding="utf-8")).get("experiment") != experiment:
                continue
            record = RunRecord.load(directory)
        except (OSError, ValueError):
            continue
        if record.complete:
            return record
    return None


@dataclass
class Evidence:
    row: str  # key of guideline_rows()
    experiment: str
    quantity: str
    value: str
    supports: bool | None  # None: a note, not a test of the row

    def as_dict(self, record: RunRecord) -> dict:
        return {
            "row": self.row,
            "experiment": self.experiment,
            "quantity": self.quantity,
            "value": self.value,
            "supports": self.supports,
            "run": str(record.directory),
            "command": record.config.get("command", ""),
            "preset": record.config.get("preset"),
            "data": record.config.get("data", {}).get("name"),
        }


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


# ------------------------------------------------------------------- evidence, one experiment each


def _batch_size(record: RunRecord) -> list[Evidence]:
    """Part 3's batch-size study, read from its final rows: each carries its trial's parameters
    (the normalizer and the per-device batch) and the test error (a fraction, or a percentage when
    the run's errors exceed 1) or accuracy."""
    finals = list(record.finals().values())
    errors_seen = [r["test_error"] for r in finals if isinstance(r.get("test_error"), (int, float))]
    scale = 100.0 if errors_seen and max(errors_seen) > 1.0 else 1.0
    errors: dict[str, dict[int, list[float]]] = {}
    for row in finals:
        norm = next((row[k] for k in ("norm", "normalizer", "norm_spec") if k in row), None)
        batch = next(
            (row[k] for k in ("batch_per_device", "batch_size", "batch") if k in row), None
        )
        if row.get("processes", 1) != 1:
            continue  # SyncBN across processes: not the per-device comparison
        if isinstance(row.get("test_error"), (int, float)):
            error = row["test_error"] / scale
        elif isinstance(row.get("test_accuracy"), (int, float)):
            error = 1 - row["test_accuracy"]
        else:
            error = None
        if norm is None or batch is None or error is None:
            continue
        kind = str(norm).split(":")[0].lower()
        kind = {"bn": "batch", "gn": "group", "groupnorm": "group", "batchnorm": "batch"}.get(
            kind, kind
        )
        errors.setdefault(kind, {}).setdefault(int(batch), []).append(float(error))
    if "batch" not in errors or "group" not in errors:
        return [
            Evidence(
                "vision-small",
                "batch-size",
                "BN and GN error by batch size",
                "not found in the run's rows (see its report)",
                None,
            )
        ]
    mean = {k: {b: sum(v) / len(v) for b, v in by.items()} for k, by in errors.items()}
    common = sorted(set(mean["batch"]) & set(mean["group"]))
    if not common:
        return []
    small, large = common[0], common[-1]
    bn, gn = mean["batch"], mean["group"]
    return [
        Evidence(
            "vision-large",
            "batch-size",
            f"test error at batch {large}: BN vs GN",
            f"{_pct(bn[large])} vs {_pct(gn[large])}",
            bn[large] <= gn[large],
        ),
        Evidence(
            "vision-small",
            "batch-size",
            f"test error at batch {small}: GN vs BN; BN's rise from {large} to {small} vs GN's",
            f"{_pct(gn[small])} vs {_pct(bn[small])}; rise "
            f"{100 * (bn[small] - bn[large]):+.2f} vs {100 * (gn[small] - gn[large]):+.2f} pts",
            gn[small] < bn[small] and bn[small] - bn[large] > gn[small] - gn[large],
        ),
    ]


def _train_test_gap(record: RunRecord) -> list[Evidence]:
    """One test of the small-batch row, in its own terms ("BatchNorm's error grows as the batch
    shrinks"): BN's eval-mode test error at the smallest normalization batch against the largest.
    The train-test inconsistency itself (population − batch statistics, Wu & Johnson's mechanism)
    and FrozenBN are notes: they describe BN at small batches and compare no normalizers."""
    summary = record.summary
    gaps = {int(k): v for k, v in summary["inconsistency_by_nbs"].items()}
    population = {
        int(r["nbs"]): r["test_error_population"]
        for r in summary["runs"].values()
        if not r["frozen"] and not r.get("fc_norm")
    }
    found = []
    if len(population) > 1:
        small, large = min(population), max(population)
        found.append(
            Evidence(
                "vision-small",
                "train-test-gap",
                f"BN's test error (population statistics) at NBS {small} vs NBS {large}",
                f"{_pct(population[small])} vs {_pct(population[large])}",
                population[small] > population[large],
            )
        )
    if len(gaps) > 1:
        small, large = min(gaps), max(gaps)
        found.append(
            Evidence(
                "vision-small",
                "train-test-gap",
                f"test error with population − with batch statistics at NBS {small} "
                f"(Wu & Johnson: much larger at small NBS)",
                f"{100 * gaps[small]:+.2f} pts (NBS {large}: {100 * gaps[large]:+.2f})",
                None,
            )
        )
    for nbs, v in summary.get("freeze", {}).items():
        found.append(
            Evidence(
                "vision-small",
                "train-test-gap",
                f"FrozenBN at the end, NBS {nbs}: population-statistics error change",
                f"{_pct(v['without_freeze'])} → {_pct(v['test_error_population'])}",
                None,
            )
        )
    for nbs, v in summary.get("fc_norm", {}).items():
        found.append(
            Evidence(
                "vision-small",
                "train-test-gap",
                f"BN on the fc layer too, NBS {nbs}: test error with batch / population statistics",
                f"{_pct(v['test_error_batch'])} / {_pct(v['test_error_population'])}",
                None,
            )
        )
    return found


def _variance_bias(record: RunRecord) -> list[Evidence]:
    """A note on the small-batch row, not a test of it: the variance estimator is a choice within
    BatchNorm at small m, and says nothing about GroupNorm against BatchNorm."""
    cells = record.summary["cells"]
    sizes = sorted(int(m) for m in cells)
    small, large = sizes[0], sizes[-1]
    cost = {m: cells[str(m)]["accuracy_cost_of_biased"] for m in sizes}
    accuracy = {m: cells[str(m)]["accuracy_unbiased"] for m in sizes}
    return [
        Evidence(
            "vision-small",
            "variance-bias",
            f"accuracy lost to the biased variance at m = {small} vs m = {large}",
            f"{100 * cost[small]:+.2f} vs {100 * cost[large]:+.2f} pts (accuracy {_pct(accuracy[small])} "
            f"vs {_pct(accuracy[large])})",
            None,
        )
    ]


def _population_stats(record: RunRecord) -> list[Evidence]:
    s = record.summary
    best = s["per_method"][s["reference_method"]]
    momentum, versus = next(iter(s["precise_vs_ema"].items()))
    ema = s["per_method"][f"error_ema_{momentum}"]
    return [
        Evidence(
            "vision-large",
            "population-stats",
            f"with BN, population statistics: EMA (m={momentum}) vs PreciseBN, mean eval error "
            "over checkpoints",
            f"{_pct(ema['mean_error'])} vs {_pct(best['mean_error'])}; PreciseBN ≤ EMA at "
            f"{versus['precise_not_worse']}/{versus['checkpoints']} checkpoints",
            None,
        )
    ]


def _sequence_norms(record: RunRecord) -> list[Evidence]:
    s = record.summary
    found = []
    for batch, values in s["test_bpc"].items():
        bn = {k: v for k, v in values.items() if k.startswith("batch")}
        ln = {k: v for k, v in values.items() if k in ("layer", "rms")}
        if not bn or not ln:
            continue
        found.append(
            Evidence(
                "sequence",
                "sequence-norms",
                f"test bits/char at batch {batch}: best of LN/RMSNorm vs best BN",
                f"{min(ln.values()):.3f} vs {min(bn.values()):.3f} "
                f"({', '.join(f'{k} {v:.3f}' for k, v in values.items())})",
                min(ln.values()) <= min(bn.values()),
            )
        )
    for key, run in s["runs"].items():
        if run.get("training_step_error"):
            found.append(
                Evidence(
                    "sequence",
                    "sequence-norms",
                    f"{key}: one training step",
                    run["training_step_error"].split(":")[0],
                    True,
                )
            )
    return found


def _domain_shift(record: RunRecord) -> list[Evidence]:
    arms = record.summary["arms"]
    found = []
    if "bn" in arms and "in" in arms:
        # Intensity/contrast scaling is what instance statistics remove; an inversion flips the
        # sign of the normalized responses, which no statistics undo: a note, not a test.
        for shift, test in (("scale", True), ("mixed", True), ("invert", False)):
            if shift in arms["bn"]["error"]:
                found.append(
                    Evidence(
                        "style",
                        "domain-shift",
                        f"test error under {shift!r}, IN vs BN",
                        f"{_pct(arms['in']['error'][shift])} vs {_pct(arms['bn']['error'][shift])}",
                        arms["in"]["error"][shift] < arms["bn"]["error"][shift] if test else None,
                    )
                )
        found.append(
            Evidence(
                "style",
                "domain-shift",
                "the price: clean test error, IN vs BN",
                f"{_pct(arms['in']['error']['none'])} vs {_pct(arms['bn']['error']['none'])}",
                None,
            )
        )
    if "bin" in arms and arms["bin"]["rho"]:
        found.append(
            Evidence(
                "style",
                "domain-shift",
                "BIN's learned gates ρ (mean per layer; 1 = BN, 0 = IN)",
                ", ".join(f"{p} {g['mean']:.2f}" for p, g in arms["bin"]["rho"].items()),
                None,
            )
        )
    if "bn" in arms and arms["bn"]["error_adapted"]:
        gains = arms["bn"]["adaptation_gain"]
        found.append(
            Evidence(
                "vision-large",
                "domain-shift",
                "with BN under a domain shift: error with training statistics → AdaBN",
                "; ".join(
                    f"{sh} {_pct(arms['bn']['error'][sh])} → {_pct(arms['bn']['error_adapted'][sh])}"
                    for sh in gains
                    if sh != "none"
                ),
                None,
            )
        )
    return found


EXTRACTORS = {
    "batch-size": _batch_size,
    "train-test-gap": _train_test_gap,
    "variance-bias": _variance_bias,
    "population-stats": _population_stats,
    "sequence-norms": _sequence_norms,
    "domain-shift": _domain_shift,
}


# ---------------------------------------------------------------------------------- experiment


@dataclass(frozen=True)
class GuidelineSettings(Settings):
    dataset: str = "digits"  # not used (nothing is trained); digits is the cheapest to load
    runs: str = "runs/full"  # where the other experiments' runs are


@register
class Guideline(Experiment):
    name = "guideline"
    title = "Which normalizer: the guideline beside the lab's evidence"
    paper = (
        "The guideline of normkit.tools.ADVICE_TABLE (Ioffe & Szegedy 2015; Wu & He 2018; Ba et al. "
        "2016; Ulyanov et al. 2016), as nk.tools.doctor advises it"
    )
    claim = (
        "Large-batch vision → BatchNorm; small-batch vision → GroupNorm; sequences → LayerNorm; "
        "style → InstanceNorm."
    )
    settings_class = GuidelineSettings
    presets = {"quick": {}, "tiny": {}}

    def trials(self, settings, data, finals):
        return []  # it reads other runs; see summarize

    def summarize(self, record: RunRecord) -> dict:
        root = Path(record.settings["runs"])
        if not root.is_absolute():
            root = (Path.cwd() / root).resolve()
        evidence, found, missing = [], {}, {}
        for experiment in EVIDENCE_SOURCES:
            run = find_run(root, experiment) if root.is_dir() else None
            if run is None or run.summary is None:
                missing[experiment] = f"normkit lab run {experiment} --out {root / experiment}"
                continue
            found[experiment] = str(run.directory)
            try:
                pieces = EXTRACTORS[experiment](run)
            except (KeyError, TypeError, ValueError, StopIteration, ZeroDivisionError) as error:
                pieces = []
                missing[experiment] = (
                    f"{run.directory}: its summary could not be read ({type(error).__name__}: "
                    f"{error}); rerun `normkit lab report {run.directory}` after updating normkit"
                )
            evidence += [piece.as_dict(run) for piece in pieces]
        rows = {}
        for key, advice in guideline_rows().items():
            tests = [
                e["supports"] for e in evidence if e["row"] == key and e["supports"] is not None
            ]
            verdict = (
                "no evidence"
                if not tests
                else "supported"
                if all(tests)
                else "contradicted"
                if not any(tests)
                else "mixed"
            )
            rows[key] = {**advice.as_dict(), "verdict": verdict, "tests": len(tests)}
        return {
            "runs_directory": str(root),
            "rows": rows,
            "evidence": evidence,
            "found": found,
            "missing": missing,
        }

    def report(self, record: RunRecord) -> Report:
        s = record.summary
        comparison = Table(
            ["task", "per-device batch", "guideline: use", "why (published)", "our evidence"],
            [
                [
                    row["task"],
                    row["batches"],
                    f"{row['layer']} (`{row['spec']}`)",
                    f"{row['reason']} ({row['source']})",
                    f"{row['verdict']} ({row['tests']} test{'s' if row['tests'] != 1 else ''})",
                ]
                for row in s["rows"].values()
            ],
        )
        sections = []
        for key, row in s["rows"].items():
            pieces = [e for e in s["evidence"] if e["row"] == key]
            blocks = [
                f"**{row['task']}, per-device batch {row['batches']} → {row['layer']}.** "
                f"{row['reason']} ({row['source']})."
            ]
            if pieces:
                blocks.append(
                    Table(
                        ["experiment", "quantity", "ours", "supports the row", "command"],
                        [
                            [
                                e["experiment"],
                                e["quantity"],
                                e["value"],
                                {True: "yes", False: "**no**", None: "(note)"}[e["supports"]],
                                f"`{e['command'].split('  #')[0]}`",
                            ]
                            for e in pieces
                        ],
                    )
                )
            else:
                blocks.append("No run of the lab measured this row yet.")
            sections.append(Section(f"{row['task']}, batch {row['batches']}", blocks))
        if s["missing"]:
            sections.append(
                Section(
                    "Runs not found",
                    ["\n".join(f"- `{name}`: {how}" for name, how in s["missing"].items())],
                )
            )
        deviations = [
            f"Evidence is read from the runs under `{s['runs_directory']}`; each table gives the "
            "command that made the run. The lab's networks are small and its data sets "
            "(Fashion-MNIST, a text corpus) small, so the evidence shows directions, not the "
            "published magnitudes.",
            "The table itself is normkit.tools.ADVICE_TABLE; `normkit doctor` advises from it.",
            "Nothing is trained: the Data section describes the unused `dataset` setting.",
        ]
        headline = "; ".join(f"{row['layer']}: {row['verdict']}" for row in s["rows"].values())
        return Report(comparison, sections, [], deviations, headline)
