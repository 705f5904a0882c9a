"""Where a solution text states its final answer: the last ``\\boxed{...}``.

Shared by the dataset loaders (references written only inside a solution, e.g. Minerva) and
the grader (answers extracted from a model's response).
"""

from __future__ import annotations

import re

BOXED = re.compile(r"\\(?:boxed|fbox|framebox)\s*")
_BRACE = re.compile(r"[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``/``\\framebox``) with balanced braces,
    or the token after ``\\boxed`` without braces (``\\boxed 5``); None if there is none.
    One pass over the braces: hostile input (``\\boxed{`` x 20000) stays linear."""
    boxes = list(BOXED.finditer(text))
    if not boxes:
        return None
    partner: dict[int, int] = {}
    open_at: list[int] = []
    for m in _BRACE.finditer(text, boxes[0].end()):
        if m.group() == "{":
            open_at.append(m.start())
        elif open_at:
            partner[open_at.pop()] = m.start()
    for m in reversed(boxes):
        i = m.end()
        if i < len(text) and text[i] == "{":
            if i in partner:
                return text[i + 1 : partner[i]]
            continue  # unbalanced: try an earlier box
        if m.group(0).startswith("\\boxed") and m.end() > m.start() + len("\\boxed"):
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0)
    return None
