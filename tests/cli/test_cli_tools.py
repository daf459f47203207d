"""`normkit doctor` and `normkit fold`: the wiring with CliRunner, on a model factory written to a
temporary package; every file is read back with weights_only=True."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from normkit.cli.main import app
from normkit.errors import ConfigError
from normkit.tools.loading import load_factory, load_weights, parse_shape

runner = CliRunner()

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn
    import normkit as nk

    def small():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3), nk.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
        )

    class Mistakes(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small()
            self.out_norm = nn.BatchNorm1d(10, eps=0.0)

        def forward(self, x):
            return self.out_norm(self.net(x))
    """
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "nk_cli_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield "nk_cli_models"
    sys.modules.pop("nk_cli_models", None)


@pytest.fixture
def trained_weights(factory_module, tmp_path):
    model = load_factory(f"{factory_module}:small")
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8) * 2 + 1)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    return path


def test_help_lists_the_tool_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "doctor" in result.output and "fold" in result.output


def test_doctor_json_finds_the_mistakes(factory_module):
    result = runner.invoke(
        app,
        ["doctor", "--model", f"{factory_module}:Mistakes", "--input-shape", "4,3,8,8",
         "--batch-size", "4", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    codes = {f["code"] for f in report["findings"]}
    assert {"bias-before-norm", "small-batch", "eps-not-positive", "never-updated",
            "norm-after-final-layer"} <= codes  # fmt: skip
    assert report["advice"]["spec"] == "group:2" and report["task"] == "vision"  # channels 8, 10


def test_doctor_table_on_trained_weights(factory_module, trained_weights):
    result = runner.invoke(
        app,
        ["doctor", "--model", f"{factory_module}:small", "--weights", str(trained_weights),
         "--input-shape", "2,3,8,8", "--batch-size", "64"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bias-before-norm" in result.output and "never-updated" not in result.output
    assert "advice for vision" in result.output


def test_fold_saves_a_state_dict_that_loads_with_weights_only(
    factory_module, trained_weights, tmp_path
):
    out = tmp_path / "folded.pt"
    result = runner.invoke(
        app,
        ["fold", "--model", f"{factory_module}:small", "--weights", str(trained_weights),
         "--out", str(out), "--input-shape", "2,3,8,8", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["folded"]) == 2 and report["max_relative_error"] < 1e-5
    state = torch.load(out, weights_only=True)
    assert "1.running_mean" not in state and "0.weight" in state
    # rebuild the folded model as the help says, load the file, compare with the original
    from normkit.tools import fold_batchnorm

    original = load_weights(load_factory(f"{factory_module}:small"), trained_weights).eval()
    x = torch.randn(2, 3, 8, 8)
    folded, _ = fold_batchnorm(load_factory(f"{factory_module}:small").eval(), x)
    folded.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original(x), rtol=1e-5, atol=1e-5)


class NotATensor:
    pass


def test_weights_are_never_unpickled(factory_module, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": NotATensor()}, path)
    model = load_factory(f"{factory_module}:small")
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_weights(model, path)


def test_bad_model_specs_and_shapes():
    for spec, words in [("no_colon", "package.module:factory"),
                        ("no_such_module_xyz:f", "cannot import"),
                        ("json:no_such_factory", "no attribute"),
                        ("json:__doc__", "not callable")]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            load_factory(spec)
    assert parse_shape("8,3,32,32") == (8, 3, 32, 32)
    with pytest.raises(ConfigError, match="input-shape"):
        parse_shape("8,three")


def test_cli_errors_are_normkit_errors(factory_module):
    """main() prints a NormkitError as one line and a hint; here the error itself is checked."""
    result = runner.invoke(app, ["doctor", "--model", "missing_module_xyz:f"])
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)


@pytest.mark.parametrize("command", ["doctor", "fold"])
def test_a_file_in_the_current_directory_never_shadows_an_installed_package(tmp_path, command):
    """A stray ./sympy.py beside the user's ./my_models.py: code importing sympy (torch does,
    lazily) must get the installed package, not the stray file, whichever command loads the model."""
    import subprocess

    (tmp_path / "sympy.py").write_text("raise SystemExit('the stray ./sympy.py was imported')\n")
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build():
                import sympy  # the installed package (torch's dependency)

                assert hasattr(sympy, "Symbol"), sympy.__file__
                return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
            """
        )
    )
    normkit = str(Path(sys.executable).parent / "normkit")
    extra = ["--out", str(tmp_path / "folded.pt")] if command == "fold" else []
    result = subprocess.run(
        [normkit, command, "--model", "my_models:build", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stray" not in result.stdout + result.stderr


def test_load_factory_searches_the_current_directory_last(tmp_path, monkeypatch):
    (tmp_path / "only_here.py").write_text("from torch import nn\nbuild = nn.Identity\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "only_here", raising=False)
    assert isinstance(load_factory("only_here:build"), torch.nn.Identity)
    assert sys.path[-1] == str(tmp_path)  # found, and after every installed package
