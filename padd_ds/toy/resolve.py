"""Point `toy://` model references at the built toy models (sets PADD_TOY_DIR).

Kept apart from `build.py` so launching a run never builds: with several ranks starting at
once the build must happen once, before the launch (`padd toy build`, `padd demo`).
"""

from __future__ import annotations

import os

from padd_ds.config import ConfigError, PaddConfig


def use_toy_build_for(cfg: PaddConfig) -> None:
    refs = [cfg.models.teacher, cfg.models.student or "", cfg.models.tokenizer or ""]
    if not (any(r.startswith("toy://") for r in refs) or cfg.data.source == "toy"):
        return
    if os.environ.get("PADD_TOY_DIR"):
        return
    from padd_ds.toy.build import PROFILES, ToyBuildConfig, build_root, is_built  # torch: only when toy models are used

    profile = os.environ.get("PADD_TOY_PROFILE", "demo")
    if profile not in PROFILES:
        raise ConfigError(f"PADD_TOY_PROFILE={profile!r} must be one of {PROFILES}")
    root = build_root(ToyBuildConfig.for_profile(profile))
    if not is_built(root):
        raise ConfigError(f"models: the toy models ({profile} profile) are not built; run "
                          f"`padd toy build --profile {profile}` first")
    os.environ["PADD_TOY_DIR"] = str(root)
