"""Benchmark and user-file loading: every shipped set loads fully into the same record shape,
user files of each format and field naming load through the same call, bad rows are named."""

import json
import re

import pytest

from padd_ds.data.math import BENCHMARKS, SUITES, Fields, data_root, load_problems, load_suite, normalize_answer

# Row counts from padd_ds/data/files/README.md
EXPECTED_ROWS = {"gsm8k": 1319, "gsm8k_train": 7473, "aime24": 30, "amc23": 40, "math500": 500,
                 "minerva": 272, "olympiadbench": 675}


def _raw(name):
    return [json.loads(line) for line in (data_root() / BENCHMARKS[name].path).open()]


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_every_benchmark_loads_fully(name):
    problems = load_problems(name)
    assert len(problems) == EXPECTED_ROWS[name]
    assert len({p["id"] for p in problems}) == len(problems)
    for p in problems:
        assert set(p) == {"id", "question", "answer", "solution", "subject", "level", "source"}
        assert isinstance(p["question"], str) and len(p["question"]) > 10
        assert isinstance(p["answer"], str) and p["answer"] and "$" not in p["answer"].replace("\\$", "")
        assert p["source"] == name


def test_answer_forms_are_normalized_from_the_raw_fields():
    gsm = load_problems("gsm8k")
    for p, raw in zip(gsm, _raw("gsm8k")):
        assert p["answer"] == raw["answer"].split("####")[-1].strip().replace(",", "")
        assert p["solution"] == raw["answer"]
    amc = load_problems("amc23")
    assert [p["answer"] for p in amc] == [str(int(r["answer"])) for r in _raw("amc23")]  # 27.0 -> "27"
    minerva = load_problems("minerva")
    assert minerva[0]["answer"] == "1.6"  # only inside \boxed{} of the solution
    for p, raw in zip(minerva, _raw("minerva")):
        squash = lambda t: re.sub(r"[\s$]", "", t)  # noqa: E731
        assert squash(f"\\boxed{{{p['answer']}}}") in squash(raw["solution"]), (p["answer"], raw["solution"][-200:])
    olymp = {p["id"]: p for p in load_problems("olympiadbench")}
    assert olymp["olympiadbench/1610"]["answer"] == "\\frac{1}{2 n+2}"  # was ["$\\frac{1}{2 n+2}$"]
    multi = [p for p, raw in zip(olymp.values(), _raw("olympiadbench")) if raw["final_answer"] == ["$69$,$84$"]]
    assert multi and multi[0]["answer"] == "69,84"
    math500 = load_problems("math500")
    assert [p["answer"] for p in math500[:3]] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}"]
    assert not any(p["question"].startswith("Return your final response") for p in math500)
    assert {p["subject"] for p in math500} == {"Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra",
                                              "Number Theory", "Prealgebra", "Precalculus"}
    assert {p["level"] for p in math500} == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("value, expected", [
    (27.0, "27"), (0.5, "0.5"), (7, "7"), ("  12 ", "12"), ("Janet sells 9.\n#### 1,000", "1000"),
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"), (["$2$", "$3$"], "2, 3"), ("\\$18.90", "\\$18.90"),
    ("$58,500$", "58500"), ("1,2", "1,2"),
])
def test_normalize_answer(value, expected):
    assert normalize_answer(value) == expected


@pytest.mark.parametrize("value", [None, "", "   ", [], float("nan"), True, {"a": 1}, "#### "])
def test_normalize_answer_refuses_unusable_values(value):
    with pytest.raises(ValueError):
        normalize_answer(value)


def test_suites_and_limit():
    suite = load_suite("math5", limit=3)
    assert list(suite) == list(SUITES["math5"])
    assert all(len(v) == 3 for v in suite.values())
    assert [p["id"] for p in suite["math500"]] == [p["id"] for p in load_problems("math500")[:3]]
    with pytest.raises(ValueError, match="unknown suite"):
        load_suite("math6")


# ---------------------------------------------------------------------------------------
# User files: JSONL, JSON, Parquet, dataset folders; field names detected or configured
# ---------------------------------------------------------------------------------------

ROWS = [{"uid": "a", "prompt": "What is 2+2?", "target": "4", "topic": "arith"},
        {"uid": "b", "prompt": "Half of 1?", "target": "$\\frac{1}{2}$", "topic": "frac"}]
CUSTOM = Fields(question="prompt", answer="target", subject="topic", id="uid")


def _write(tmp_path, fmt, rows):
    if fmt == "jsonl":
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = tmp_path / "p.json"
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_user_files_with_configured_fields(tmp_path, fmt):
    problems = load_problems(_write(tmp_path, fmt, ROWS), CUSTOM)
    assert [(p["id"], p["question"], p["answer"], p["subject"]) for p in problems] == [
        ("a", "What is 2+2?", "4", "arith"), ("b", "Half of 1?", "\\frac{1}{2}", "frac")]


def test_user_file_fields_are_detected(tmp_path):
    rows = [{"problem": "P1?", "solution": "so \\boxed{5}", "subject": "s"}, {"problem": "P2?", "solution": "\\boxed{6}"}]
    problems = load_problems(_write(tmp_path, "jsonl", rows))
    assert [(p["question"], p["answer"], p["subject"], p["id"]) for p in problems] == [
        ("P1?", "5", "s", "p-0"), ("P2?", "6", None, "p-1")]


def test_dataset_folder_through_datasets(tmp_path):
    """A folder is read by `datasets.load_dataset`, the same call that reads a hub name."""
    folder = tmp_path / "myset"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "train.jsonl").write_text(json.dumps({**ROWS[0], "prompt": "train q"}) + "\n")
    test = load_problems(folder, CUSTOM)
    assert [(p["question"], p["answer"]) for p in test] == [("What is 2+2?", "4"), ("Half of 1?", "\\frac{1}{2}")]
    assert [p["question"] for p in load_problems(folder, CUSTOM, split="train")] == ["train q"]
    with pytest.raises(ValueError, match="split"):
        load_problems(folder, CUSTOM, split="validation")


# ---------------------------------------------------------------------------------------
# Bad input: one clear error naming file and line
# ---------------------------------------------------------------------------------------

def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n\n{"question": "q2", "answer": \n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: not valid JSON")):
        load_problems(path)


def test_absurdly_nested_line_names_file_and_line(tmp_path):
    # json.loads raises RecursionError (not a JSONDecodeError) for this
    path = tmp_path / "deep.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n' + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: JSON nested too deeply")):
        load_problems(path)
    array = tmp_path / "deep.json"
    array.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match=re.escape(f"{array}: JSON nested too deeply")):
        load_problems(array)


def test_missing_field_names_file_line_and_fix(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "q2"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing field 'answer'")) as e:
        load_problems(path)
    assert "answer_field" in str(e.value)
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: missing field 'prompt'")):
        load_problems(path, Fields(question="prompt"))


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "answer": ""}, "answer is empty"),
    ({"question": "", "answer": "1"}, "must be a non-empty string"),
    ({"question": "q", "answer": None}, "answer must be"),
    ({"text": "q", "answer": "1"}, "no question field"),
])
def test_bad_values_name_the_row(tmp_path, row, message):
    path = _write(tmp_path, "parquet", [{"question": "ok", "answer": "1"}, row]) if "text" not in row else \
        _write(tmp_path, "parquet", [row])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*row [01].*" + re.escape(message)):
        load_problems(path)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl")
    (tmp_path / "p.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="unknown problem file type"):
        load_problems(tmp_path / "p.csv")
    (tmp_path / "obj.json").write_text('{"question": "q"}')
    with pytest.raises(ValueError, match="JSON array"):
        load_problems(tmp_path / "obj.json")
    with pytest.raises(FileNotFoundError, match="neither a benchmark"):
        load_problems("no_such_benchmark")
    path = tmp_path / "noanswer.jsonl"
    path.write_text('{"question": "q", "solution": "no box here"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:1:") + ".*boxed"):
        load_problems(path)


def test_gsm8k_as_training_data_is_its_train_split():
    """data.source=gsm8k trains on GSM8K's 7,473 training problems, never on its test set."""
    from padd_ds.data.math import load_train_problems

    train, test = load_train_problems("gsm8k"), load_problems("gsm8k")
    assert len(train) == 7473 and len(test) == 1319
    assert not {p["question"] for p in train} & {p["question"] for p in test}
