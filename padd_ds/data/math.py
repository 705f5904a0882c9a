"""Math problem sets -> uniform records {id, question, answer, solution}.

This first version reads JSONL files (the toy world's splits, GSM8K); other formats and the
benchmark suite build on `load_jsonl`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_jsonl(path: str | os.PathLike, question_field: str = "question", answer_field: str = "answer",
               solution_field: str | None = "solution", limit: int | None = None) -> list[dict]:
    """Read problems from JSONL; a malformed row is an error naming file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            for fld in (question_field, answer_field):
                if fld not in obj:
                    raise ValueError(f"{path}:{lineno}: missing field '{fld}' (fields: {sorted(obj)}); "
                                     f"set data.question_field / data.answer_field")
            rows.append({"id": str(obj.get("id", f"{path.stem}-{lineno}")), "question": obj[question_field],
                         "answer": str(obj[answer_field]),
                         "solution": obj.get(solution_field) if solution_field else None})
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no problems found")
    return rows


def toy_world_dir() -> Path:
    """Where `padd toy build` put the toy world (set by the CLI / train.py as PADD_TOY_DIR)."""
    d = os.environ.get("PADD_TOY_DIR")
    if not d:
        raise RuntimeError("PADD_TOY_DIR is not set: run `padd toy build` first")
    return Path(d)


def load_train_problems(source: str, question_field: str = "question", answer_field: str = "answer") -> list[dict]:
    if source == "toy":
        return load_jsonl(toy_world_dir() / "train.jsonl")
    return load_jsonl(source, question_field, answer_field)


def load_heldout_problems(source: str, limit: int | None = None) -> list[dict]:
    if source == "toy":
        return load_jsonl(toy_world_dir() / "heldout.jsonl", limit=limit)
    raise ValueError(f"no held-out split known for data.source={source!r}")
