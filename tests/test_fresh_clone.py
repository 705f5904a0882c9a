"""A fresh clone in an empty folder works with nothing beside it: the benchmarks and the toy
tokenizer's corpus are read from files inside the clone, and `padd eval --suite math5` runs."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_cmd
from padd_ds.data.math import SUITES

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                                reason="needs git and a git checkout")

PROBE = """
import json, padd_ds
from padd_ds.data.math import data_root, load_problems
from padd_ds.toy.build import GSM8K_TRAIN, tokenizer_corpus
print(json.dumps({"package": padd_ds.__file__, "data_root": str(data_root()), "gsm8k_train": str(GSM8K_TRAIN),
                  "corpus": len(tokenizer_corpus([], True)), "aime24": len(load_problems("aime24"))}))
"""


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The committed HEAD of this checkout, cloned alone into an empty folder."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    empty = tmp_path_factory.mktemp("empty")
    dest = empty / "padd-ds"
    run_cmd(["git", "clone", "--quiet", str(REPO), str(dest)], timeout=120, cwd=empty)
    run_cmd(["git", "-C", str(dest), "checkout", "--quiet", head], timeout=60, cwd=empty)
    assert sorted(p.name for p in empty.iterdir()) == ["padd-ds"]  # no shared/ or anything else beside it
    return dest


def _env(clone, **extra):
    # PYTHONPATH: the clone's padd_ds, not this checkout's or an installed one; no PADD_DATA_DIR
    return {"PYTHONPATH": str(clone), "PADD_DATA_DIR": "", **extra}


def test_clone_reads_its_own_data(clone):
    p = run_cmd([sys.executable, "-c", PROBE], timeout=120, cwd=clone, env=_env(clone))
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("package", "data_root", "gsm8k_train"):
        assert got[key].startswith(str(clone) + "/"), (key, got[key])
    assert got["corpus"] == 7473 and got["aime24"] == 30  # GSM8K train and AIME24, both from the clone


def test_clone_evaluates_math5(clone, toy_build, tmp_path):
    out = tmp_path / "math5.json"
    run_cmd([sys.executable, "-m", "padd_ds.cli", "eval", "--model", "toy://student", "--suite", "math5",
             "--limit", "5", "--max-new-tokens", "8", "--batch-size", "8", "--threads", "1", "--output", str(out)],
            timeout=300, cwd=clone, env=_env(clone, PADD_TOY_DIR=str(toy_build.root)))
    res = json.loads(out.read_text())
    assert list(res["benchmarks"]) == list(SUITES["math5"])
    for name, b in res["benchmarks"].items():
        assert b["n"] == 5 and len(b["records"]) == 5, name
    assert res["average"]["n"] == 25 and res["model"] == str(toy_build.student_dir)
