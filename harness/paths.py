"""Where things live: the repository root, the shipped zoo, the data directory and the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError

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


def export_dir(path: str | os.PathLike, default: str = "") -> Path:
    """Where an export writes: ``path`` (``default`` when empty), ``~`` expanded; a relative
    path is inside the repository, whatever the current directory."""
    p = Path(path or default).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def export_component(
    path: str | os.PathLike, save_weights, info: dict, card: Callable[[dict], str], log: Callable[[str], None], job: str
) -> Path:
    """Export a trained component to ``export_dir(path)`` (``write_component``): stamps ``info``
    with ``exported_at``, writes the weights, ``info`` and ``card(info)``, and logs the step
    exported under ``[train <job>]``. Returns the directory written."""
    import time

    info["exported_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    final = export_dir(path)
    write_component(final, save_weights, info, card(info))
    log(f"[train {job}] exported step {info['step']} -> {final}")
    return final


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


def load_json_file(path: str | os.PathLike, what: str, fix: str, kind: type = dict, error: type = HarnessError) -> Any:
    """The JSON document in ``path``, which must be a ``kind``; anything else (unreadable, not
    UTF-8, not JSON, another type) raises ``error`` in one line naming the file, ``what`` it is
    and the ``fix``."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}; {fix}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    if not isinstance(data, kind):
        raise error(f"{what} {path} holds a JSON {type(data).__name__}, not a {kind.__name__}; {fix}")
    return data
