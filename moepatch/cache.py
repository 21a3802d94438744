"""Where downloads and pristine base repositories are kept between runs."""

import os
from pathlib import Path

CACHE_ENV = "VLLM_MOE_PATCHES_CACHE"


def cache_root() -> Path:
    """The user cache dir: $VLLM_MOE_PATCHES_CACHE, else $XDG_CACHE_HOME/vllm-moe-patches."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "vllm-moe-patches"
