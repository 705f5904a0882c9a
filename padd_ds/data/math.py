"""Math problem sets of every shipped format -> uniform problem records.

A record is a dict ``{id, question, answer, solution, subject, level, source}``: ``answer``
is the reference final answer as a string (what ``grade`` compares against), ``solution`` the
worked solution when the set has one (SFT / distillation train on it), ``subject`` and
``level`` are None when the set has none.

The benchmark files (shipped in ``padd_ds/data/files``, see its README for sources and
licenses) name their fields differently and write answers in different forms (``#### 18`` at the end of a solution, floats such as ``27.0``, LaTeX, an
answer only inside ``\\boxed{}`` of the solution, lists of answers). ``BENCHMARKS`` maps each
to the record; ``load_problems`` reads any user file (JSONL, JSON, Parquet), dataset folder or
`datasets` hub name through the same interface, with configurable field names (``Fields``). A malformed
row is an error naming the file and the line (or row).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from padd_ds.paths import REPO_ROOT, expand_user
from padd_ds.data.answers import last_boxed


@dataclass(frozen=True)
class Fields:
    """Which field holds what. None: detect it from the first row (``*_CANDIDATES``), or for a
    benchmark keep its own field."""

    question: str | None = None
    answer: str | None = None  # None and no answer-like field: the last \boxed{} of the solution
    solution: str | None = None
    subject: str | None = None
    id: str | None = None
    level: str | None = None
    context: str | None = None  # text to put before the question (OlympiadBench's shared context)


QUESTION_CANDIDATES = ("question", "problem", "prompt", "query")
ANSWER_CANDIDATES = ("answer", "final_answer", "target", "ground_truth")
SOLUTION_CANDIDATES = ("solution", "reasoning", "rationale")
SUBJECT_CANDIDATES = ("subject",)
ID_CANDIDATES = ("id", "unique_id", "idx", "problem_id")
LEVEL_CANDIDATES = ("level",)


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: str  # relative to the data root
    fields: Fields
    strip_prefix: str = ""  # packaging text that precedes every question


# The five-benchmark suite of the paper, and GSM8K. Paths are relative to data_root().
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    # answer: the full solution ending in "#### 18"; the number after #### is the reference.
    Benchmark("gsm8k", "gsm8k/test.jsonl", Fields("question", "answer", solution="answer")),
    Benchmark("gsm8k_train", "gsm8k/train.jsonl", Fields("question", "answer", solution="answer")),
    Benchmark("aime24", "math_eval/aime24/test.jsonl", Fields("problem", "answer", "solution", id="id")),
    # answer: a float such as 27.0
    Benchmark("amc23", "math_eval/amc23/test.jsonl", Fields("problem", "answer", id="id")),
    Benchmark("math500", "math_eval/math500/test.jsonl",
              Fields("problem", "answer", "solution", subject="subject", id="unique_id", level="level"),
              strip_prefix="Return your final response within \\boxed{}."),
    # no answer field: the answer is the \boxed{} of the solution
    Benchmark("minerva", "math_eval/minerva_math/test.jsonl",
              Fields("problem", None, "solution", subject="type", id="idx")),
    # final_answer: a list (several answers for some problems); solution: a list of solutions
    Benchmark("olympiadbench", "math_eval/olympiadbench/test.jsonl",
              Fields("question", "final_answer", "solution", subject="subfield", id="id", context="context")),
)}

SUITES: dict[str, tuple[str, ...]] = {
    "math5": ("aime24", "amc23", "math500", "minerva", "olympiadbench"),  # the paper's table
    "gsm8k": ("gsm8k",),
    "toy": ("toy",),  # the toy build's held-out split (needs PADD_TOY_DIR)
}

# The benchmark and GSM8K files installed with the package (README.md there: sources, licenses).
PACKAGED_DATA_DIR = Path(__file__).resolve().parent / "files"


def data_root() -> Path:
    """Where the benchmark files are read: $PADD_DATA_DIR if set, else the packaged copies."""
    env = os.environ.get("PADD_DATA_DIR")
    return Path(env) if env else PACKAGED_DATA_DIR


def benchmark_path(name: str) -> Path:
    """The file of benchmark ``name``; an error naming PADD_DATA_DIR if it is not there."""
    path = data_root() / BENCHMARKS[name].path
    if path.is_file():
        return path
    if os.environ.get("PADD_DATA_DIR"):
        raise FileNotFoundError(f"benchmark '{name}' expects {path}; PADD_DATA_DIR must name a folder holding "
                                f"gsm8k/ and math_eval/ (unset it to use the copies shipped with padd-ds)")
    raise FileNotFoundError(f"benchmark '{name}': the packaged file {path} is missing; reinstall padd-ds, "
                            f"or set PADD_DATA_DIR to a folder holding gsm8k/ and math_eval/")


# ----------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DOLLAR = re.compile(r"(?<!\\)\$")


def normalize_answer(value: Any) -> str:
    """A reference answer of any shipped form -> the string ``grade`` compares against.

    ``27.0`` -> ``"27"``; ``"...#### 1,000"`` -> ``"1000"``; a solution -> its last boxed
    content; ``["$2$", "$3$"]`` -> ``"2, 3"``; math delimiters ``$`` are dropped (``\\$``, a
    dollar sign, is kept). Raises ValueError for an empty or unusable value."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"answer must be a number, a string or a list, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"answer is not a finite number: {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        parts = [normalize_answer(v) for v in value]
        if not parts:
            raise ValueError("answer is an empty list")
        return ", ".join(parts)
    if not isinstance(value, str):
        raise ValueError(f"answer must be a number, a string or a list, got {type(value).__name__}")
    s = value.strip()
    if "####" in s:
        s = s.rsplit("####", 1)[1].strip()
    elif (boxed := last_boxed(s)) is not None:
        s = boxed
    s = _DOLLAR.sub("", s).strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not s:
        raise ValueError(f"answer is empty (raw value {value!r})")
    return s


# ----------------------------------------------------------------------------------------
# Rows from files, folders and the hub
# ----------------------------------------------------------------------------------------

def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{lineno}: JSON nested too deeply to be a problem record") from None
            yield f"{path}:{lineno}", row


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to hold problem records") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of problem objects, got a {type(data).__name__}; "
                         f"write one object per array element (or use JSONL)")
    for i, obj in enumerate(data):
        yield f"{path}: array element {i}", obj


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    for i, obj in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}: row {i}", obj


def _dataset_rows(name: str, subset: str | None, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise ValueError(f"dataset {name!r} has no split {split!r} ({e}); pass split=...") from None
        raise
    for i, obj in enumerate(ds):
        yield f"{name}[{split}] row {i}", obj


_HUB_ID = re.compile(r"^(?:hf:)?([A-Za-z0-9][\w.\-]*/[\w.\-]+)(?::([\w.\-]+))?$")


def _rows(source: str | os.PathLike, split: str) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs; location names the file and line/row for error messages."""
    path = expand_user(source)
    if path.is_dir():
        return _dataset_rows(str(path), None, split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return _jsonl_rows(path)
        if suffix == ".json":
            return _json_rows(path)
        if suffix == ".parquet":
            return _parquet_rows(path)
        raise ValueError(f"{path}: unknown problem file type '{suffix}'; use .jsonl, .json or .parquet")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json", ".parquet"):
        raise FileNotFoundError(f"problem file {path} does not exist")
    m = _HUB_ID.match(str(source))
    if m and not str(source).startswith((".", "/", "~")):
        return _dataset_rows(m.group(1), m.group(2), split)
    raise FileNotFoundError(f"problem source '{source}' is neither a benchmark ({', '.join(BENCHMARKS)}), "
                            f"an existing file/folder, nor a hub name like 'org/name[:subset]'")


def _pick(row: dict, explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        return explicit
    return next((c for c in candidates if c in row), None)


def _resolve_fields(row: dict, fields: Fields, where: str) -> Fields:
    """Fill the undetected fields of ``fields`` from the first row."""
    resolved = Fields(
        question=_pick(row, fields.question, QUESTION_CANDIDATES),
        answer=_pick(row, fields.answer, ANSWER_CANDIDATES),
        solution=_pick(row, fields.solution, SOLUTION_CANDIDATES),
        subject=_pick(row, fields.subject, SUBJECT_CANDIDATES),
        id=_pick(row, fields.id, ID_CANDIDATES),
        level=_pick(row, fields.level, LEVEL_CANDIDATES),
        context=fields.context,
    )
    if resolved.question is None:
        raise ValueError(f"{where}: no question field (looked for {QUESTION_CANDIDATES}; fields: {sorted(row)}); "
                         f"name it with data.question_field (Fields.question)")
    if resolved.answer is None and resolved.solution is None:
        raise ValueError(f"{where}: no answer field (looked for {ANSWER_CANDIDATES + SOLUTION_CANDIDATES}; "
                         f"fields: {sorted(row)}); name it with data.answer_field (Fields.answer)")
    return resolved


def _text(v: Any) -> str | None:
    """A solution may be a list of alternative solutions (OlympiadBench): keep the first."""
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return v if isinstance(v, str) and v.strip() else None


def _record(row: Any, f: Fields, where: str, source: str, strip_prefix: str, index: int,
            prefix_id: bool) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with the problem's fields, got {type(row).__name__}")
    for name, fld in (("question", f.question), ("answer", f.answer)):
        if fld is not None and fld not in row:
            raise ValueError(f"{where}: missing field '{fld}' (fields: {sorted(row)}); "
                             f"set {name}_field (data.{name}_field) to the field holding the {name}")
    question = row[f.question]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field '{f.question}' must be a non-empty string, got {question!r:.80}")
    question = question.strip()
    if strip_prefix and question.startswith(strip_prefix):
        question = question[len(strip_prefix):].strip()
    if f.context and isinstance(row.get(f.context), str) and row[f.context].strip():
        question = f"{row[f.context].strip()}\n\n{question}"
    solution = _text(row.get(f.solution)) if f.solution else None
    raw = row[f.answer] if f.answer is not None else solution
    if f.answer is None and (solution is None or last_boxed(solution) is None):
        raise ValueError(f"{where}: no answer field and no \\boxed{{}} answer in '{f.solution}'; "
                         f"set answer_field to the field holding the answer")
    try:
        answer = normalize_answer(raw)
    except ValueError as e:
        raise ValueError(f"{where}: field '{f.answer or f.solution}': {e}") from None
    level = row.get(f.level) if f.level else None
    subject = row.get(f.subject) if f.subject else None
    rid = row.get(f.id) if f.id else None
    if rid is None or rid == "":
        rid = f"{source}-{index}"
    elif prefix_id:  # benchmarks number their problems from 0 each: keep ids unique across a suite
        rid = f"{source}/{rid}"
    return {"id": str(rid),
            "question": question, "answer": answer, "solution": solution,
            "subject": str(subject) if subject not in (None, "") else None,
            "level": level, "source": source}


def load_problems(source: str | os.PathLike, fields: Fields | None = None, *, split: str = "test",
                  limit: int | None = None) -> list[dict]:
    """Problems from a benchmark name (``BENCHMARKS``), a .jsonl/.json/.parquet file, a dataset
    folder, or a `datasets` hub name (``org/name`` or ``org/name:subset``; ``split`` picks the
    split). The set fields of ``fields`` override the benchmark's or the detected field names."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    overrides = {k: v for k, v in asdict(fields or Fields()).items() if v is not None}
    name = str(source)
    bench = BENCHMARKS.get(name)
    if bench is not None:
        rows, label, prefix = _jsonl_rows(benchmark_path(name)), name, bench.strip_prefix
        fields = replace(bench.fields, **overrides)
    else:
        rows, fields, label, prefix = _rows(source, split), Fields(**overrides), Path(name).stem or name, ""
    out: list[dict] = []
    resolved: Fields | None = None
    for where, row in rows:
        if resolved is None:
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with the problem's fields, got {type(row).__name__}")
            resolved = fields if bench is not None else _resolve_fields(row, fields, where)
        out.append(_record(row, resolved, where, label, prefix, len(out), prefix_id=bench is not None))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{source}: no problems found")
    return out


def load_suite(suite: str, limit: int | None = None) -> dict[str, list[dict]]:
    """Every benchmark of ``suite`` (``SUITES``), each cut to its first ``limit`` problems."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite '{suite}'; choose one of {sorted(SUITES)}")
    return {name: (load_heldout_problems("toy", limit=limit) if name == "toy" else load_problems(name, limit=limit))
            for name in SUITES[suite]}


# ----------------------------------------------------------------------------------------
# The toy build and the trainer's entry points
# ----------------------------------------------------------------------------------------

TOY_FIELDS = Fields(question="question", answer="answer", solution="solution")


def load_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Problems from a JSONL file with the fields question, answer, solution (the toy build's splits)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return load_problems(path, TOY_FIELDS, limit=limit)


def toy_build_dir() -> Path:
    """Where `padd toy build` put the toy models (set by the CLI / train.py as PADD_TOY_DIR)."""
    d = os.environ.get("PADD_TOY_DIR")
    if not d:
        raise RuntimeError("PADD_TOY_DIR is not set: run `padd toy build` first")
    return Path(d)


# A benchmark name given as training data means its training split, never its test set.
TRAIN_SPLIT_OF = {"gsm8k": "gsm8k_train"}


def load_train_problems(source: str, question_field: str = "question", answer_field: str = "answer") -> list[dict]:
    if source == "toy":
        return load_jsonl(toy_build_dir() / "train.jsonl")
    source = TRAIN_SPLIT_OF.get(source, source)
    # The config's default names mean "detect": a benchmark or file using `problem` still loads.
    fields = Fields(question=None if question_field == "question" else question_field,
                    answer=None if answer_field == "answer" else answer_field)
    return load_problems(source, fields, split="train")


def load_heldout_problems(source: str, limit: int | None = None) -> list[dict]:
    if source == "toy":
        return load_jsonl(toy_build_dir() / "heldout.jsonl", limit=limit)
    raise ValueError(f"no held-out split known for data.source={source!r}")
