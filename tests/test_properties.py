"""Property-based: random configs and random dataset lines give a validated run or a clean,
one-line ConfigError/ValueError - never another exception, never a hang.

Configs: random overrides of the config tree (real field names with values of their own type
or of any type, unknown and over-long keys, raw `--set` text) on top of a valid base (the
models and DeepSpeed JSON of test_config.py), through both entry points (`--set` overrides
and a YAML recipe), then `validate` with a random world size. A config that validates must
also survive its own saved YAML (the run directory's config.yaml) unchanged.

Dataset lines: a JSONL (or JSON array) file of random lines - valid problems, problems with
wrong field types, arbitrary JSON, malformed text, blank lines, absurd nesting - through the
trainer's data path: load, the up-front prompt/solution check with the toy tokenizer, split.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from padd_ds.config import PaddConfig
from padd_ds.plan import Cluster, make_plan
from padd_ds.recipe import dump_yaml, load_config, to_dict
from padd_ds.validate import validate

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)  # reproducible in CI; a failure prints its minimal example


def assert_clean(e: Exception) -> None:
    event(f"clean {type(e).__name__}")
    msg = str(e)
    assert msg.strip(), f"{type(e).__name__} with an empty message"
    assert "\n" not in msg, f"multi-line error: {msg!r}"


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


def _leaves(cls, prefix: str = "") -> dict[str, typing.Any]:
    out = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


LEAVES = _leaves(PaddConfig)
SECTIONS = sorted({k.split(".")[0] for k in LEAVES})

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def of_type(tp) -> st.SearchStrategy:
    """Values of an annotation's own type, mostly plausible ones (so that many configs get
    past type checking into the range and cross-field checks), sometimes extreme."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return st.sampled_from(args) | st.text(max_size=8)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([of_type(a) for a in args])
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(1, 8) | st.integers(1, 8) | st.integers(-3, 0) | st.integers()
    if tp is float:
        return st.floats(0.01, 1) | st.floats(0.01, 1) | st.floats(-2, 0) | st.floats()
    if tp is str:
        return st.text(max_size=12) | st.sampled_from(["ds_configs/zero3.json", "toy", "gsm8k", "x.jsonl", "",
                                                          "~no-such-user-0/x.jsonl"])
    if origin is dict:
        return st.just({"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25}) | st.dictionaries(
            st.sampled_from("ABCDE") | st.text(max_size=3), st.floats(0, 1) | st.floats(), max_size=5)
    return anything


# Fields whose random strings can only fail (paths), left out of the plausible draws.
PATHS = {"models.teacher", "models.student", "models.tokenizer", "deepspeed.config", "data.source"}
PLAUSIBLE = sorted(k for k in LEAVES if k not in PATHS)


@st.composite
def overrides(draw) -> dict[str, typing.Any]:
    out = {}
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 19))
        if kind < 14:     # a real field, a value of its type
            key = draw(st.sampled_from(PLAUSIBLE))
            out[key] = draw(of_type(LEAVES[key]))
        elif kind < 16:   # any field, any value
            out[draw(st.sampled_from(sorted(LEAVES)))] = draw(anything)
        elif kind < 17:   # a path field, a random string
            out[draw(st.sampled_from(sorted(PATHS)))] = draw(st.text(max_size=12) | st.sampled_from(
                ["~no-such-user-0", "~", "/", ".", "org/name", "toy://", "toy://nope"]))
        elif kind < 19:   # an unknown field of a real section, or a path below a leaf
            key = draw(st.sampled_from(SECTIONS + sorted(LEAVES)))
            out[f"{key}.{draw(st.text(min_size=1, max_size=6))}"] = draw(anything)
        else:             # an unknown key
            out[draw(st.text(min_size=1, max_size=10))] = draw(anything)
    return out


WORLD = st.sampled_from([3, 3, 3, 5]) | st.integers(-1, 9)  # 3 and 5 fit the base (EP 2, one teacher)
RAW = st.sampled_from(["[", "{a: 1", "&a [*a]", "!!python/object:os.system ls", "!!binary aGk=", "- x\n- y",
                       ".nan", "-.inf", "1e400", "0x1F", "~", "''", "'", "\"", "{}", "[]", "a: b: c"]) | st.text(max_size=20)


def nested(flat: dict[str, typing.Any]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}; a key that collides with another's path is dropped."""
    root: dict = {}
    for key, value in flat.items():
        parts, node = key.split("."), root
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            if parts[-1] not in node:
                node[parts[-1]] = value
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Valid models and DeepSpeed JSON (as in test_config.py) and the overrides that use them."""
    root = tmp_path_factory.mktemp("property_config")
    ds = root / "ds.json"
    ds.write_text(json.dumps({"expert_parallel": {"enabled": True, "autoep_size": 2}}))
    shape = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512}
    models = {"teacher": {"model_type": "qwen2", "intermediate_size": 256, **shape},
              "student": {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                          "moe_intermediate_size": 32, **shape}}
    for name, conf in models.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(conf))
        (root / name / "model.safetensors").write_bytes(b"")
        (root / name / "tokenizer_config.json").write_text("{}")
    return root, {"models.teacher": str(root / "teacher"), "models.student": str(root / "student"),
                  "deepspeed.config": str(ds)}


def check_config(cfg: PaddConfig, world_size: int, root: Path) -> None:
    """What train.py runs before any process group: validate (the trainer's own refusals
    included), the memory plan. Each may refuse, only cleanly."""
    try:
        validate(cfg, world_size=world_size, repo_root=root)
        make_plan(cfg, Cluster(1, world_size, 80.0))
    except ValueError as e:
        assert_clean(e)
        return
    event("validated")
    # Valid: its saved YAML (run_dir/config.yaml) must load back to the same config.
    saved = root / "saved.yaml"
    saved.write_text(dump_yaml(cfg))
    again = to_dict(load_config(str(saved)))
    if "nan" not in json.dumps(to_dict(cfg), default=str).lower():
        assert again == to_dict(cfg)


@SETTINGS
@given(flat=overrides(), raw=st.lists(st.tuples(st.sampled_from(sorted(LEAVES)), RAW), max_size=1), world_size=WORLD)
@pytest.mark.timeout(120)
def test_random_set_overrides_validate_or_fail_cleanly(base, flat, raw, world_size):
    root, good = base
    items = [f"{k}={v}" for k, v in good.items()]
    items += [f"{k}={yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"
              for k, v in flat.items()]
    items += [f"{k}={text}" for k, text in raw]
    try:
        cfg = load_config(None, items)
    except ValueError as e:
        assert_clean(e)
        return
    check_config(cfg, world_size, root)


@SETTINGS
@given(flat=overrides(), world_size=WORLD)
@pytest.mark.timeout(120)
def test_random_recipes_validate_or_fail_cleanly(base, flat, world_size):
    root, good = base
    recipe = root / "recipe.yaml"
    try:
        recipe.write_text(yaml.safe_dump(nested({**good, **flat}), allow_unicode=True))
    except yaml.YAMLError:
        return  # not representable as YAML; nothing to test
    try:
        cfg = load_config(str(recipe))
    except ValueError as e:
        assert_clean(e)
        return
    check_config(cfg, world_size, root)


# --------------------------------------------------------------------------------------
# Dataset lines
# --------------------------------------------------------------------------------------

text = st.text(max_size=40)
words = st.text("abcdefghij +=?0123456789", min_size=1, max_size=30).filter(str.strip)
good_problem = st.fixed_dictionaries(
    {"question": words, "answer": st.integers(-99, 999) | words, "solution": words},
    optional={"id": st.integers(0, 10**6) | words, "level": st.integers(1, 5)},
)
problem = st.fixed_dictionaries(  # right fields, values of any kind
    {"question": text | words,
     "answer": st.integers() | st.floats() | text | st.lists(st.integers(), max_size=2) | st.none(),
     "solution": text | st.sampled_from(["2 + 3 = 5. #### 5", "The answer is \\boxed{7}."]) | st.none()},
    optional={"id": anything, "level": anything, "subject": anything, "extra": anything},
)
bad_line = st.one_of(
    problem.map(json.dumps),
    anything.map(json.dumps),
    st.dictionaries(st.sampled_from(["question", "answer", "solution", "problem", "final_answer"]), anything,
                    max_size=4).map(json.dumps),
    text,
    st.sampled_from(["", "   ", "{", "[1, 2", "nul", "NaN", '{"question": "q", "answer": NaN, "solution": "s"}',
                     "[" * 5000 + "]" * 5000, '{"a": ' * 3000 + "1" + "}" * 3000]),
)
lines = st.one_of(  # a clean file (blank lines allowed), one bad line among good ones, or anything
    st.lists(good_problem.map(json.dumps) | st.just(""), min_size=4, max_size=14),
    st.tuples(st.lists(good_problem.map(json.dumps), min_size=4, max_size=10), bad_line, st.integers(0, 10)).map(
        lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2]:]),
    st.lists(bad_line | good_problem.map(json.dumps), max_size=10),
)


@pytest.fixture(scope="module")
def tokenizer(toy_build):
    from padd_ds.models.loading import load_tokenizer

    return load_tokenizer(str(toy_build.teacher_dir))


@SETTINGS
@given(lines=lines, as_array=st.booleans(), max_prompt=st.integers(1, 64) | st.just(96),
       skip=st.booleans(), fields=st.sampled_from([(None, None), ("question", "answer"), ("problem", "final_answer")]))
@pytest.mark.timeout(120)
def test_random_dataset_lines_load_or_fail_cleanly(tokenizer, lines, as_array, max_prompt, skip, fields):
    from padd_ds.data.batch import usable_problems
    from padd_ds.data.math import Fields, load_problems
    from padd_ds.data.splits import split_pool

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("problems.json" if as_array else "problems.jsonl")
        path.write_text(("[" + ", ".join(l for l in lines if l.strip()) + "]") if as_array else "\n".join(lines))
        try:
            problems = load_problems(path, Fields(question=fields[0], answer=fields[1]), split="train")
            problems = usable_problems(tokenizer, problems, max_prompt, "skip" if skip else "error")
            parts = split_pool(problems, {"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25}, seed=0)
        except ValueError as e:
            assert_clean(e)
            return
    event("loaded")
    # Loaded: every record is usable by the trainer.
    assert sum(map(len, parts.values())) == len(problems)
    for p in problems:
        assert isinstance(p["question"], str) and p["question"].strip()
        assert isinstance(p["answer"], str) and p["answer"]
        assert isinstance(p["solution"], str) and p["solution"].strip()
        assert len(tokenizer(f"Question: {p['question']}\nAnswer:")["input_ids"]) <= max_prompt
        assert isinstance(p["id"], str)
