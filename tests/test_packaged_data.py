"""The data the product reads at run time ships inside the package."""

import ast
import glob
from pathlib import Path

import pytest

import padd_ds.data

REPO = Path(__file__).resolve().parents[1]
DATA_PKG = Path(padd_ds.data.__file__).parent


def _package_data() -> dict[str, list[str]]:
    """setup.py's PACKAGE_DATA literal, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PACKAGE_DATA" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no PACKAGE_DATA")


def test_every_data_file_is_package_data():
    patterns = _package_data()["padd_ds.data"]
    # setuptools expands package_data patterns with glob relative to the package folder
    matched = {p for pat in patterns for p in glob.glob(pat, root_dir=DATA_PKG, recursive=True)}
    on_disk = {str(p.relative_to(DATA_PKG)) for p in (DATA_PKG / "files").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk, "padd_ds/data/files is empty"
    assert not on_disk - matched, f"not installed by setup.py PACKAGE_DATA: {sorted(on_disk - matched)}"


def test_every_benchmark_file_is_packaged_with_a_license_note():
    from padd_ds.data.math import BENCHMARKS, PACKAGED_DATA_DIR

    readme = (PACKAGED_DATA_DIR / "README.md").read_text()
    for bench in BENCHMARKS.values():
        assert (PACKAGED_DATA_DIR / bench.path).is_file(), bench.path
        assert f"`{bench.path}`" in readme, f"{bench.path} is not listed in {PACKAGED_DATA_DIR / 'README.md'}"


def test_data_root_is_the_package_unless_padd_data_dir_is_set(monkeypatch, tmp_path):
    from padd_ds.data import math as m

    monkeypatch.delenv("PADD_DATA_DIR", raising=False)
    assert m.data_root() == m.PACKAGED_DATA_DIR and m.PACKAGED_DATA_DIR.is_relative_to(DATA_PKG)
    monkeypatch.setenv("PADD_DATA_DIR", str(tmp_path))
    assert m.data_root() == tmp_path
    with pytest.raises(FileNotFoundError, match=r"benchmark 'aime24' expects .*aime24/test.jsonl; PADD_DATA_DIR"):
        m.load_problems("aime24")
    (tmp_path / "math_eval" / "aime24").mkdir(parents=True)
    (tmp_path / "math_eval" / "aime24" / "test.jsonl").write_text('{"id": 1, "problem": "P?", "answer": "7"}\n')
    assert [(p["question"], p["answer"]) for p in m.load_problems("aime24")] == [("P?", "7")]
