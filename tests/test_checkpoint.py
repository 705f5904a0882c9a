"""Choosing the checkpoint to resume from: the newest *complete and intact* one. A save killed
before its rename, or a checkpoint whose files were lost, truncated or changed afterwards
(sizes checked first, then each file's sha256 from the completion marker), is skipped with a
warning naming it, the damaged file and the checkpoint used instead."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import REPO, deepspeed_cmd, read_results, run_cmd
from padd_ds.engine.checkpoint import MARKER, file_sizes, hash_share, latest_valid, mark_complete


def _complete(root: Path, step: int) -> Path:
    d = root / f"step_{step}"
    (d / "zero").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"m" * (100 + step))
    (d / "zero" / "optim_states.pt").write_bytes(bytes(range(256)) * 4)
    mark_complete(d, step)
    return d


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01  # same size: only a checksum can tell
    path.write_bytes(bytes(data))


def test_marker_records_every_files_size_and_sha256(tmp_path):
    d = _complete(tmp_path, 3)
    marker = json.loads((d / MARKER).read_text())
    assert marker["step"] == 3
    assert marker["files"] == {
        name: {"size": (d / name).stat().st_size, "sha256": hashlib.sha256((d / name).read_bytes()).hexdigest()}
        for name in ("mp_rank_00_model_states.pt", "zero/optim_states.pt")}


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
    assert str(bad) in err and str(good) in err and "resized ['zero/optim_states.pt']" in err


def test_changed_byte_falls_back_naming_the_file(tmp_path, capsys):
    good = _complete(tmp_path, 2)
    bad = _complete(tmp_path, 4)
    _flip_byte(bad / "zero" / "optim_states.pt", 700)
    assert latest_valid(tmp_path) == good
    err = capsys.readouterr().err
    assert (f"warning: checkpoint {bad} is unusable (checksum mismatch in zero/optim_states.pt); "
            f"resuming from {good} instead") in err


def test_old_marker_without_checksums_is_checked_on_sizes(tmp_path, capsys):
    """Markers of padd-ds before checksums hold {file: size}: still resumable, with a note."""
    d = _complete(tmp_path, 2)
    (d / MARKER).write_text(json.dumps({"step": 2, "files": file_sizes(d)}))
    assert latest_valid(tmp_path) == d
    assert f"note: checkpoint {d} has no checksums" in capsys.readouterr().err
    (d / "mp_rank_00_model_states.pt").write_bytes(b"m")
    assert latest_valid(tmp_path) is None


def test_hash_share_deals_each_file_to_one_rank_and_balances_bytes():
    # A 4-rank ZeRO-3 checkpoint: name order would give ranks 0 and 2 every optimizer shard.
    sizes = {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt": size
             for r in range(4) for kind, size in (("model", 50), ("optim", 1000))}
    for world in (1, 2, 3, 4):
        shares = [hash_share(sizes, r, world) for r in range(world)]
        assert sorted(n for s in shares for n in s) == sorted(sizes)
        loads = [sum(sizes[n] for n in s) for s in shares]
        assert max(loads) - min(loads) <= 1000, (world, loads)  # at most one large file apart
    assert [sum(sizes[n] for n in hash_share(sizes, r, 2)) for r in (0, 1)] == [2100, 2100]


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


RUN = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "train.save_every=2", "--set", "train.keep_last=2",
       "--set", "train.log_every=1", "--set", "train.micro_batch_size=4", "--set", "eval.num_problems=4",
       "--set", "eval.max_new_tokens=8", "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false",
       "--set", "topology.timeout_s=120"]
DETERMINISTIC = ("step", "train/kd_loss", "train/lm_loss", "train/lr")


def test_damaged_shard_of_a_real_run_resumes_from_the_previous_checkpoint(toy_build, tmp_path):
    """2 ZeRO-3 + AutoEP student ranks and a teacher save step_2 and step_4; one byte of a
    student rank 1 optimizer shard of step_4 changes (same size). The restart verifies the
    checksums over both student ranks, names the file, and continues from step_2 exactly."""
    def run(steps: int):
        return run_cmd(deepspeed_cmd(3, *RUN, "--set", f"run.output_dir={tmp_path}", "--set", f"train.steps={steps}"),
                       timeout=300)

    run(4)
    first = read_results(tmp_path)["history"]
    ckpts = tmp_path / "checkpoints"
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert shard in hash_share(file_sizes(ckpts / "step_4"), 1, 2)  # student rank 1 verifies it, rank 0 hears
    _flip_byte(ckpts / "step_4" / shard, (ckpts / "step_4" / shard).stat().st_size // 2)

    p = run(6)
    out = p.stdout + p.stderr
    assert (f"warning: checkpoint {ckpts / 'step_4'} is unusable (checksum mismatch in {shard}); "
            f"resuming from {ckpts / 'step_2'} instead") in out, out[-4000:]
    assert f"[resume] continuing from {ckpts / 'step_2'} (step 2)" in out
    again = read_results(tmp_path)["history"]
    assert [h["step"] for h in again] == [1, 2, 3, 4, 5, 6]
    # steps 3-4 retrained from step_2 are the first run's steps 3-4, bit for bit
    assert [{k: h[k] for k in DETERMINISTIC} for h in again[:4]] == [{k: h[k] for k in DETERMINISTIC} for h in first]
    assert sorted(d.name for d in ckpts.iterdir() if d.is_dir()) == ["step_4", "step_6"]
    assert latest_valid(ckpts) == ckpts / "step_6"
