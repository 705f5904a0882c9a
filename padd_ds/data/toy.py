"""Synthetic arithmetic word problems in the GSM8K answer convention.

The toy build needs a task that a ~1M-parameter transformer can learn on two CPU
cores in minutes, yet that still looks like GSM8K: a short story, a step-by-step
solution and a final ``#### <number>`` line. Each problem is a chain of 1-3
operations (+, -, * with small factors) on a running count, and every
intermediate value stays a non-negative integer below 100.

The solution restates each sentence of the story, then does its one step:
``"Ann has 5 apples. She buys 3 more. 5 + 3 = 8. She gives 2 apples to Ben.
8 - 2 = 6. #### 6"``. We measured this against the compact ``"5 + 3 = 8. 8 - 2 =
6. #### 6"``: with the compact form a 1M-parameter model must find "the i-th
operation sentence" by counting, and after 1000 steps it still picked the wrong
operand or operator in a third of the steps. Restating the sentence turns that
into verbatim copying (which induction heads learn fast) and puts the operator
word and operand right next to the equation, so the same model reaches ~0.9
held-out accuracy. The + and - operands are single digits (carries and borrows
remain), which keeps the arithmetic fact table small.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Sequence

MAX_VALUE = 99  # every intermediate value stays at most 2 digits
MAX_LEVEL = 3
MAX_START = 50  # first count in the story
MAX_OPERAND = 9  # + and - operands are single digits: carries and borrows, but a small fact table
MAX_FACTOR = 4  # * operands are 2..MAX_FACTOR

# (name, subject pronoun, object pronoun)
_PEOPLE: tuple[tuple[str, str, str], ...] = (
    ("Ann", "she", "her"), ("Ben", "he", "him"), ("Carla", "she", "her"), ("David", "he", "him"),
    ("Emma", "she", "her"), ("Farid", "he", "him"), ("Grace", "she", "her"), ("Hugo", "he", "him"),
    ("Iris", "she", "her"), ("Jamal", "he", "him"), ("Kira", "she", "her"), ("Liam", "he", "him"),
    ("Maya", "she", "her"), ("Noah", "he", "him"), ("Olga", "she", "her"), ("Pedro", "he", "him"),
    ("Quinn", "she", "her"), ("Ravi", "he", "him"), ("Sara", "she", "her"), ("Tom", "he", "him"),
    ("Uma", "she", "her"), ("Victor", "he", "him"), ("Wendy", "she", "her"), ("Yusuf", "he", "him"),
    ("Zoe", "she", "her"), ("Omar", "he", "him"), ("Lucia", "she", "her"), ("Kenji", "he", "him"),
    ("Nina", "she", "her"), ("Sam", "he", "him"), ("Aisha", "she", "her"), ("Marco", "he", "him"),
)

_OBJECTS: tuple[str, ...] = (
    "apples", "books", "marbles", "stickers", "pencils", "cookies", "shells", "coins", "stamps",
    "cards", "balloons", "flowers", "candies", "toy cars", "eggs", "oranges", "buttons", "beads",
    "crayons", "rocks", "cupcakes", "tickets", "pens", "bottles", "plums", "blocks", "kites",
    "muffins", "ribbons", "nuts",
)

# Templates use {name}, {sub}/{Sub} (subject pronoun), {obj_p} (object pronoun),
# {friend}, {item} (plural noun), {a} (start count) and {k} (operand).
_START: tuple[str, ...] = (
    "{name} has {a} {item}.",
    "{name} starts with {a} {item}.",
    "{name} collected {a} {item}.",
    "{name} owns {a} {item}.",
    "There are {a} {item} in {name}'s bag.",
)
_ADD: tuple[str, ...] = (
    "{Sub} buys {k} more.",
    "{Sub} finds {k} more {item}.",
    "{friend} gives {obj_p} {k} {item}.",
    "Then {sub} gets {k} more {item}.",
    "{Sub} picks up another {k}.",
)
_SUB: tuple[str, ...] = (
    "{Sub} gives {k} {item} to {friend}.",
    "{Sub} loses {k} of them.",
    "{Sub} sells {k} {item}.",
    "Then {sub} uses {k} {item}.",
    "{friend} takes {k} {item} from {obj_p}.",
)
_MUL: tuple[str, ...] = (
    "{Sub} then has {k} times as many {item}.",
    "The number of {item} grows {k} times.",
    "{Sub} makes the pile {k} times bigger.",
    "Each of {name}'s {item} is swapped for {k} new ones.",
)
_ASK: tuple[str, ...] = (
    "How many {item} does {name} have now?",
    "How many {item} does {name} have in the end?",
    "How many {item} are there now?",
    "How many {item} does {sub} have at the end?",
)


@dataclass(frozen=True)
class ToyProblem:
    """One word problem; ``eval(expression) == int(answer)`` always holds."""

    id: str
    question: str
    solution: str
    answer: str
    level: int
    expression: str


def _next_op(rng: random.Random, cur: int) -> tuple[str, int]:
    """Pick an operation and operand that keep the running value in [0, MAX_VALUE]."""
    ops = []
    if cur < MAX_VALUE:
        ops.append("+")
    if cur > 0:
        ops.append("-")
    if 1 <= cur <= MAX_VALUE // 2:
        ops.append("*")
    op = rng.choice(ops)
    if op == "+":
        return op, rng.randint(1, min(MAX_OPERAND, MAX_VALUE - cur))
    if op == "-":
        return op, rng.randint(1, min(MAX_OPERAND, cur))
    return op, rng.randint(2, min(MAX_FACTOR, MAX_VALUE // cur))


def _make_problem(rng: random.Random, level: int, pid: str) -> ToyProblem:
    name, sub, obj_p = rng.choice(_PEOPLE)
    friend = rng.choice([p[0] for p in _PEOPLE if p[0] != name])
    item = rng.choice(_OBJECTS)
    a = rng.randint(1, MAX_START)
    fields = dict(name=name, sub=sub, Sub=sub.capitalize(), obj_p=obj_p, friend=friend, item=item)

    sentences = [rng.choice(_START).format(a=a, **fields)]
    steps: list[str] = [sentences[0]]  # the solution restates each story sentence, then computes
    expression = str(a)
    cur = a
    for i in range(level):
        op, k = _next_op(rng, cur)
        template = rng.choice({"+": _ADD, "-": _SUB, "*": _MUL}[op])
        sentences.append(template.format(k=k, **fields))
        steps.append(sentences[-1])
        new = cur + k if op == "+" else cur - k if op == "-" else cur * k
        assert 0 <= new <= MAX_VALUE, (cur, op, k)
        steps.append(f"{cur} {op} {k} = {new}.")
        expression = f"{expression} {op} {k}" if i == 0 else f"({expression}) {op} {k}"
        cur = new
    sentences.append(rng.choice(_ASK).format(**fields))
    return ToyProblem(
        id=pid,
        question=" ".join(sentences),
        solution=" ".join(steps) + f" #### {cur}",
        answer=str(cur),
        level=level,
        expression=expression,
    )


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(levels)
    if not levels or any(not isinstance(lv, int) or not 1 <= lv <= MAX_LEVEL for lv in levels):
        raise ValueError(f"levels must be a non-empty sequence of ints in 1..{MAX_LEVEL}, got {levels!r}")
    return levels


def generate(n: int, seed: int, levels: Sequence[int] = (1, 2, 3)) -> list[ToyProblem]:
    """Generate ``n`` problems with distinct question texts, deterministic for ``seed``.

    Levels cycle in the given order, so any ``n >= len(levels)`` covers every level.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    levels = _check_levels(levels)
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[ToyProblem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 20 * n + 1000:  # the problem space is huge; this only trips on a bug
            raise RuntimeError(f"could not generate {n} distinct problems")
        level = levels[len(out) % len(levels)]
        p = _make_problem(rng, level, f"toy-{seed}-{len(out):06d}")
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def toy_splits(n_train: int, n_heldout: int, seed: int) -> tuple[list[ToyProblem], list[ToyProblem]]:
    """Train and held-out sets, disjoint by question text, each covering levels 1-3."""
    if n_train < MAX_LEVEL or n_heldout < MAX_LEVEL:
        raise ValueError(f"need at least {MAX_LEVEL} problems per split to cover every level, "
                         f"got n_train={n_train}, n_heldout={n_heldout}")
    pool = generate(n_train + n_heldout, seed)
    # generate() cycles levels, so both slices start at level 1 and cover all levels.
    heldout = [replace(p, id=f"toy-heldout-{i:06d}") for i, p in enumerate(pool[:n_heldout])]
    train = [replace(p, id=f"toy-train-{i:06d}") for i, p in enumerate(pool[n_heldout:])]
    return train, heldout
