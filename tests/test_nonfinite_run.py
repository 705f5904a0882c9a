"""A non-finite loss in a real 3-rank run (1 teacher + 2 ZeRO-3 + AutoEP students).

The fault is a corrupted teacher checkpoint: the teacher's input-embedding row of one word
piece is NaN (its output layer is intact), as a bad shard or an overflow would leave it. Every
sequence holding that piece gets NaN teacher logits, so the student rank training on it has a
NaN KD loss, while the other rank's loss is finite. From the data plan the test knows exactly
which steps are hit: those (and only those) must be skipped on both ranks, training goes on
in between, and the third hit in a row stops the run with an error naming steps and ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import REPO, finish_ranks, start_ranks

MBS = 4
ARGS = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", f"train.micro_batch_size={MBS}",
        "--set", "train.log_every=1", "--set", "eval.num_problems=4", "--set", "eval.max_new_tokens=8",
        "--set", "logging.wandb_mode=disabled", "--set", "logging.progress=false", "--set", "topology.timeout_s=60"]
SEARCH = 16  # steps of the data plan searched for a suitable word piece


def _hits(toy_build) -> tuple[int, list[list[set]]]:
    """A word piece whose occurrences (per step, per student rank) skip some steps, then
    three in a row; and that pattern. Mirrors the trainer's data path exactly."""
    from padd_ds.recipe import load_config
    from padd_ds.data.batch import encode_examples, usable_problems
    from padd_ds.data.math import load_train_problems
    from padd_ds.data.splits import split_pool
    from padd_ds.models.loading import load_tokenizer
    from padd_ds.teacher.feed import BatchPlan

    cfg = load_config(str(REPO / "recipes" / "toy_cpu.yaml"), [f"train.micro_batch_size={MBS}"])
    tok = load_tokenizer(str(toy_build.teacher_dir))
    pool = usable_problems(tok, load_train_problems("toy"), cfg.data.max_prompt_tokens)
    train = split_pool(pool, cfg.data.split_fractions, cfg.run.seed)["C"]
    plan = BatchPlan(len(train), MBS, 2, 1, cfg.run.seed)
    special = {tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}
    where: dict[int, list[list[set]]] = {}
    for step in range(SEARCH):
        for rank in range(2):
            b = encode_examples(tok, [train[i] for i in plan.indices(step, 0, rank)], cfg.data.max_prompt_tokens,
                                cfg.data.max_response_tokens)
            for row, n in zip(b.ids, b.lengths):
                for t in set(row[: int(n) - 1].tolist()) - special:
                    where.setdefault(t, [set() for _ in range(SEARCH)])[step].add(rank)

    def score(pattern):  # (isolated hits before the first streak of 3, one-rank hits), or None
        streak = 0
        for i, ranks in enumerate(pattern):
            streak = streak + 1 if ranks else 0
            if streak == 3:
                before = pattern[: i - 2]
                return sum(map(bool, before)), sum(len(r) == 1 for r in before)
        return None

    scored = [(s, t) for t, p in where.items() if (s := score(p)) is not None and s[0] >= 2 and s[1] >= 1]
    assert scored, "no word piece of the toy data gives skipped steps before a streak of 3; raise SEARCH"
    token = max(scored)[1]
    return token, where[token]


def _poisoned_teacher(src: Path, dst: Path, token: int) -> None:
    """The teacher with embeddings untied (the output layer keeps the original rows) and the
    input row of `token` set to NaN; otherwise the same model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    reloaded = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    clean = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = torch.tensor([[t for t in range(5, 40) if t != token]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, clean(ids).logits)  # only that one row differs
        assert reloaded(torch.tensor([[5, token, 6]])).logits.isnan().all()


def _ranks(ranks: set) -> str:
    return f"student rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, sorted(ranks)))}"


def test_nonfinite_loss_skips_counts_and_stops(toy_build, tmp_path):
    token, pattern = _hits(toy_build)
    _poisoned_teacher(Path(toy_build.teacher_dir), tmp_path / "teacher", token)
    stop = next(i for i in range(2, SEARCH) if all(pattern[i - 2: i + 1]))  # 0-based: the third hit in a row
    procs = start_ranks(tmp_path / "run", ARGS + ["--set", f"models.teacher={tmp_path / 'teacher'}",
                                                  "--set", f"train.steps={stop + 5}"])
    outs = finish_ranks(procs, 400)
    assert all(p.returncode not in (0, None) for p in procs), [p.returncode for p in procs]

    # Steps 1..stop were logged: a hit step has no loss (NaN is logged as null) and bumps the count.
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/kd_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, stop + 1)), outs[0][-3000:]
    for r in rows:
        hit = bool(pattern[r["step"] - 1])
        assert (r["train/kd_loss"] is None) == hit, r
        assert r["train/nonfinite_skipped"] == sum(map(bool, pattern[: r["step"]])), r
    clean_after_hit = [r for r in rows[1:] if r["train/kd_loss"] is not None and pattern[r["step"] - 2]]
    assert clean_after_hit, "no clean step right after a skipped one"  # training went on, weights finite

    # Both students stop on their own with the same one-line error; no rank is blamed as lost.
    streak = "; ".join(f"step {s + 1} on {_ranks(pattern[s])}" for s in range(stop - 2, stop + 1))
    for rank in (0, 1):
        line = next((l for l in outs[rank].splitlines() if l.startswith("padd-ds: rank")), "")
        assert line.startswith(f"padd-ds: rank {rank} (student) failed: NonFiniteLossError: non-finite loss in 3 "
                               f"training steps in a row ({streak}); each was skipped"), outs[rank][-3000:]
    # The teacher (rank 2) says why its students left, not that it lost them.
    line = next((l for l in outs[2].splitlines() if l.startswith("padd-ds: rank 2")), "")
    assert line.startswith("padd-ds: rank 2 (teacher) failed: rank ") and \
        "(student) stopped on its own error (NonFiniteLossError: non-finite loss in 3 training steps in a row" in line \
        and "lost rank" not in line, outs[2][-3000:]
