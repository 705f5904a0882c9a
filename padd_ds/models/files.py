"""A model on disk, without torch: where it is, its config.json, its weight and tokenizer
files, and whether teacher and student share one tokenizer. Every error is a one-line
ConfigError naming the config field (`name`) that points at the files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from padd_ds.config import ConfigError, PaddConfig, require
from padd_ds.models.arch import moe_shape
from padd_ds.paths import local_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def resolve_model_path(
    ref: str, repo_root: str | Path | None = None, *, field_name: str = "model", need_config: bool = True
) -> str:
    """Resolve a model reference to a local directory or a hub id.

    `toy://NAME` -> `$PADD_TOY_DIR/NAME` (`padd toy build` sets PADD_TOY_DIR). A local path
    must exist and hold `config.json`. A string that is not a local path counts as a hub id
    only if it looks like `org/name`. `field_name` names the config field in errors.
    """
    if ref.startswith("toy://"):
        name = ref[len("toy://"):]
        toy_dir = os.environ.get("PADD_TOY_DIR")
        if not name:
            raise ConfigError(f"{field_name}: '{ref}' names no toy model; use e.g. toy://teacher")
        if not toy_dir:
            raise ConfigError(f"{field_name}: '{ref}' needs the toy models; run `padd toy build` first (it sets PADD_TOY_DIR)")
        path = Path(toy_dir) / name
        if not path.is_dir():
            raise ConfigError(f"{field_name}: toy model '{name}' not found in PADD_TOY_DIR={toy_dir}; run `padd toy build`")
        ref = str(path)
    local = local_path(ref, repo_root)
    if local is None:
        if HUB_ID.match(ref):
            return ref
        raise ConfigError(f"{field_name}: path '{ref}' does not exist")
    if need_config and not (local / "config.json").is_file():
        raise ConfigError(f"{field_name}: '{local}' has no config.json; point it at a Hugging Face model directory")
    return str(local)


def read_model_config(path: str | Path) -> dict[str, Any]:
    """A model directory's config.json as a dict."""
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"'{file}' not found; a model directory needs its config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{file}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"'{file}' must hold a JSON object")
    return data


def student_moe_shape(path: str | Path) -> tuple[int, int] | None:
    """(routed experts, top-k) from a local model's config.json, or None for a dense model."""
    return moe_shape(read_model_config(path), where=str(Path(path) / "config.json"))


def check_weights(path: Path, name: str) -> None:
    """A local model directory holds safetensors weights, every shard its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set((json.loads(index.read_text()).get("weight_map") or {}).values()))
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"{name}: '{index}' is not a valid safetensors index (JSON with a weight_map)") from None
        missing = [f for f in shards if not (path / f).is_file()]
        require(
            not missing and bool(shards),
            f"{name}: '{path / (missing[0] if missing else index.name)}' "
            + (f"is missing ({len(missing)} of {len(shards)} shards listed in {index.name}); the checkpoint is "
               "incomplete, copy or download it again" if missing else "lists no shards"),
        )
        return
    if any(path.glob("*.safetensors")):
        return
    pickle = next((f.name for f in (path / "pytorch_model.bin", path / "pytorch_model.bin.index.json") if f.is_file()), None)
    raise ConfigError(
        f"{name}: '{path}' has only pickle weights ({pickle}); padd-ds loads safetensors only, convert them"
        if pickle else
        f"{name}: '{path}' has no model weights (model.safetensors or model.safetensors.index.json); "
        "point it at a complete Hugging Face model directory"
    )


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def tokenizer_ids(path: str | Path) -> dict[int, str] | None:
    """id -> token of a fast tokenizer's tokenizer.json (model vocabulary plus added
    tokens), or None when the directory has none."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{file}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    vocab = (data.get("model") or {}).get("vocab") or {}
    # BPE/WordPiece/WordLevel: {token: id}; Unigram: [[piece, score], ...] in id order.
    ids = {i: p[0] for i, p in enumerate(vocab)} if isinstance(vocab, list) else {i: t for t, i in vocab.items()}
    ids.update({t["id"]: t["content"] for t in data.get("added_tokens") or []})
    return ids or None


def check_shared_tokenizer(tokenizer: str, student: str, teacher_vocab: Any, student_vocab: Any) -> None:
    """Teacher and student speak one tokenizer (`tokenizer`, a directory).

    Their embedding tables may differ in size when the difference is only padding (Qwen2.5
    pads to 152064 rows, Qwen3 to 151936, both over one tokenizer): every id the shared
    tokenizer produces must exist in both tables. Rows beyond the tokenizer are never
    produced by it; the teacher's such rows are padding the student can never be asked for.
    A student that ships its own tokenizer must map every id of the shared one to the same
    token (it may add tokens after them); otherwise KD compares unrelated tokens."""
    tv, sv = teacher_vocab, student_vocab
    ids = tokenizer_ids(tokenizer)
    if tv != sv:
        require(
            ids is not None,
            f"models.student: vocab_size {sv} differs from the teacher's {tv} and '{tokenizer}' has no tokenizer.json "
            "to show the extra rows are only padding; point models.tokenizer at the shared tokenizer's directory",
        )
        n, smaller = max(ids) + 1, min(tv, sv)
        require(
            n <= smaller,
            f"models.student: vocab_size {sv} differs from the teacher's {tv}, and the tokenizer in '{tokenizer}' "
            f"produces ids up to {n - 1}, beyond the {smaller} rows of the "
            f"{'student' if sv < tv else 'teacher'}; teacher and student need one tokenizer family",
        )
    own = tokenizer_ids(student) if Path(student).resolve() != Path(tokenizer).resolve() else None
    if own is not None and ids is not None:
        bad = next(((i, t) for i, t in sorted(ids.items()) if own.get(i) != t), None)
        require(
            bad is None,
            f"models.student: its tokenizer maps id {bad and bad[0]} to {bad and own.get(bad[0])!r}, the shared "
            f"tokenizer to {bad and bad[1]!r}; teacher and student need one tokenizer family (same ids, same tokens)",
        )


def model_paths(cfg: PaddConfig) -> tuple[str, str | None, str]:
    """(teacher, student or None when it is decompressed from the teacher, tokenizer)."""
    teacher = resolve_model_path(cfg.models.teacher, field_name="models.teacher")
    student = (resolve_model_path(cfg.models.student, field_name="models.student")
               if cfg.models.student is not None else None)
    tok = (resolve_model_path(cfg.models.tokenizer, field_name="models.tokenizer", need_config=False)
           if cfg.models.tokenizer else teacher)  # a tokenizer-only directory has no config.json
    return teacher, student, tok
