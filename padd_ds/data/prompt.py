"""The one prompt format shared by SFT, distillation and evaluation.

Keeping it in one place guarantees that the teacher, the student and the grader
all see byte-identical prompts; a stray space here silently costs accuracy.
"""

from __future__ import annotations

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str) -> str:
    """Return the prompt for ``question``; the model continues after ``Answer:``."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    return PROMPT_TEMPLATE.format(question=question)


def format_example(question: str, solution: str) -> tuple[str, str]:
    """Return ``(prompt, response)``; the caller appends EOS after the response."""
    if not isinstance(solution, str):
        raise TypeError(f"solution must be a str, got {type(solution).__name__}")
    return format_prompt(question), " " + solution
