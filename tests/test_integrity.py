"""Run directories under stress: one writer, torn and binary tails, interrupts, runs that never
started, damaged files, and a matrix of bad inputs (each one line, no traceback, a non-zero
exit, the earlier records untouched)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.results import RunDir

PROMPTS = ["def add(a, b):", "for i in range", "class Foo:", "int main() {", "function f(x) {", "x = 1"]
BINARY_TAIL = b'{"method": "autoregressive", "te\xff\xfe\x00\x01'


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


@pytest.fixture(scope="module")
def many_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "many.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"x = {i}"}) + "\n" for i in range(40)))
    return path


def run_args(model_dir, prompts, out, n=4) -> list[str]:
    return ["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", str(n),
            "--out", str(out), "run.progress=false", "run.threads=1"]  # fmt: skip


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def start(args: list[str]) -> subprocess.Popen:
    """`harness` in a process of its own, Ctrl-C live in it as in a terminal (a pytest-xdist worker
    ignores SIGINT, and an ignored signal stays ignored across exec)."""
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def wait_for_records(out: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    samples, deadline = out / "samples.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if samples.exists() and samples.read_bytes().count(b"\n") >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run wrote fewer than {at_least} records (exit {proc.poll()})")


# ---- one writer ------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_first(model_dir, many_prompts, tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(model_dir, many_prompts, out, n=24)
    first = start(args)
    wait_for_records(out, 1, first)  # it holds the lock from before loading the model
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {out} is being written by another `harness run` (PID {first.pid} on host "
                   f"{platform.node()}); wait for it to end (or stop it), or give another --out")  # fmt: skip
    assert first.wait(timeout=600) == 0
    keys = [(r["method"], r["sample_id"]) for r in records(out)]
    assert len(keys) == len(set(keys)) == 40  # the first's records, each once
    assert main(args) == 0  # the lock went with its holder: a later run resumes (nothing left to do)


def test_a_lock_left_by_kill_9_does_not_block(model_dir, many_prompts, tmp_path):
    out = tmp_path / "run"
    args = run_args(model_dir, many_prompts, out, n=24)
    proc = start(args)
    wait_for_records(out, 2, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "writer.lock").read_text().split()[0] == str(proc.pid)  # the file stays; the lock does not
    assert main(args + ["--limit", "3"]) == 0


# ---- torn and binary tails ---------------------------------------------------------------------


def test_binary_torn_tail_after_kill_9_resumes_to_the_same_tokens(model_dir, many_prompts, tmp_path, capsys):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    args = run_args(model_dir, many_prompts, killed, n=24) + ["--limit", "12"]
    proc = start(args)
    wait_for_records(killed, 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = (killed / "samples.jsonl").read_bytes()
    kept = kept[: kept.rindex(b"\n") + 1]  # what kill -9 leaves, then a torn binary line in flight
    (killed / "samples.jsonl").write_bytes(kept + BINARY_TAIL)
    assert main(["leaderboard", str(killed)]) == 0  # a reader skips it, and leaves the file as it is
    assert "skipped the torn last line" in capsys.readouterr().err
    assert (killed / "samples.jsonl").read_bytes() == kept + BINARY_TAIL
    assert main(args) == 0  # resume: moved aside, the rest run
    assert (killed / "samples.corrupt.jsonl").read_bytes() == BINARY_TAIL + b"\n"
    assert main(run_args(model_dir, many_prompts, clean, n=24) + ["--limit", "12"]) == 0

    def tokens(out):
        return {r["sample_id"]: r["tokens"] for r in records(out)}

    assert len(records(killed)) == 12 and tokens(killed) == tokens(clean)


@pytest.mark.parametrize("tail", [b'{"method": "autoreg', b"\x00" * 300, BINARY_TAIL, b"\x89PNG\x1a\x00 binary"])
def test_every_torn_tail_is_moved_aside_by_resume(model_dir, prompts, tmp_path, tail):
    out = tmp_path / "run"
    args = run_args(model_dir, prompts, out) + ["--limit", "2"]
    assert main(args) == 0
    before = (out / "samples.jsonl").read_bytes()
    (out / "samples.jsonl").write_bytes(before + tail)
    assert main(args) == 0
    assert (out / "samples.jsonl").read_bytes() == before
    assert (out / "samples.corrupt.jsonl").read_bytes() == tail + b"\n"


# ---- interrupts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_is_one_line_and_the_run_resumes(model_dir, many_prompts, tmp_path, sig, status):
    out = tmp_path / "run"
    # long enough that the signal lands mid-run on an idle machine too (40 samples of 48 tokens)
    args = run_args(model_dir, many_prompts, out, n=48) + ["--limit", "40"]
    proc = start(args)
    wait_for_records(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    saved = len(records(out))
    assert proc.returncode == status
    assert err.strip() == f"interrupted: {saved} records saved in {out}; rerun the same command (same --out) to resume"
    assert main(args) == 0
    keys = [r["sample_id"] for r in records(out)]
    assert len(keys) == len(set(keys)) == 40


# ---- a run that never started ----------------------------------------------------------------


def test_a_manifest_without_records_is_taken_over(model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(model_dir, prompts, out) + ["--limit", "1"]) == 0
    (out / "samples.jsonl").write_bytes(BINARY_TAIL)  # died in its first record
    for command in (["leaderboard", str(out)], ["baseline", str(out), "--out", str(tmp_path / "b.json")]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {out}: no records yet") and len(err.splitlines()) == 1
    assert main(run_args(model_dir, prompts, out, n=5) + ["--limit", "2"]) == 0  # another config: taken over
    assert f"taking over {out}: its manifest has no records yet" in capsys.readouterr().out
    assert [r["sample_id"] for r in records(out)] == ["p0", "p1"]
    assert RunDir(out).manifest()["config"]["run"]["max_new_tokens"] == 5


# ---- the bad-input matrix ----------------------------------------------------------------------------

# (extra arguments of `harness run` on a copy of a finished run, the start of the one error line)
RUN_CASES = [
    (["sampling.do_sample=true", "sampling.temperature=0"], "sampling.temperature=0.0 is not valid: must be > 0"),
    (["sampling.do_sample=true", "sampling.temperature=-1"], "sampling.temperature=-1.0 is not valid: must be > 0"),
    (["sampling.top_p=2"], "sampling.top_p=2.0 is not valid: must be 0 < top_p <= 1"),
    (["sampling.top_p=0"], "sampling.top_p=0.0 is not valid: must be 0 < top_p <= 1"),
    (["sampling.top_p=-0.5"], "sampling.top_p=-0.5 is not valid"),
    (["sampling.top_k=-5"], "sampling.top_k=-5 is not valid: must be >= 0"),
    (["sampling.top_k=abc"], "bad config override"),
    (["sampling.do_sample=maybe"], "bad config override"),
    (["run.threads=-1"], "run.threads=-1 is not valid: must be >= 1 (or 0 = torch's default)"),
    (["run.threads=two"], "bad config override"),
    (["task.stop=[1,2]"], "task.stop=[1, 2] must be a list of strings, but 1 is of type int; quote each item: task.stop=['1','2']"),
    (["task.stop=[ok,3.5]"], "task.stop=['ok', 3.5] must be a list of strings, but 3.5 is of type float"),
    (["task.stop=['']"], "task.stop=[''] holds an empty string"),
    (["model.device=cuda"], "model.device='cuda' is not valid: this machine has no CUDA device; use model.device=cpu|auto"),
    (["model.device=cuda:3"], "model.device='cuda:3' is not valid: this machine has no CUDA device"),
    (["model.device=tpu"], "model.device='tpu' is not valid: must be auto, cpu, cuda or cuda:N"),
    (["model.dtype=float8"], "model.dtype='float8' is not valid: must be float32 or bfloat16 or float16"),
    (["model.attn_implementation=flash"], "model.attn_implementation='flash' is not valid: must be sdpa or eager"),
    (["model.compile_buckets=[0]"], "model.compile_buckets=[0] is not valid: must be sizes >= 1"),
    (["model.compile_cache_len=-1"], "model.compile_cache_len=-1 is not valid"),
    (["--max-new-tokens", "0"], "run.max_new_tokens=0 is not valid: must be >= 1"),
    (["--max-new-tokens", "-4"], "run.max_new_tokens=-4 is not valid: must be >= 1"),
    (["run.warmup=-1"], "run.warmup=-1 is not valid: must be >= 0"),
    (["run.warmup_tokens=0"], "run.warmup_tokens=0 is not valid: must be >= 1"),
    (["run.tie_margin=-1"], "run.tie_margin=-1.0 is not valid: must be >= 0"),
    (["run.execute_workers=0"], "run.execute_workers=0 is not valid: must be >= 1"),
    (["run.execute_isolation=none"], "run.execute_isolation='none' is not valid: must be full or weak"),
    (["--methods", "lookahead", "method.lookahead.window=0"], "method.lookahead.window must be >= 1"),
    (["--limit", "0"], "--limit 0 (task.limit): a limit must be at least 1 sample"),
    (["--limit", "-3"], "--limit -3 (task.limit): a limit must be at least 1 sample"),
    (["task.shard=5", "task.num_shards=2"], "task.shard=5 task.num_shards=2: need num_shards >= 1"),
    (["task.too_long=maybe"], "task.too_long='maybe': use error"),
    (["task.split=bogus"], "task.split='bogus': use all, tune"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["no_such_key=1"], "bad config override"),
    (["task.no_such_field=1"], "bad config override"),
    (["--max-new-tokens", "5"], "{out} holds a run made with a different config"),  # the finished run's own --out
]


@pytest.fixture(scope="module")
def finished(model_dir, prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(run_args(model_dir, prompts, out) + ["--limit", "2"]) == 0
    return out


def one_error_line(capsys, start: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: " + start), err


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("extra, message", RUN_CASES, ids=[" ".join(c[0]) for c in RUN_CASES])
def test_bad_run_input(model_dir, prompts, finished, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    capsys.readouterr()
    assert main(run_args(model_dir, prompts, out) + ["--limit", "2"] + extra) == 2
    one_error_line(capsys, message.format(out=out))
    after = snapshot(out)
    for files in (before, after):
        files.pop("writer.lock", None)  # names its last holder
    assert after == before  # nothing written, the records intact


def damage(kind: str, tmp_path: Path, finished: Path, model_dir: Path, prompts: Path) -> tuple[list[str], str]:
    """A damaged file or directory of ``kind``: (the command line, the start of its error line)."""
    run, baseline = tmp_path / "run", tmp_path / "baseline.json"
    shutil.copytree(finished, run)
    good_baseline = tmp_path / "good.json"
    assert main(["baseline", str(finished), "--out", str(good_baseline)]) == 0
    check = ["check", str(run), "--baseline", str(baseline)]
    fix_baseline = "re-create it with `harness baseline RUN_DIR --out FILE`"
    text = good_baseline.read_text()
    if kind == "baseline truncated":
        baseline.write_text(text[: len(text) // 2])
        return check, f"baseline {baseline} is not valid JSON"
    if kind == "baseline a list":
        baseline.write_text("[]")
        return check, f"baseline {baseline} holds a JSON list, not a dict; {fix_baseline}"
    if kind == "baseline empty object":
        baseline.write_text("{}")
        return check, f"baseline {baseline} has keys [], expected"
    if kind == "baseline binary":
        baseline.write_bytes(b"\xff\xfe\x00")
        return check, f"baseline {baseline} is not UTF-8 text"
    if kind == "baseline missing":
        return check, f"cannot read baseline {baseline}"
    if kind == "baseline row without figures":
        data = json.loads(text)
        data["rows"][0].pop("tokens_hash")
        baseline.write_text(json.dumps(data))
        return check, f"baseline {baseline} row 0 lacks tokens_hash"
    if kind == "baseline bad tolerances":
        data = json.loads(text)
        data["tolerances"] = {"speed": 1}
        baseline.write_text(json.dumps(data))
        return check, f"baseline {baseline} has bad tolerances"
    manifest = run / "manifest.json"
    if kind == "manifest truncated":
        manifest.write_text(manifest.read_text()[:40])
        return ["leaderboard", str(run)], f"run manifest {manifest} is not valid JSON"
    if kind == "manifest a list":
        manifest.write_text("[1, 2]")
        return ["leaderboard", str(run)], f"run manifest {manifest} holds a JSON list"
    if kind == "manifest without config":
        manifest.write_text("{}")
        return ["check", str(run), "--baseline", str(good_baseline)], f"run manifest {manifest} has no `config` object"
    if kind == "manifest on resume":
        manifest.write_bytes(b"\xff\x00" * 5)
        return run_args(model_dir, prompts, run), f"run manifest {manifest} is not UTF-8 text"
    if kind == "not a run directory":
        return ["leaderboard", str(tmp_path)], f"{tmp_path} is not a run directory (no manifest.json)"
    if kind == "corrupt middle record":
        lines = (run / "samples.jsonl").read_bytes().split(b"\n")
        lines[0] = b"\xff" + lines[0]
        (run / "samples.jsonl").write_bytes(b"\n".join(lines))
        return ["leaderboard", str(run)], f"{run / 'samples.jsonl'} line 1 is corrupt"
    if kind == "execution results corrupt":
        (run / "execution.jsonl").write_bytes(b'{"status": "pas')
        return ["leaderboard", str(run)], f"{run / 'execution.jsonl'} line 1 is not a JSON object"
    if kind == "--out is a file":
        (tmp_path / "file").write_text("x")
        return run_args(model_dir, prompts, tmp_path / "file"), f"--out {tmp_path / 'file'} is a file"
    if kind == "--out below a file":
        (tmp_path / "file").write_text("x")
        return run_args(model_dir, prompts, tmp_path / "file" / "run"), f"cannot write to {tmp_path / 'file'}"
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    if kind == "model weights truncated":
        weights = next(model.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
        return run_args(model, prompts, tmp_path / "new"), f"model file {weights} is damaged"
    if kind == "model weights header garbage":
        weights = next(model.glob("*.safetensors"))
        weights.write_bytes(b"\xff" * 64)
        return run_args(model, prompts, tmp_path / "new"), f"model file {weights} is damaged"
    if kind == "model config not JSON":
        (model / "config.json").write_text("{\"model_type\": ")
        return run_args(model, prompts, tmp_path / "new"), f"model file {model / 'config.json'} is not valid JSON"
    if kind == "tokenizer file truncated":
        tokenizer = model / "tokenizer.json"
        tokenizer.write_text(tokenizer.read_text()[:100])
        return run_args(model, prompts, tmp_path / "new"), f"model file {tokenizer} is not valid JSON"
    raise AssertionError(kind)


FILE_CASES = [
    "baseline truncated", "baseline a list", "baseline empty object", "baseline binary", "baseline missing",
    "baseline row without figures", "baseline bad tolerances", "manifest truncated", "manifest a list",
    "manifest without config", "manifest on resume", "not a run directory", "corrupt middle record",
    "execution results corrupt", "--out is a file", "--out below a file", "model weights truncated",
    "model weights header garbage", "model config not JSON", "tokenizer file truncated",
]  # fmt: skip


@pytest.mark.parametrize("kind", FILE_CASES)
def test_damaged_file(model_dir, prompts, finished, tmp_path, capsys, kind):
    command, message = damage(kind, tmp_path, finished, model_dir, prompts)
    records_before = (finished / "samples.jsonl").read_bytes()
    capsys.readouterr()
    assert main(command) == 2
    one_error_line(capsys, message)
    assert (finished / "samples.jsonl").read_bytes() == records_before


def test_the_matrix_is_at_least_40_cases():
    assert len(RUN_CASES) + len(FILE_CASES) >= 40


@pytest.mark.parametrize("kind", ["manifest truncated", "manifest a list", "tokens truncated", "arrays disagree"])
def test_damaged_datastore_is_named(tmp_path, kind):
    from harness.datastore import FORMAT, Datastore, DatastoreError

    store = tmp_path / "store"
    Datastore.from_tokens([3, 1, 4, 1, 5, 9, 2, 6], {"format": FORMAT}).save(store)
    assert len(Datastore.load(store)) == 8  # the control: whole, it loads
    if kind == "manifest truncated":
        (store / "manifest.json").write_text('{"format": ')
        message = f"datastore manifest {store / 'manifest.json'} is not valid JSON"
    elif kind == "manifest a list":
        (store / "manifest.json").write_text("[]")
        message = f"datastore manifest {store / 'manifest.json'} holds a JSON list, not a dict"
    elif kind == "tokens truncated":
        (store / "tokens.npy").write_bytes((store / "tokens.npy").read_bytes()[:90])
        message = f"datastore file {store / 'tokens.npy'} cannot be read"
    else:
        Datastore.from_tokens([3, 1, 4], {"format": FORMAT}).save(tmp_path / "small")
        shutil.copy(tmp_path / "small" / "sa.npy", store / "sa.npy")
        message = f"datastore {store}: sa.npy has 3 entries for 8 tokens"
    with pytest.raises(DatastoreError) as err:
        Datastore.load(store)
    assert str(err.value).startswith(message) and "harness datastore build force=true" in str(err.value)
