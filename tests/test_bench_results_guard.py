"""bench/reproduce_table.py's guard on committed results (issue 17): a smoke run (--quick) never
replaces a full result, nor a run on one toy build a result on another; and each run's default
--out is where that guard expects it. Checked on the committed tables, before any run starts."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import REPO

SCRIPT = REPO / "bench" / "reproduce_table.py"


@pytest.fixture
def table(monkeypatch):
    monkeypatch.delenv("PADD_TOY_PROFILE", raising=False)  # parse_args sets it for the runs it starts
    spec = importlib.util.spec_from_file_location("reproduce_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_out_is_per_build_and_quick_goes_to_its_own_folder(table):
    assert table.parse_args([]).out == table.RESULTS
    guess = table.parse_args(["--toy-profile", "guess"])
    assert guess.out == table.RESULTS / "toy_guess"
    assert os.environ["PADD_TOY_PROFILE"] == "guess"  # every arm inherits the build
    assert table.parse_args(["--quick"]).out == table.QUICK_RESULTS
    assert table.parse_args(["--quick", "--toy-profile", "guess"]).out == table.QUICK_RESULTS / "toy_guess"


@pytest.mark.parametrize("sub,profile", [("", "demo"), ("toy_guess", "guess")])
def test_committed_full_tables_are_full_runs_on_their_build(table, sub, profile):
    args = json.loads((table.RESULTS / sub / "reproduce_table.json").read_text())["args"]
    assert not args["quick"] and len(args["seeds"]) >= 3 and args.get("toy_profile", "demo") == profile


def test_quick_refuses_to_replace_a_full_result(table):
    with pytest.raises(SystemExit, match="holds a full run's result; --quick does not replace it"):
        table.parse_args(["--quick", "--toy-profile", "guess", "--out", str(table.RESULTS / "toy_guess")])


def test_a_run_on_one_build_refuses_a_result_on_another(table, tmp_path):
    full = json.loads((table.RESULTS / "reproduce_table.json").read_text())  # the demo build's
    (tmp_path / "reproduce_table.json").write_text(json.dumps(full))
    with pytest.raises(SystemExit, match="holds a result on the demo toy build"):
        table.parse_args(["--toy-profile", "guess", "--out", str(tmp_path)])
    assert table.parse_args(["--out", str(tmp_path)]).out == tmp_path  # the same build: a rerun may replace it
