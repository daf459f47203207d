"""Trial plans: arms × seeds × grids, sweeps that pick by a stated rule, and their keys and seeds."""

import pytest

from normkit.errors import ConfigError
from normkit.lab.plan import PICKED, Arm, Plan, Sweep, highest, largest_stable, lowest


def final(key, params, loss, diverged=False, accuracy=None):
    return {"kind": "final", "trial": key, **params, "train_loss": loss, "diverged": diverged,
            "accuracy": accuracy}  # fmt: skip


def test_arms_times_seeds_times_the_grid_paired_by_seed():
    plan = Plan([Arm("bn", {"norm": "batch"}), Arm("gn", {"norm": "group"})],
                steps=lambda p: 64 // p["batch"], seeds=2, seed=10, evaluations=2,
                grid={"batch": (8, 2)})  # fmt: skip
    trials = plan.trials({})
    assert [t.key for t in trials] == [
        "bn/batch=8/seed=0", "bn/batch=2/seed=0", "gn/batch=8/seed=0", "gn/batch=2/seed=0",
        "bn/batch=8/seed=1", "bn/batch=2/seed=1", "gn/batch=8/seed=1", "gn/batch=2/seed=1",
    ]  # fmt: skip
    by_key = {t.key: t for t in trials}
    # replicate k of every arm and grid point shares the seed: the batch order is paired
    assert {t.seed for t in trials if t.params["replicate"] == 1} == {11}
    assert by_key["gn/batch=2/seed=1"].params == {"arm": "gn", "phase": "main", "norm": "group",
                                                  "batch": 2, "replicate": 1}  # fmt: skip
    assert by_key["bn/batch=2/seed=0"].steps == 32 and by_key["bn/batch=2/seed=0"].eval_every == 16


def test_an_arm_brings_its_own_grid_and_skip_drops_cells():
    plan = Plan([Arm("bn"), Arm("gbn"), Arm("sync", {"processes": 2}, grid={"batch": (2,)})],
                steps=10, eval_every=5, grid={"batch": (8, 2)},
                skip=lambda p: p["arm"] == "gbn" and p["batch"] <= 4)  # fmt: skip
    assert [t.key for t in plan.trials({})] == [
        "bn/batch=8/seed=0", "bn/batch=2/seed=0", "gbn/batch=8/seed=0", "sync/batch=2/seed=0"]


def test_a_sweep_runs_first_and_its_rule_picks_the_value_for_the_main_trials():
    sweep = Sweep("learning_rate", (0.1, 0.5, 2.0), lowest("train_loss"), steps=20, arms=("plain",))
    plan = Plan([Arm("plain"), Arm("bn")], steps=100, seeds=2, eval_every=25, sweep=sweep)
    first = plan.trials({})
    assert [t.key for t in first] == [f"sweep/plain/learning_rate={v:g}" for v in (0.1, 0.5, 2.0)]
    assert all(t.steps == 20 and t.eval_every == 5 and t.params["phase"] == "sweep" for t in first)
    losses = {0.1: 0.9, 0.5: 0.4, 2.0: 0.3}
    finals = {t.key: final(t.key, t.params, losses[t.params["learning_rate"]],
                           diverged=t.params["learning_rate"] == 2.0) for t in first}  # fmt: skip
    # 2.0 has the lowest loss but diverged: the rule takes 0.5, for both arms
    main = plan.trials(finals)[3:]
    assert {t.params["learning_rate"] for t in main} == {0.5} and len(main) == 4
    (pick,) = plan.picks(finals).values()
    assert pick["value"] == 0.5 and pick["table"][2.0]["diverged"]
    assert {t.params["learning_rate"] for t in plan.preview()[3:]} == {PICKED}


def test_sweep_rules():
    rows = {0.1: [{"diverged": False, "train_loss": 0.5, "acc": 0.7}],
            1.0: [{"diverged": False, "train_loss": 0.2, "acc": 0.8}],
            5.0: [{"diverged": False, "train_loss": 0.9, "acc": 0.6}],
            30.0: [{"diverged": True, "train_loss": None, "acc": None}]}  # fmt: skip
    assert lowest("train_loss").pick(rows) == (1.0, "")
    assert highest("acc").pick(rows) == (1.0, "")
    assert largest_stable().pick(rows) == (5.0, "")
    assert largest_stable(limit=0.6).pick(rows) == (1.0, "")
    everything_diverged = {v: [{"diverged": True, "train_loss": None}] for v in (1.0, 2.0)}
    value, note = lowest("train_loss").pick(everything_diverged)
    assert value == 1.0 and "diverged" in note
    assert "lowest final train_loss" in lowest("train_loss").description


def test_a_sweep_per_arm_picks_each_arms_own_value():
    sweep = Sweep("lr", (0.1, 1.0), highest("acc"), steps=4, by=("arm",))
    plan = Plan([Arm("a"), Arm("b")], steps=8, eval_every=4, sweep=sweep)
    best = {("a", 0.1): 0.9, ("a", 1.0): 0.5, ("b", 0.1): 0.4, ("b", 1.0): 0.8}
    finals = {t.key: final(t.key, t.params, 0.1, accuracy=best[(t.params["arm"], t.params["lr"])])
              for t in plan.trials({})}  # fmt: skip
    finals = {k: {**v, "acc": v["accuracy"]} for k, v in finals.items()}
    main = {t.params["arm"]: t.params["lr"] for t in plan.trials(finals) if t.params["phase"] == "main"}
    assert main == {"a": 0.1, "b": 1.0}


def test_plans_refuse_what_they_cannot_mean():
    with pytest.raises(ConfigError, match="distinct names"):
        Plan([Arm("a"), Arm("a")], steps=1, eval_every=1)
    with pytest.raises(ConfigError, match="either eval_every or evaluations"):
        Plan([Arm("a")], steps=1)
    with pytest.raises(ConfigError, match="per arm must sweep every arm"):
        Plan([Arm("a"), Arm("b")], steps=1, eval_every=1,
             sweep=Sweep("lr", (1,), lowest("x"), 1, arms=("a",), by=("arm",)))  # fmt: skip
    with pytest.raises(ConfigError, match="per grid setting"):
        Plan([Arm("a")], steps=1, eval_every=1, grid={"batch": (2,)},
             sweep=Sweep("lr", (1,), lowest("x"), 1))  # fmt: skip
    with pytest.raises(ConfigError, match="collide"):
        Plan([Arm("a", {"batch": 1})], steps=1, eval_every=1, grid={"batch": (2,)}).trials({})
