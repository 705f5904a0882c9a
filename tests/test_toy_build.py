"""Build the "test" toy models once and check that what it saved is loadable and shaped right."""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from padd_ds.data.toy import generate
from padd_ds.data.prompt import format_example
from padd_ds.toy.build import ToyBuildConfig, build_toy, count_params, student_phases, with_guesses


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.set_num_threads(2)
    cache = tmp_path_factory.mktemp("padd_cache")
    t = time.time()
    w = build_toy("test", cache_dir=cache)
    w.metrics["_test_build_seconds"] = time.time() - t
    return w


def test_layout_and_metrics(toy):
    assert toy.root.name.startswith("toy-test-")
    for d in (toy.tokenizer_dir, toy.teacher_dir, toy.student_dir):
        assert (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()
    for d in (toy.teacher_dir, toy.student_dir):
        assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    rows = [json.loads(line) for line in toy.heldout_file.read_text().splitlines()]
    train = [json.loads(line) for line in toy.train_file.read_text().splitlines()]
    assert set(rows[0]) == {"id", "question", "solution", "answer", "level"}
    assert {r["level"] for r in rows} == {1, 2, 3}
    assert not {r["question"] for r in rows} & {r["question"] for r in train}
    m = toy.metrics
    for who in ("teacher", "student"):
        assert 0.0 <= m[who]["heldout_accuracy"] <= 1.0
        assert m[who]["heldout_n"] == len(rows)
    assert m["build_seconds"] > 0
    assert not list(toy.root.parent.glob(".*tmp-*")), "temp build dirs must not be left behind"


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_checkpoints_reload_with_finite_logits(toy, who):
    path = getattr(toy, f"{who}_dir")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    batch = tok(["Question: Ann has 5 apples.\nAnswer:", "Question: x\nAnswer: 1 + 1 = 2."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] == len(tok)
    assert torch.isfinite(logits).all()


def test_student_is_a_smaller_active_moe(toy):
    teacher = AutoModelForCausalLM.from_pretrained(toy.teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(toy.student_dir)
    cfg = student.config
    assert type(teacher).__name__ == "Qwen3ForCausalLM"
    assert type(student).__name__ == "Qwen3MoeForCausalLM"
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.norm_topk_prob is True and cfg.decoder_sparse_step == 1 and list(cfg.mlp_only_layers) == []
    assert cfg.output_router_logits is False
    assert cfg.vocab_size == teacher.config.vocab_size
    s, t = count_params(student), count_params(teacher)
    assert s["active"] < t["active"] == t["total"]
    assert s["active"] < s["total"]
    assert toy.metrics["student"]["params"] == s and toy.metrics["teacher"]["params"] == t


def test_tokenizer_round_trips(toy):
    tok = AutoTokenizer.from_pretrained(toy.tokenizer_dir)
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    for p in generate(30, seed=99):
        text = "".join(format_example(p.question, p.solution))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    digits = tok.convert_ids_to_tokens(tok("Ann has 1234 apples", add_special_tokens=False)["input_ids"])
    assert all(len(t.strip("▁")) <= 1 for t in digits if any(c.isdigit() for c in t)), digits
    odd = "Zoë paid €3.50 — 100% {ok}\n\ttabs"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd


def test_second_call_hits_the_cache(toy):
    t = time.time()
    again = build_toy("test", cache_dir=toy.root.parent)
    assert time.time() - t < 5.0
    assert again.root == toy.root
    assert again.metrics["build_seconds"] == toy.metrics["build_seconds"]


def test_bad_profile_raises(tmp_path):
    with pytest.raises(ValueError, match="profile"):
        build_toy("huge", cache_dir=tmp_path)
    with pytest.raises(ValueError):
        ToyBuildConfig(profile="test", student_num_experts=4)


def test_guess_profile_changes_only_the_students_data():
    """The "guess" build is the demo build with half the student's solutions replaced by the
    answer alone; the demo and test builds keep the cache keys their results were measured on."""
    demo, guess = ToyBuildConfig.for_profile("demo"), ToyBuildConfig.for_profile("guess")
    assert {k: v for k, v in vars(guess).items() if getattr(demo, k) != v} == {
        "profile": "guess", "student_guess_fraction": 0.5, "student_guess_steps": 100}
    assert demo.cache_key() == "87b4972444" and ToyBuildConfig.for_profile("test").cache_key() == "6d8b8dcd1b"
    assert guess.cache_key() not in (demo.cache_key(), ToyBuildConfig(profile="guess", student_guess_fraction=0.5).cache_key())
    assert guess.cache_key() != ToyBuildConfig(profile="guess", student_guess_fraction=0.5).cache_key()
    with pytest.raises(ValueError, match="student_guess_fraction"):
        ToyBuildConfig(student_guess_fraction=1.0)
    with pytest.raises(ValueError, match="student_guess_steps"):
        ToyBuildConfig(student_guess_steps=100)  # steps on a mix without guesses


def test_with_guesses_answers_a_seeded_share_without_working():
    problems = generate(2000, seed=3)
    assert with_guesses(problems, 0.0, seed=0) is problems
    mixed = with_guesses(problems, 0.5, seed=0)
    assert mixed == with_guesses(problems, 0.5, seed=0) and mixed != with_guesses(problems, 0.5, seed=1)
    guessed = [m for m, p in zip(mixed, problems) if m != p]
    assert 900 < len(guessed) < 1100
    for m, p in zip(mixed, problems):
        assert (m.question, m.answer, m.level) == (p.question, p.answer, p.level)
        assert m.solution in (p.solution, f"#### {p.answer}")


def test_guess_student_learns_worked_solutions_first_then_the_mix():
    worked, mixed = ["worked"], ["mixed"]
    demo, guess = ToyBuildConfig.for_profile("demo"), ToyBuildConfig.for_profile("guess")
    assert student_phases(demo, worked, mixed) == [(mixed, 700, 3e-3, 50)]  # mixed is worked there (no guesses)
    assert student_phases(guess, worked, mixed) == [(worked, 700, 3e-3, 50), (mixed, 100, pytest.approx(3e-4), 10)]
    from_start = ToyBuildConfig(profile="guess", student_guess_fraction=0.25)
    assert student_phases(from_start, worked, mixed) == [(mixed, 700, 3e-3, 50)]
