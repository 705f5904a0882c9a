"""The student ranks split a held-out evaluation (before training and of the export), each with
its own whole copy and at its own pace: 2 gloo ranks give exactly the accuracy of one rank
answering every problem, also when a rank has no problem at all.

The test toy student answers "2" to every held-out question, so the answers are set to make
problems 0, 1 and 5 of 7 right: 3/7 only if each rank's answers land on their own problems and
both ranks' count (rank 0 alone: 1/7, rank 1 alone: 2/7, counted twice: 6/7)."""

from __future__ import annotations

from conftest import spawn_gloo_ranks


def _problems(rows: list[dict]) -> list[dict]:
    return [{**p, "answer": "2" if i in (0, 1, 5) else "3"} for i, p in enumerate(rows)]


def _rank(rank: int, student_dir: str, heldout: str) -> list[float]:
    from padd_ds.data.math import load_jsonl
    from padd_ds.eval.evaluate import Decoding
    from padd_ds.eval.heldout import shared_accuracy
    from padd_ds.models.loading import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(student_dir, "float32"), load_tokenizer(student_dir)
    problems = _problems(load_jsonl(heldout, limit=7))
    return [shared_accuracy(model, tok, problems[:n], Decoding(12, 2), rank, 2, synced=False)["accuracy"]
            for n in (7, 1)]  # 4 + 3 problems; 1 problem: rank 1 has none


def test_split_evaluation_equals_one_rank(toy_build):
    from padd_ds.data.math import load_jsonl
    from padd_ds.eval.evaluate import Decoding, evaluate_problems
    from padd_ds.models.loading import load_causal_lm, load_tokenizer

    student, heldout = str(toy_build.student_dir), str(toy_build.heldout_file)
    got = spawn_gloo_ranks(_rank, student, heldout)
    model, tok = load_causal_lm(student, "float32"), load_tokenizer(student)
    problems = _problems(load_jsonl(heldout, limit=7))
    # One rank answering all, in batches of 2 as each rank does with its share.
    want = [evaluate_problems(model, tok, problems[:n], Decoding(12, 2))["accuracy"] for n in (7, 1)]
    assert want == [3 / 7, 1.0], want  # the toy's "2" everywhere: the pattern above
    assert got[0] == got[1] == want, (got, want)
