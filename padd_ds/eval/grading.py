"""Answer extraction and grading for GSM8K-style and LaTeX answers.

Numbers are compared numerically (so ``"1,000"`` matches ``"1000.0"``); anything
else goes through ``math_verify``, which understands LaTeX such as ``\\frac{1}{2}``.
Grading runs inside training loops (RL rewards, eval callbacks), so ``grade``
never raises and every regex here is linear in the input length.
"""

from __future__ import annotations

import math
import re

from math_verify import parse, verify

_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"answer is[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_LEADING_NUMBER = re.compile(r"\s*\$?\s*(-?\d+(?:,\d{3})*(?:\.\d+)?)(?![\d/^]|[.,]\d)")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_MAX_ANSWER_CHARS = 512  # longer "answers" are runaway generations; math_verify on them is slow


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, else None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _candidate(tail: str) -> str | None:
    """The answer at the start of ``tail``: a leading number if any, else the trimmed text."""
    m = _LEADING_NUMBER.match(tail)
    if m:
        return m.group(1)
    tail = tail.strip().rstrip(".").strip()
    return tail or None


def extract_answer(text: str) -> str | None:
    """Extract the final answer: ``#### x``, then ``\\boxed{x}``, then "the answer is x", then the last number."""
    if not isinstance(text, str) or not text.strip():
        return None
    hashes = _HASHES.findall(text)
    if hashes and (ans := _candidate(hashes[-1])):
        return ans
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    said = _ANSWER_IS.findall(text)
    if said and (ans := _candidate(said[-1])):
        return ans
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(s: str) -> float | None:
    """Parse ``s`` as a plain decimal number after dropping commas, ``$`` and a trailing period."""
    s = s.replace(",", "").replace("$", "").strip().rstrip(".").strip()
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def _latex(s: str) -> list:
    """math_verify finds LaTeX only inside delimiters, so wrap bare expressions."""
    return parse(s if ("$" in s or "\\boxed" in s) else f"${s}$")


def grade(response: str, reference: str) -> bool:
    """True when the answer extracted from ``response`` equals ``reference``; never raises."""
    try:
        if not isinstance(reference, str) or not reference.strip():
            return False
        pred = extract_answer(response)
        if pred is None or len(pred) > _MAX_ANSWER_CHARS:
            return False
        ref = reference.strip()
        if "####" in ref or "\\boxed" in ref:  # accept a full reference solution too
            ref = extract_answer(ref) or ref
        a, b = _as_number(pred), _as_number(ref)
        if a is not None and b is not None:
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
        return bool(verify(_latex(ref), _latex(pred)))
    except Exception:  # a grader crash must never kill a training run
        return False
