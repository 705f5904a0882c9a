"""Recipes: a YAML file plus `--set section.field=value` overrides -> a PaddConfig.

    cfg = load_config("recipes/toy_cpu.yaml", ["stage2.base_temperature=2.0", "train.lr=1e-4"])
    print(dump_yaml(cfg))                # saved into every run dir

Values are type-checked by pydantic in strict mode, one field at a time (int -> float is the
only conversion; a bool is never an int; a Literal matches exactly). The walk over the
sections is ours: it names the dotted field, suggests the nearest key ("did you mean"),
points a right name in the wrong section or a renamed key at its place, and turns every
error into one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from padd_ds.config import ConfigError, PaddConfig
from padd_ds.paths import REPO_ROOT, expand_user

# Keys that were paper symbols; a recipe or override that still uses one is told the new name.
RENAMED = {
    "stage1.xi": "stage1.path_temperature",
    "stage1.alpha": "stage1.kd_weight",
    "stage1.beta": "stage1.path_kl_weight",
    "stage2.tau": "stage2.base_temperature",
    "stage2.kappa": "stage2.advantage_scale",
    "stage2.phi_floor": "stage2.coupling_floor",
    "stage3.drift_lambda": "stage3.drift_penalty",
    "stage3.seq_clip_eps": "stage3.seq_clip_high",  # and stage3.seq_clip_low: the range is asymmetric
    "stage3.rollout_temperature": "rollout.temperature",
    "stage3.rollout_top_p": "rollout.top_p",
    "stage4.eta": "stage4.balance_rate",
    "stage4.gamma": "stage4.advantage_rate",
}

# --------------------------------------------------------------------------------------
# YAML with YAML 1.2 floats
# --------------------------------------------------------------------------------------
# PyYAML follows YAML 1.1, where `1e-4` (no dot) is a *string*. Recipes and `--set` values
# are written by people who mean a float, so both the loader and the dumper use a 1.2-style
# float rule (the dumper must agree, or a str like "1e5" would be written unquoted).

_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def _with_yaml12_floats(cls):
    cls.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    cls.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))
    return cls


@_with_yaml12_floats
class _Loader(yaml.SafeLoader):
    pass


@_with_yaml12_floats
class _Dumper(yaml.SafeDumper):
    pass


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------------------
# Field types: pydantic checks, we name the field
# --------------------------------------------------------------------------------------


@functools.cache
def _fields(cls) -> dict[str, Any]:
    return get_type_hints(cls)


@functools.cache
def _adapter(tp) -> TypeAdapter:
    return TypeAdapter(tp, config=ConfigDict(strict=True))


def _type_name(tp) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + repr(list(get_args(tp)))
    if get_origin(tp) is dict:
        k, v = get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _given(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _typed(value: Any, tp: Any, key: str, where: str) -> Any:
    """`value` checked against the annotation `tp` of the field `key`."""
    try:
        return _adapter(tp).validate_python(value)
    except ValidationError as e:
        raise _type_error(e.errors()[0], tp, key, where) from None


def _type_error(err: Mapping[str, Any], tp: Any, key: str, where: str) -> ConfigError:
    """pydantic's first error as our line: the dotted key (into a mapping's entries), what
    the field holds and what it got."""
    loc = list(err["loc"])
    while loc and get_origin(tp) is dict:
        entry = loc.pop(0)
        key = f"{key}.{entry}"
        is_key = bool(loc) and loc[0] == "[key]"
        loc = loc[1:] if is_key else loc
        tp = get_args(tp)[0 if is_key else 1]
    value = err["input"]
    if err["type"] == "literal_error":
        return ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(get_args(tp))}{where}")
    hint = ""
    if "str" in _type_name(tp) and isinstance(value, (bool, int, float)):
        hint = "; quote the value to pass it as text"
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {_given(value)}{where}{hint}")


# --------------------------------------------------------------------------------------
# Keys: unknown, misplaced, renamed
# --------------------------------------------------------------------------------------


def _leaf_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _fields(cls).items():
        keys += _leaf_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return keys


def _unknown_key(cls, prefix: str, name: Any, where: str) -> ConfigError:
    dotted = f"{prefix}{name}"
    if dotted in RENAMED:
        return ConfigError(f"key '{dotted}'{where} was renamed to '{RENAMED[dotted]}'")
    # A valid (or renamed) name in the wrong section (train.base_temperature -> stage2.base_temperature)?
    elsewhere = [k for k in _leaf_keys(PaddConfig) if k.rsplit(".", 1)[-1] == name]
    elsewhere += [new for old, new in RENAMED.items() if old.rsplit(".", 1)[-1] == name]
    siblings = list(_fields(cls))
    close = [prefix + c for c in difflib.get_close_matches(str(name), siblings, n=1, cutoff=0.6)]
    if elsewhere or close:
        return ConfigError(f"unknown key '{dotted}'{where}; did you mean '{(elsewhere or close)[0]}'?")
    section = prefix.rstrip(".") or "the top level"
    return ConfigError(f"unknown key '{dotted}'{where}; valid keys of {section}: {', '.join(siblings)}")


# --------------------------------------------------------------------------------------
# Merging a mapping, applying an override
# --------------------------------------------------------------------------------------


def _merge(base: Any, data: Mapping, prefix: str, where: str) -> Any:
    """`base` (a config dataclass) with the values of `data`, a mapping by field name; a
    nested mapping updates a section, any other value replaces the field."""
    fields, changes = _fields(type(base)), {}
    for name, value in data.items():
        if name not in fields:
            raise _unknown_key(type(base), prefix, name, where)
        tp, dotted = fields[name], prefix + name
        if not dataclasses.is_dataclass(tp):
            changes[name] = _typed(value, tp, dotted, where)
        elif value is None:  # a section whose fields are all commented out
            continue
        elif not isinstance(value, Mapping):
            raise ConfigError(f"{dotted}: expected a mapping of {dotted} fields, got {_given(value)}{where}")
        else:
            changes[name] = _merge(getattr(base, name), value, dotted + ".", where)
    return dataclasses.replace(base, **changes)


def _override(cfg: PaddConfig, item: str) -> PaddConfig:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (`1e-4`, `true`, `null`,
    `[1,2]`). A key inside a dict field (`data.split_fractions.A`) updates that entry."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like section.field=value, e.g. train.lr=1e-4")
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): keep the text as typed
    where = f" in --set {item}"
    parts = key.split(".")
    node, prefix = cfg, ""
    for i, name in enumerate(parts[:-1]):
        fields = _fields(type(node))
        if name not in fields:
            raise _unknown_key(type(node), prefix, name, where)
        tp, rest = fields[name], parts[i + 1:]
        if dataclasses.is_dataclass(tp):
            node, prefix = getattr(node, name), f"{prefix}{name}."
            continue
        if get_origin(tp) is not dict or len(rest) != 1:
            raise ConfigError(f"{prefix}{name} holds {_type_name(tp)}; it has no field '{'.'.join(rest)}'{where}")
        value, parts = {**getattr(node, name), rest[0]: value}, parts[: i + 1]
        break
    for name in reversed(parts):
        value = {name: value}
    return _merge(cfg, value, "", where)


# --------------------------------------------------------------------------------------
# Loading and dumping
# --------------------------------------------------------------------------------------


def find_recipe(recipe: str) -> Path:
    """A recipe as given, else in the checkout or its recipes/ folder (`.yaml` optional)."""
    candidates = [expand_user(recipe)]
    if not candidates[0].is_absolute():
        candidates += [REPO_ROOT / recipe, REPO_ROOT / "recipes" / recipe, REPO_ROOT / "recipes" / f"{recipe}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"recipe '{recipe}' not found (looked in {Path.cwd()} and {REPO_ROOT / 'recipes'})")


def read_recipe(recipe: str) -> Mapping[str, Any]:
    """A recipe's YAML as a mapping of sections (empty for an empty file)."""
    try:
        data = _yaml_load(find_recipe(recipe).read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"malformed YAML in {recipe}{line}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in {recipe}: {str(e).splitlines()[0]}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"recipe {recipe} must be a mapping of sections (run:, models:, ...), "
                          f"got a {type(data).__name__}")
    return data or {}


def load_config(recipe: str | None = None, overrides: Sequence[str] = ()) -> PaddConfig:
    """Defaults, then the YAML recipe (a mapping by section), then `section.field=value`
    overrides in order."""
    cfg = PaddConfig()
    if recipe is not None:
        cfg = _merge(cfg, read_recipe(recipe), "", f" in {recipe}")
    for item in overrides:
        cfg = _override(cfg, item)
    return cfg


def from_dict(d: Mapping[str, Any]) -> PaddConfig:
    """Build a config from a (possibly partial) nested mapping, e.g. a saved run config."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config must be a mapping of sections, got a {type(d).__name__}")
    return _merge(PaddConfig(), d, "", "")


def to_dict(cfg: PaddConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: PaddConfig) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
