"""Answer extraction and grading: the formats we must accept and the inputs that must fail safely."""

import time

import pytest

from padd_ds.eval.grading import extract_answer, grade


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5 + 3 = 8. 8 - 2 = 6. #### 6", "6"),
        ("#### 1,000", "1,000"),
        ("#### 6.", "6"),
        ("#### 5\nthen 7 more", "5"),
        ("so the result is \\boxed{\\frac{1}{2}} indeed", "\\frac{1}{2}"),
        ("\\boxed{3} then \\boxed{{4}}", "{4}"),
        ("Thus, the answer is 42.", "42"),
        ("The answer is: $1,250", "1,250"),
        ("I counted 3 apples and then 17", "17"),
        ("-4 degrees", "-4"),
        ("no digits here", None),
        ("", None),
        ("   ", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "response, reference",
    [
        ("3 + 4 = 7. #### 7", "7"),
        ("#### 1,000", "1000"),
        ("#### $18.00", "18"),
        ("the answer is 72.", "72"),
        ("we get 5 then 12", "12"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{x^2+1}", "1+x^2"),
        ("\\boxed{12}", "Natalia sold 48/2 = 24 clips.\n#### 12"),  # a full GSM8K solution as reference
    ],
)
def test_grade_positive(response, reference):
    assert grade(response, reference) is True


@pytest.mark.parametrize(
    "response, reference",
    [
        ("3 + 4 = 7. #### 7", "8"),
        ("#### 1,000", "100"),
        ("the answer is 72.", "27"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("\\boxed{x^2+2}", "1+x^2"),
        ("", "5"),
        ("#### 5", ""),
        ("\\boxed{", "5"),
        ("\\boxed{12", "13"),
        ("}}{{\\boxed{{{", "1"),
        ("nan", "nan"),
        (None, "5"),
        ("#### 5", None),
    ],
)
def test_grade_negative(response, reference):
    assert grade(response, reference) is False


@pytest.mark.parametrize(
    "response",
    [
        "x" * 100_000,
        "9" * 100_000,
        "{" * 100_000,
        "\\boxed{" * 20_000,
        "the answer is " + "a" * 100_000,
        "#### " + "z" * 100_000,
    ],
)
def test_grade_huge_inputs_fail_fast(response):
    t = time.perf_counter()
    assert grade(response, "7") is False
    assert time.perf_counter() - t < 2.0
