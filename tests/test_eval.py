"""Evaluation: batched generation equals one-at-a-time generation, accuracy counts what the
grader accepts, sampling is seeded, chat templates are used, and `padd eval` runs every suite."""

import json

import pytest
import torch

from padd_ds.cli import main as padd
from padd_ds.data.math import SUITES
from padd_ds.data.prompt import format_prompt
from padd_ds.eval.evaluate import CHAT_INSTRUCTION, Decoding, build_prompts, evaluate_problems, generate
from padd_ds.eval.grading import extract_answer


@pytest.fixture(scope="module")
def student(toy_build):
    from padd_ds.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(str(toy_build.student_dir), "float32"), load_tokenizer(str(toy_build.student_dir))


@pytest.fixture(scope="module")
def heldout(toy_build):
    from padd_ds.data.math import load_jsonl

    return load_jsonl(toy_build.heldout_file, limit=6)


def _one_by_one(model, tok, prompts, max_new_tokens):
    """Reference: each prompt alone, no padding, plain `generate`."""
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        gen = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids["input_ids"].shape[1]:]
        row = gen.tolist()
        out.append(tok.decode(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row,
                              skip_special_tokens=True))
    return out


def test_batched_generation_equals_one_at_a_time(student, heldout):
    model, tok = student
    # Mixed lengths so batches need left padding, and order differs from length order.
    prompts = [format_prompt(p["question"]) for p in heldout] + [format_prompt("Tom has 3 apples. How many?")]
    batched = [o[0] for o in generate(model, tok, prompts, Decoding(24, batch_size=3))]
    assert batched == _one_by_one(model, tok, prompts, 24)


def test_accuracy_counts_what_the_grader_accepts(student, heldout):
    model, tok = student
    responses = _one_by_one(model, tok, [format_prompt(p["question"]) for p in heldout], 24)
    answers = [extract_answer(r) for r in responses]
    assert all(a is not None for a in answers)
    # References: the model's own final answer for the first four problems, a wrong one after.
    problems = [{**p, "answer": a if i < 4 else "-987654", "level": "easy" if i < 2 else "hard"}
                for i, (p, a) in enumerate(zip(heldout, answers))]
    res = evaluate_problems(model, tok, problems, Decoding(max_new_tokens=24, batch_size=4), keep_records=None)
    assert res["accuracy"] == pytest.approx(4 / 6) and res["n"] == 6
    assert res["per_level"] == {"easy": 1.0, "hard": pytest.approx(0.5)}
    assert [r["correct"] for r in res["samples"]] == [True] * 4 + [False] * 2
    assert [r["response"] for r in res["samples"]] == responses


def test_sampling_is_seeded_and_counts_k_answers(student, heldout):
    model, tok = student
    prompts = [format_prompt(p["question"]) for p in heldout[:3]]

    def sample(seed):
        torch.manual_seed(seed)
        return generate(model, tok, prompts, Decoding(16, batch_size=4, samples=3, temperature=1.0, top_p=1.0))

    a, b, c = sample(1), sample(1), sample(2)
    assert [len(x) for x in a] == [3, 3, 3]
    assert a == b and a != c
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, prompts, Decoding(8, samples=2, temperature=0.0))
    problems = [{**p, "answer": "-987654"} for p in heldout[:3]]
    res = evaluate_problems(model, tok, problems, Decoding(8, samples=2, temperature=1.0))
    assert res["avg@2"] == 0.0 and res["pass@2"] == 0.0 and all(r["sampled_correct"] == 0 for r in res["samples"])


def test_chat_template_is_used_when_present(toy_build):
    from padd_ds.models.loading import load_tokenizer

    tok = load_tokenizer(str(toy_build.student_dir))
    assert build_prompts(tok, ["Q?"]) == (["Question: Q?\nAnswer:"], True)
    with pytest.raises(ValueError, match="chat template"):
        build_prompts(tok, ["Q?"], "chat")
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    prompts, special = build_prompts(tok, ["Q?"])
    assert prompts == [f"<u>Q?\n{CHAT_INSTRUCTION}</u><a>"] and special is False
    assert build_prompts(tok, ["Q?"], "plain") == (["Question: Q?\nAnswer:"], True)


@pytest.mark.parametrize("suite", ["toy", "gsm8k", "math5"])
def test_padd_eval_runs_every_suite(toy_build, tmp_path, capsys, suite):
    out = tmp_path / f"{suite}.json"
    rc = padd(["eval", "--model", str(toy_build.student_dir), "--suite", suite, "--limit", "2",
               "--max-new-tokens", "8", "--batch-size", "8", "--threads", "1", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    names = list(SUITES[suite])
    assert list(res["benchmarks"]) == names
    for name in names:
        assert name in printed
        b = res["benchmarks"][name]
        assert b["n"] == 2 and len(b["records"]) == 2 and all(isinstance(r["response"], str) for r in b["records"])
        assert b["pass@1"] == sum(r["correct"] for r in b["records"]) / 2
    assert "average" in printed and res["average"]["n"] == 2 * len(names)
    assert res["average"]["pass@1"] == pytest.approx(sum(b["pass@1"] for b in res["benchmarks"].values()) / len(names))
    assert res["settings"]["max_new_tokens"] == 8 and res["model"] == str(toy_build.student_dir)


def test_padd_eval_sampled_and_bad_arguments(toy_build, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert padd(["eval", "--model", str(toy_build.student_dir), "--suite", "gsm8k", "--limit", "2", "--samples", "2",
                 "--temperature", "0.8", "--max-new-tokens", "8", "--threads", "1", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"pass@1", "avg@2", "pass@2"} <= set(res["average"]) and "avg@2" in capsys.readouterr().out
    assert padd(["eval", "--model", str(toy_build.student_dir), "--samples", "2", "--temperature", "0"]) == 2
    assert padd(["eval", "--model", str(tmp_path / "missing"), "--suite", "gsm8k"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("suite", ["gsm8k", "math5"])
def test_the_run_evaluates_its_configured_suite(student, suite):
    """The trainer's before/after accuracy is eval.suite's (the paper recipes use math5), not the
    toy split: the mean over the suite's benchmarks, each graded on its own problems."""
    from padd_ds.config import PaddConfig
    from padd_ds.data.math import load_suite
    from padd_ds.eval.heldout import heldout_accuracy

    cfg = PaddConfig()
    cfg.eval.suite, cfg.eval.num_problems, cfg.eval.max_new_tokens = suite, 2, 8
    res = heldout_accuracy(*student, cfg)
    assert list(res["per_benchmark"]) == list(SUITES[suite]) and res["n"] == 2 * len(SUITES[suite])
    model, tok = student
    expect = {name: evaluate_problems(model, tok, problems, Decoding(8, cfg.eval.batch_size))["accuracy"]
              for name, problems in load_suite(suite, limit=2).items()}
    assert res["per_benchmark"] == expect
    assert res["accuracy"] == pytest.approx(sum(expect.values()) / len(expect))
