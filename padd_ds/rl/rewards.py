"""Verifiable rewards and group-relative advantages (the signal shared by Stages II-IV).

    r = reward_correct * [grade(response, reference)] + reward_format * [final-answer marker]
        + reward_steps * (share of the reference solution's equations the response contains)

Correctness comes from `padd_ds.eval.grading.grade`, the grader evaluation uses too, so
the reward and the reported accuracy can never disagree. The format term rewards an
explicit final-answer marker that the grader reads before its last-number fallback:
`#### x`, a non-empty `\\boxed{...}`, or "the answer is x". It is small (see
`Stage3Config.reward_format`) and exists for groups in which every answer is wrong: without
it their rewards are all equal and their advantages all zero.

The step term (off by default) is partial credit for the way there: each binary equation
`a op b = c` of the reference solution (the toy's "5 + 3 = 8.", GSM8K's "<<5+3=8>>") counts
once if the response states it with the same numbers. A wrong intermediate result loses its
own credit and that of every later step that builds on it, so the reward grades how far a
response got instead of 0 for all but the right answers.

A_i = (r_i - mean_g r) / std_g r within each group of G responses to one prompt, with the
population std (divide by G, not G - 1): the advantages of a group then have mean 0 and
mean square exactly 1 whatever G is (G = 2 with rewards {0, 1} gives exactly -1 and +1),
which is the scale `Stage2Config.advantage_scale` (kappa) assumes. A group whose rewards are all equal
carries no preference; its advantages are exactly 0 and it is counted, not divided by ~0.
"""

from __future__ import annotations

import re

import torch

from padd_ds.config import Stage3Config
from padd_ds.eval.grading import grade

# The grader's explicit answer markers, each followed by a non-empty answer. `\boxed{}`
# with nothing inside is no answer.
_MARKER = re.compile(r"####[ \t]*\S|\\boxed\{\s*[^\s}]|answer is[ \t]*:?[ \t]*\S", re.IGNORECASE)


def has_answer_marker(response: str) -> bool:
    """True when the response states its final answer with `####`, `\\boxed{}` or "the answer is"."""
    return isinstance(response, str) and _MARKER.search(response) is not None


# A binary equation with numeric operands: "5 + 3 = 8", "48/2=24" (inside GSM8K's <<...>>).
_EQUATION = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([-+*/x\u00d7\u00f7])\s*(\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)(?![\d])")
_OPS = {"x": "*", "\u00d7": "*", "\u00f7": "/"}


def equations(text: str) -> list[tuple[float, str, float, float]]:
    """The binary equations `a op b = c` of `text`, as numbers (op one of + - * /)."""
    return [(float(a), _OPS.get(op, op), float(b), float(c)) for a, op, b, c in _EQUATION.findall(text or "")]


def step_credit(response: str, solution: str | None, correct: float) -> float:
    """The share of the reference solution's equations that `response` states, each matched at
    most once. A solution without equations has one step, the answer: credit = `correct`."""
    ref = equations(solution or "")
    if not ref:
        return correct
    said = equations(response)
    hits = 0
    for eq in ref:
        if eq in said:
            said.remove(eq)
            hits += 1
    return hits / len(ref)


def reward(response: str, reference: str, cfg: Stage3Config,
           solution: str | None = None) -> tuple[float, dict[str, float]]:
    """The scalar reward of one response and its parts ({"correct": 0/1, "format": 0/1, and with
    stage3.reward_steps > 0 "steps": the step credit against the reference `solution`})."""
    correct = 1.0 if grade(response, reference) else 0.0
    formatted = 1.0 if has_answer_marker(response) else 0.0
    r, parts = cfg.reward_correct * correct + cfg.reward_format * formatted, {"correct": correct, "format": formatted}
    if cfg.reward_steps:
        parts["steps"] = step_credit(response, solution, correct)
        r += cfg.reward_steps * parts["steps"]
    return r, parts


def score(responses: list[str], problems: list[dict], group_size: int,
          cfg: Stage3Config) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Rewards [len(problems), group_size] of a rollout batch (response i answers problem
    i // group_size: each problem's group in turn) and each response's parts."""
    if len(responses) != len(problems) * group_size:
        raise ValueError(f"{len(responses)} responses for {len(problems)} problems x {group_size} (stage3.group_size)")
    scored = [reward(r, problems[i // group_size]["answer"], cfg, problems[i // group_size].get("solution"))
              for i, r in enumerate(responses)]
    return torch.tensor([x for x, _ in scored]).view(-1, group_size), [d for _, d in scored]


def shuffled(advantages: torch.Tensor, seed: int) -> torch.Tensor:
    """`advantages` [n] permuted by a seeded draw: the control arm's (stage3.shuffle_advantages)."""
    return advantages[torch.randperm(advantages.numel(), generator=torch.Generator().manual_seed(seed))]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, dict[str, float | int]]:
    """Group-relative advantages of `rewards` [num_prompts, G] (row = the G responses to one prompt).

    Returns (advantages [num_prompts, G] in the rewards' float dtype, stats). A group whose
    population std is <= `eps` gets advantage 0 and is counted in
    stats["zero_variance_groups"]; rewards are O(0.1-1), so eps only catches float noise.
    `advantages.reshape(-1)` follows the prompt-major order of the responses.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_prompts, G] with G >= 2 responses per prompt, got shape "
                         f"{tuple(rewards.shape)}; reshape with stage3.group_size")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; check the reward function's inputs")
    r = rewards.double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    flat = std <= eps
    adv = torch.where(flat, torch.zeros_like(r), (r - mean) / torch.where(flat, torch.ones_like(std), std))
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    stats = {
        "groups": int(r.shape[0]),
        "zero_variance_groups": int(flat.sum()),
        "reward_mean": float(r.mean()),
        "reward_std_mean": float(std.mean()),
    }
    return adv.to(out_dtype), stats
