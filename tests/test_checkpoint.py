"""Choosing the checkpoint to resume from: the newest *complete* one. A save killed before its
rename, or a checkpoint whose files were truncated or lost afterwards, is skipped with a
warning naming it and the one used instead."""

from __future__ import annotations

import json
from pathlib import Path

from padd_ds.engine.checkpoint import MARKER, _files, latest_valid


def _complete(root: Path, step: int) -> Path:
    d = root / f"step_{step}"
    (d / "zero").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"m" * (100 + step))
    (d / "zero" / "optim_states.pt").write_bytes(b"o" * 50)
    (d / MARKER).write_text(json.dumps({"step": step, "files": _files(d)}))
    return d


def test_newest_complete_checkpoint_wins(tmp_path):
    _complete(tmp_path, 2)
    want = _complete(tmp_path, 10)  # numeric, not lexical, order: step_10 > step_2
    assert latest_valid(tmp_path) == want
    assert latest_valid(tmp_path / "missing") is None


def test_truncated_latest_falls_back_with_a_warning(tmp_path, capsys):
    good = _complete(tmp_path, 2)
    bad = _complete(tmp_path, 4)
    (bad / "zero" / "optim_states.pt").write_bytes(b"o" * 10)  # truncated after the save
    assert latest_valid(tmp_path) == good
    err = capsys.readouterr().err
    assert str(bad) in err and str(good) in err and "resized" in err


def test_interrupted_saves_are_skipped(tmp_path, capsys):
    good = _complete(tmp_path, 2)
    (tmp_path / ".tmp-step_4").mkdir()                 # killed before the rename
    unmarked = tmp_path / "step_6"
    unmarked.mkdir()                                   # marker never written
    (unmarked / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert latest_valid(tmp_path) == good
    err = capsys.readouterr().err
    assert "never completed" in err and "no completion marker" in err


def test_nothing_usable_means_a_fresh_start(tmp_path, capsys):
    d = _complete(tmp_path, 3)
    (d / "mp_rank_00_model_states.pt").unlink()
    assert latest_valid(tmp_path) is None
    assert "starting fresh" in capsys.readouterr().err
