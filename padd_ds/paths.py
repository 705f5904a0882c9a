"""Where things are: the checkout, `~` in user paths, relative paths looked up in two places."""

from __future__ import annotations

import os
from pathlib import Path

# The checkout this package lives in; relative paths (DeepSpeed JSON, recipes, local models)
# are looked up in the current directory first and then here.
REPO_ROOT = Path(__file__).resolve().parents[1]


def expand_user(path: str | os.PathLike) -> Path:
    """`~` and `~user` expanded; a `~user` that does not exist stays as written (pathlib
    raises RuntimeError for it) and then simply names no file."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def local_path(path: str, repo_root: str | Path | None = None) -> Path | None:
    """`path` as an existing file system entry: as given, else relative to the repository."""
    p = expand_user(path)
    if p.exists():
        return p.resolve()
    if not p.is_absolute():
        q = Path(repo_root or REPO_ROOT) / p
        if q.exists():
            return q.resolve()
    return None
