"""Where morph keeps its own state: $XDG_DATA_HOME/tinymorph (via platformdirs).

Everything is created on first use. `--data-dir` (or MORPH_DATA_DIR) overrides the root,
which tests use to stay out of the user's real data.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from morph.fsutil import user_path

APP_NAME = "tinymorph"
_override: Path | None = None
_bundle_dir: Path | None = None  # set by morph._bundle in the single-file executable


def set_data_dir(path: str | os.PathLike | None) -> None:
    global _override
    _override = user_path(path) if path else None


def data_dir() -> Path:
    root = _override
    if root is None and os.environ.get("MORPH_DATA_DIR"):
        root = user_path(os.environ["MORPH_DATA_DIR"])
    if root is None:
        root = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sub(name: str) -> Path:
    p = data_dir() / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def config_path() -> Path:
    return data_dir() / "config.toml"


def db_path() -> Path:
    return data_dir() / "morph.db"


def models_dir() -> Path:
    return _sub("models")


def packaged_models_dir() -> Path:
    """Models joined from PyPI part packages (kept apart from the user's own files)."""
    return _sub("models") / "packaged"


def user_vectors_dir() -> Path:
    return _sub("vectors")


def recovery_dir() -> Path:
    return _sub("recovery")


def kvcache_dir() -> Path:
    """Saved KV states of editor documents (editor/kvcache.py), bounded in size."""
    return _sub("kvcache")


def history_file(name: str) -> Path:
    """Input-history file for prompt-toolkit sessions (e.g. the REPL)."""
    return data_dir() / f"{name}_history"


def cache_dir() -> Path:
    return _sub("cache")


def set_bundle_dir(path: Path | None) -> None:
    """Where the single-file executable unpacked its payload (morph/_bundle calls this)."""
    global _bundle_dir
    _bundle_dir = path


def shipped_vectors_dir() -> Path:
    """Vectors shipped with morph: inside the wheel, or `vectors/` in a source checkout (or
    in the single-file executable's payload, unpacked at its start)."""
    if _bundle_dir is not None:
        return _bundle_dir / "vectors"
    pkg = Path(__file__).resolve().parent
    inside = pkg / "_shipped_vectors"
    if inside.is_dir():
        return inside
    return pkg.parent / "vectors"


def recipes_dir() -> Path:
    return shipped_vectors_dir() / "recipes"
