"""Where things live: the repository root, the shipped zoo, the data directory and the cache."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO_DIR = REPO_ROOT / "zoo"
DATA_ENV = "HARNESS_DATA_DIR"
CACHE_ENV = "HARNESS_CACHE"


def default_data_dir() -> Path:
    """``$HARNESS_DATA_DIR`` if set, else ``../shared/datasets`` beside the repository."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else REPO_ROOT.parent / "shared" / "datasets"


def default_cache_dir() -> Path:
    """``$HARNESS_CACHE`` or ``~/.cache/harness`` (checkpoints, datastores and intermediate data live here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "harness"


def resolve_repo_path(path: str | os.PathLike) -> Path:
    """A path as given if it exists from the current directory, else relative to the repo."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p


def is_path_like(text: str) -> bool:
    """True when ``text`` can only be a local path, never a hub id (``name`` or ``owner/name``):
    absolute, starting with ``.`` or ``~``, or with more than one ``/`` (or any ``\\``)."""
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


def write_component(final: Path, save_weights, info: dict, card: str) -> None:
    """Export a trained component (heads, a fine-tune) as ``final``: ``save_weights(dir)``, then
    ``training.json`` (``info``) and ``README.md`` (``card``), written aside and swapped in whole."""
    import json
    import shutil

    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_weights(tmp)
    (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(card, encoding="utf-8")
    replace_dir(tmp, final)


def replace_dir(new: Path, final: Path) -> None:
    """Swap the fully written directory ``new`` into place as ``final`` (old one removed).

    Readers see either the old or the new directory, never a half-written one.
    """
    import shutil

    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    if old.exists():
        shutil.rmtree(old)
