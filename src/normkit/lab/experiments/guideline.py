"""Which normalizer to use: the guideline's table beside the claims the lab's own runs judged.

The rule is :data:`normkit.tools.ADVICE_TABLE` (large-batch vision → BatchNorm, small-batch vision →
GroupNorm, sequences → LayerNorm, style → InstanceNorm), the same table ``nk.tools.doctor`` advises
from: this experiment imports it, so the two cannot drift apart. For each row it collects the claims
of the finished runs of the other experiments found under ``runs`` (a directory holding one run
directory per experiment, as ``normkit lab run NAME --out DIR/NAME`` writes them), read from each
run's summary.json (``claims``: ours with its interval over seeds, and its verdict):

- a claim listed in :data:`TESTS` tests its row: the row is supported where the claim is reproduced,
  contradicted where it is not reproduced; an inconclusive test counts as neither;
- every other claim of a source is a note on the row of :data:`SOURCES` (e.g. the variance estimator
  or PreciseBN: choices within BN, which compare no normalizers).

A row's verdict: ``reproduced`` (supported) when its judged tests are all reproduced, ``not
reproduced`` (contradicted) when all are not, else ``inconclusive`` with the reason (tests disagree,
or none was judged). Each piece of evidence carries its run directory and the command that made it;
a missing run is listed with the command that makes it. The experiment trains nothing (no trials;
it overrides the framework's summary and report, which otherwise read trials); its ``dataset``
setting is not used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from normkit.lab.claims import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Published, check, ours_text
from normkit.lab.experiment import Experiment, headline, register, summarize
from normkit.lab.records import RunRecord, find_run
from normkit.lab.render import Section, Table
from normkit.lab.report import RunReport, claims_card
from normkit.lab.settings import Settings
from normkit.tools import ADVICE_TABLE, Advice, advise

SOURCES = {  # experiment -> the guideline row its claims are notes on (unless listed in TESTS)
    "batch-size": "vision-small",
    "train-test-gap": "vision-small",
    "variance-bias": "vision-small",
    "population-stats": "vision-large",
    "sequence-norms": "sequence",
    "domain-shift": "style",
}
TESTS = {  # (experiment, claim) -> the row it tests: the row holds where the claim is reproduced
    ("batch-size", "bn-vs-gn-large"): "vision-large",
    ("batch-size", "bn-degrades"): "vision-small",
    ("batch-size", "gn-beats-bn-small"): "vision-small",
    ("train-test-gap", "error-grows"): "vision-small",
    ("sequence-norms", "ln-vs-bn"): "sequence",
    ("sequence-norms", "ln-vs-bn-batch1"): "sequence",
    ("sequence-norms", "per-step-bn-batch1"): "sequence",
    ("domain-shift", "in-beats-bn-scale"): "style",
    ("domain-shift", "in-beats-bn-style"): "style",
}
NOTES = {("domain-shift", "adabn-"): "vision-large"}  # (experiment, claim prefix) -> row


def guideline_rows() -> dict[str, Advice]:
    """Every row of :data:`normkit.tools.ADVICE_TABLE`, in its order, by a short key: vision rows
    are told apart by :func:`normkit.tools.advise` at batch 64 and batch 2, as the doctor picks them."""
    keys = {advise("vision", batch_size=64): "vision-large", advise("vision", batch_size=2): "vision-small"}
    return {keys.get(row, f"{row.task} {row.batches}" if row.task == "vision" else row.task): row
            for row in ADVICE_TABLE}  # fmt: skip


def row_of(experiment: str, claim: str) -> tuple[str, bool]:
    """The guideline row a claim of ``experiment`` speaks to, and whether it tests the row."""
    if (experiment, claim) in TESTS:
        return TESTS[experiment, claim], True
    note = next((row for (e, prefix), row in NOTES.items() if e == experiment and claim.startswith(prefix)),
                SOURCES[experiment])  # fmt: skip
    return note, False


def evidence_of(experiment: str, record: RunRecord) -> list[dict]:
    """One piece of evidence per claim in the run's summary.json."""
    found = []
    for entry in record.summary["claims"]:
        row, test = row_of(experiment, entry["name"])
        found.append({
            "row": row, "experiment": experiment, "claim": entry["name"], "quantity": entry["quantity"],
            "value": ours_text(entry), "verdict": entry["verdict"], "reason": entry.get("reason", ""),
            "supports": check(entry).passed if test else None, "test": test,
            "run": str(record.directory), "command": record.config.get("command", ""),
            "preset": record.config.get("preset"), "data": record.config.get("data", {}).get("name"),
        })  # fmt: skip
    return found


def row_verdict(tests: list[bool | None]) -> tuple[str, str]:
    """A row's verdict from its tests (None: a test that was inconclusive)."""
    judged = [t for t in tests if t is not None]
    if not judged:
        return INCONCLUSIVE, f"no judged test ({len(tests)} inconclusive)" if tests else "no test run"
    if all(judged):
        return REPRODUCED, ""
    if not any(judged):
        return NOT_REPRODUCED, ""
    return INCONCLUSIVE, f"tests disagree: {sum(judged)} of {len(judged)} reproduced"


@dataclass(frozen=True)
class GuidelineSettings(Settings):
    dataset: str = "digits"  # not used (nothing is trained); digits is the cheapest to load
    runs: str = "runs/full"  # where the other experiments' runs are


@register
class Guideline(Experiment):
    name = "guideline"
    title = "Which normalizer: the guideline beside the lab's evidence"
    paper = ("The guideline of normkit.tools.ADVICE_TABLE (Ioffe & Szegedy 2015; Wu & He 2018; Ba et al. "
             "2016; Ulyanov et al. 2016), as nk.tools.doctor advises it")  # fmt: skip
    claim = ("Large-batch vision → BatchNorm; small-batch vision → GroupNorm; sequences → LayerNorm; "
             "style → InstanceNorm.")  # fmt: skip
    settings_class = GuidelineSettings
    presets = {"quick": {}, "tiny": {}}

    def plan(self, s, data):
        return None  # nothing is trained: the evidence is other runs' claims

    def summary(self, record: RunRecord) -> dict:
        root = Path(record.settings["runs"])
        root = root if root.is_absolute() else (Path.cwd() / root).resolve()
        evidence, found, missing = [], {}, {}
        for experiment in SOURCES:
            run = find_run(root, experiment) if root.is_dir() else None
            if run is None:
                missing[experiment] = f"normkit lab run {experiment} --out {root / experiment}"
                continue
            try:
                evidence += evidence_of(experiment, run)
                found[experiment] = str(run.directory)
            except (KeyError, TypeError) as error:
                missing[experiment] = (f"{run.directory}: its summary has no claims ({type(error).__name__}:"
                                       f" {error}); run `normkit lab report {run.directory}`")
        rows, claims = {}, []
        for key, advice in guideline_rows().items():
            tests = [e["supports"] for e in evidence if e["row"] == key and e["test"]]
            verdict, reason = row_verdict(tests)
            rows[key] = {**advice.as_dict(), "verdict": verdict, "reason": reason, "tests": len(tests)}
            judged = [t for t in tests if t is not None]
            claims.append({
                "name": key,
                "quantity": f"{advice.task}, per-device batch {advice.batches}: {advice.layer}",
                "published": asdict(Published(advice.reason, advice.source)),
                "ours": {"text": f"{sum(judged)} of {len(tests)} tests reproduced, {len(judged)} judged",
                         "n": len(tests)},
                "criterion": None, "verdict": verdict, "reason": reason, "fmt": ".3f",
            })  # fmt: skip
        return summarize(claims, runs_directory=str(root), rows=rows, evidence=evidence, found=found,
                         missing=missing)

    def run_report(self, record: RunRecord) -> RunReport:
        s = record.summary
        sections = [Section("Claims", [claims_card(s["claims"], "One claim per row of the guideline; "
                                                   "ours: the claims of the lab's runs that test it.")])]
        marks = {True: "yes", False: "**no**", None: "inconclusive"}
        for key, row in s["rows"].items():
            pieces = [e for e in s["evidence"] if e["row"] == key]
            table = Table(["experiment", "claim", "ours", "verdict", "tests the row", "command"],
                          [[e["experiment"], e["quantity"], e["value"], e["verdict"] or "(measured)",
                            marks[e["supports"]] if e["test"] else "(note)", f"`{e['command']}`"]
                           for e in pieces])  # fmt: skip
            blocks = [f"**{row['task']}, per-device batch {row['batches']} → {row['layer']}.** "
                      f"{row['reason']} ({row['source']}).", table if pieces else "No run measured this row."]
            sections.append(Section(f"{row['task']}, batch {row['batches']}", blocks))
        if s["missing"]:
            sections.append(Section("Runs not found", [
                "\n".join(f"- `{name}`: {how}" for name, how in s["missing"].items())]))
        return RunReport(headline(s), sections, self.deviations(None) + [
            f"Evidence is read from the runs under `{s['runs_directory']}`; each table gives the command "
            "that made the run."])  # fmt: skip

    def deviations(self, s):
        return [
            "The lab's networks are small and its data sets (Fashion-MNIST, a text corpus) small, so the "
            "evidence shows directions, not the published magnitudes.",
            "Nothing is trained: the Data section describes the unused `dataset` setting.",
        ]  # fmt: skip
