from pathlib import Path

from setuptools import find_packages, setup

reqs = [l.strip() for l in Path(__file__).with_name("requirements.txt").read_text().splitlines()
        if l.strip() and not l.startswith("#")]

TEST_ONLY = ("pytest", "shellcheck", "hypothesis")

# The benchmark and GSM8K files the product reads at run time, with their licenses
# (tests/test_packaged_data.py fails if a file under padd_ds/data/files is not matched).
PACKAGE_DATA = {"padd_ds.data": ["files/README.md", "files/*/LICENSE", "files/*/*.jsonl",
                                 "files/math_eval/*/LICENSE", "files/math_eval/*/*.jsonl"]}

setup(
    name="padd-ds",
    version="0.1.0",
    description="PADD: distill a dense teacher into a Mixture-of-Experts student with DeepSpeed ZeRO-3 + AutoEP",
    packages=find_packages(include=["padd_ds", "padd_ds.*"]),
    package_data=PACKAGE_DATA,
    python_requires=">=3.10",
    install_requires=[r for r in reqs if not r.startswith(TEST_ONLY)],
    extras_require={"test": [r for r in reqs if r.startswith(TEST_ONLY)]},
    entry_points={"console_scripts": ["padd=padd_ds.cli:main"],
                  # vLLM loads it in every engine process: the PADD routing models (rollout.backend=vllm)
                  "vllm.general_plugins": ["padd = padd_ds.vllm_engine.plugin:register"]},
)
