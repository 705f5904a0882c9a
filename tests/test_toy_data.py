"""The toy generator: arithmetic is right, answers follow GSM8K, output is deterministic."""

import re
from collections import Counter

import pytest

from padd_ds.data.prompt import format_example, format_prompt
from padd_ds.data.toy import MAX_VALUE, ToyProblem, generate, toy_splits

STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def problems() -> list[ToyProblem]:
    return generate(900, seed=123)


def test_answer_equals_expression(problems):
    for p in problems:
        assert eval(p.expression) == int(p.answer), p  # noqa: S307 - our own arithmetic strings


def test_solution_ends_with_answer(problems):
    for p in problems:
        head, sep, tail = p.solution.rpartition("####")
        assert sep and head.strip(), p.solution
        assert tail.strip() == p.answer


def test_every_step_is_correct_and_chained(problems):
    for p in problems:
        steps = STEP.findall(p.solution)
        assert len(steps) == p.level, p.solution
        prev = None
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, p.solution
            assert 0 <= c <= MAX_VALUE
            if op == "*":
                assert 2 <= b <= 4  # small factors
            if prev is not None:
                assert a == prev, "each step starts from the previous result"
            prev = c
        assert prev == int(p.answer)


def test_operands_come_from_the_question(problems):
    for p in problems:
        numbers = re.findall(r"\d+", p.question)
        operands = [b for _, _, b, _ in STEP.findall(p.solution)]
        assert numbers == [STEP.findall(p.solution)[0][0], *operands], (p.question, p.solution)


def test_levels_and_variety(problems):
    assert Counter(p.level for p in problems) == {1: 300, 2: 300, 3: 300}
    ops = Counter(op for p in problems for _, op, _, _ in STEP.findall(p.solution))
    assert all(ops[o] > 100 for o in "+-*"), ops
    assert len({p.question.split()[0] for p in problems}) > 20  # names / openings vary
    assert len({p.question.rsplit(" ", 4)[0].split(".")[-1] for p in problems}) > 3  # question templates vary
    assert len({p.question for p in problems}) == len(problems)


def test_deterministic_for_a_seed():
    assert generate(200, seed=7) == generate(200, seed=7)
    assert generate(200, seed=7) != generate(200, seed=8)
    assert generate(50, seed=7, levels=(2,)) == generate(50, seed=7, levels=(2,))
    assert {p.level for p in generate(50, seed=7, levels=(2,))} == {2}


def test_splits_disjoint_deterministic_and_cover_levels():
    train, held = toy_splits(600, 90, seed=3)
    assert len(train) == 600 and len(held) == 90
    assert not {p.question for p in train} & {p.question for p in held}
    assert {p.level for p in train} == {p.level for p in held} == {1, 2, 3}
    assert len({p.id for p in train + held}) == 690
    assert toy_splits(600, 90, seed=3) == (train, held)
    assert toy_splits(600, 90, seed=4)[1] != held


@pytest.mark.parametrize(
    "call",
    [
        lambda: generate(-1, 0),
        lambda: generate(5, 0, levels=()),
        lambda: generate(5, 0, levels=(0,)),
        lambda: generate(5, 0, levels=(4,)),
        lambda: toy_splits(2, 10, 0),
        lambda: toy_splits(10, 0, 0),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_prompt_format():
    assert format_prompt("What is 2 + 2?") == "Question: What is 2 + 2?\nAnswer:"
    prompt, response = format_example("Q?", "2 + 2 = 4. #### 4")
    assert prompt == "Question: Q?\nAnswer:" and response == " 2 + 2 = 4. #### 4"
    with pytest.raises(TypeError):
        format_prompt(None)
