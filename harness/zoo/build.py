"""The zoo pipeline: corpus -> tokenizer -> token data -> (training) -> export with cards.

Intermediate files live in the cache (``$HARNESS_CACHE`` or ``~/.cache/harness``)::

    zoo-data/corpus/      documents.jsonl, corpus_manifest.json
    zoo-data/tokenizer/   tokenizer.json, tokenizer_config.json
    zoo-data/tokens/      train.npy, heldout_<lang>.npy, data_meta.json,
                          train_functions.npy, functions_meta.json (function-level samples)
    train/<model>/        checkpoint.pt, train_state.json, heldout.json

Only exported models (fp16 safetensors + tokenizer + manifest + card) go into ``zoo/``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness.paths import REPO_ROOT, default_cache_dir, replace_dir, resolve_repo_path
from harness.progress import Progress
from harness.zoo.corpus import CorpusConfig, build_corpus, load_corpus, save_corpus, write_json
from harness.zoo.functions import FUNCTIONS_META, FunctionSamplesConfig, encode_function_samples
from harness.zoo.tokenizer import TokenizerConfig, check_tokenizer, load_tokenizer, train_tokenizer


@dataclass
class ZooDataConfig:
    """Where the corpus, tokenizer and token data are built and how."""

    cache_dir: str = ""  # root of intermediate files ("" = $HARNESS_CACHE or ~/.cache/harness)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # what goes into the corpus
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # BPE settings
    functions: FunctionSamplesConfig = field(default_factory=FunctionSamplesConfig)  # function-level samples (train_functions.npy)
    data_seed: int = 0  # order of documents in the training stream
    force: bool = False  # rebuild even if the files exist
    # an exported model whose tokenizer encodes the token data instead of one trained here: a new cache for
    # stages on a shipped zoo (`data.tokenizer_from=zoo/target`), whose tokenizer a re-trained one may not equal
    # (the machine's source files, and so the BPE merges, change over time)
    tokenizer_from: str = ""


@dataclass
class DataPaths:
    root: Path
    corpus: Path
    tokenizer: Path
    tokens: Path


def data_paths(cfg: ZooDataConfig) -> DataPaths:
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    d = root / "zoo-data"
    return DataPaths(root, d / "corpus", d / "tokenizer", d / "tokens")


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_data(cfg: ZooDataConfig, log=print) -> DataPaths:
    """Build corpus, tokenizer and token data unless already there (safe to run concurrently)."""
    from harness.train.lm import encode_corpus  # noqa: PLC0415

    p = data_paths(cfg)
    with _lock(p.root / "zoo-data" / ".lock"), Progress(4, "zoo data", "step") as bar:
        bar.start("corpus")
        if cfg.force or not (p.corpus / "corpus_manifest.json").exists():
            t0 = time.time()
            docs, manifest = build_corpus(cfg.corpus, log=log)
            if not docs:
                raise RuntimeError("the corpus is empty: no source files were found")
            manifest["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            save_corpus(docs, manifest, p.corpus)
            log(f"[zoo] corpus: {len(docs)} files in {time.time() - t0:.0f} s -> {p.corpus}")
            cfg_force_rest = True
        else:
            cfg_force_rest = cfg.force
            docs = None
        bar.start("tokenizer")
        if cfg.tokenizer_from:  # never trained here: the given model's, copied when the cached one differs
            source = resolve_repo_path(cfg.tokenizer_from)
            if tokenizer_hash(p.tokenizer) != tokenizer_hash(source):
                staged = p.tokenizer.with_name(f".{p.tokenizer.name}.new")
                _copy_tokenizer(source, staged)
                replace_dir(staged, p.tokenizer)
                log(f"[zoo] tokenizer: copied from {cfg.tokenizer_from} -> {p.tokenizer}")
                cfg_force_rest = True
        elif cfg_force_rest or not (p.tokenizer / "tokenizer.json").exists():
            if docs is None:
                docs, _ = load_corpus(p.corpus)
            t0 = time.time()
            if p.tokenizer.exists():
                shutil.rmtree(p.tokenizer)
            train_tokenizer((d.text for d in docs if d.split == "train"), cfg.tokenizer, p.tokenizer)
            tok = load_tokenizer(p.tokenizer)
            check_tokenizer(tok, [d.text for d in docs[:20]])
            log(f"[zoo] tokenizer: {len(tok)} tokens in {time.time() - t0:.0f} s -> {p.tokenizer}")
            cfg_force_rest = True
        bar.start("token data")
        if cfg_force_rest or not (p.tokens / "data_meta.json").exists():
            if docs is None:
                docs, _ = load_corpus(p.corpus)
            tok = load_tokenizer(p.tokenizer)
            if p.tokens.exists():
                shutil.rmtree(p.tokens)
            meta = encode_corpus(docs, tok, p.tokens, seed=cfg.data_seed)
            _, manifest = load_corpus(p.corpus)
            manifest["token_counts"] = meta["token_counts"]
            manifest["train_tokens"] = meta["train_tokens"]
            manifest["heldout_tokens"] = meta["heldout_tokens"]
            manifest["tokenizer"] = {"vocab_size": len(tok), "type": "byte-level BPE (tokenizers)",
                                     "special_tokens": {"bos": tok.bos_token, "eos": tok.eos_token,
                                                        "pad": tok.pad_token, "mask": tok.mask_token}}
            write_json(p.corpus / "corpus_manifest.json", manifest)
            log(f"[zoo] token data: {meta['train_tokens']:,} train / {meta['heldout_tokens']:,} held-out tokens -> {p.tokens}")
        bar.start("function samples")
        if cfg_force_rest or not (p.tokens / FUNCTIONS_META).exists():
            if docs is None:
                docs, _ = load_corpus(p.corpus)
            t0 = time.time()
            fmeta = encode_function_samples(docs, load_tokenizer(p.tokenizer), p.tokens, cfg.functions)
            log(f"[zoo] function-level samples: {fmeta['samples']:,} functions, {fmeta['tokens']:,} tokens "
                f"in {time.time() - t0:.0f} s -> {p.tokens / FUNCTIONS_META}")
        bar.done()
    return p


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 of a saved tokenizer's model (vocabulary and merges); "" when there is none."""
    f = model_dir / "tokenizer.json"
    if not f.exists():
        return ""
    model = json.loads(f.read_text(encoding="utf-8")).get("model")
    return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()


def check_token_data(paths: DataPaths, model_dir: Path) -> None:
    """Raise when the cached token data was encoded with another tokenizer than ``model_dir``'s."""
    if tokenizer_hash(paths.tokenizer) != tokenizer_hash(model_dir):
        raise ValueError(f"the cached token data ({paths.tokens}) was encoded with a tokenizer other than "
                         f"{model_dir}'s (the corpus was re-built on this machine): run "
                         f"`harness zoo prepare data.tokenizer_from={model_dir}` to re-encode it with the zoo's tokenizer")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    if not (src / "tokenizer.json").exists():
        raise FileNotFoundError(f"data.tokenizer_from={src}: no tokenizer.json there; give an exported model directory")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- export


@dataclass
class ExportConfig:
    """How checkpoints become shipped zoo models."""

    zoo_dir: str = ""  # destination ("" = the repository's zoo/)
    models: list[str] = field(default_factory=lambda: ["draft", "target"])  # checkpoints to export (by name)
    # exported name -> checkpoint directory under the train root, where they differ (zoo v3: zoo/target is
    # the target continued on function-level samples, zoo/draft the draft distilled from it, second phase
    # draft_top1; a source without a checkpoint yet, e.g. draft-top1 before its stage ran, falls back to the model's own)
    # shipped: target = the unlikelihood fine-tune (what it changed, measured: zoo/target/README.md)
    sources: dict[str, str] = field(default_factory=lambda: {"target": "target-unlikelihood", "draft": "draft-top1"})
    dtype: str = "float16"  # float16 | bfloat16 | float32 weights on disk
    evaluate: bool = True  # compute quality figures (held-out ppl, HumanEval, agreement)
    humaneval_limit: int = 0  # number of HumanEval prompts (0 = all 164)
    healed_prompts: bool = True  # also complete the prompts without their final newline (token-boundary check)
    max_new_tokens: int = 128  # greedy completion length
    # judge each model's greedy HumanEval completions (default stop rules applied) against the problems'
    # tests in the sandbox (harness/sandbox/) for a measured pass@1 on the card; false: not measured
    execute: bool = True
    execute_workers: int = 1  # sandboxed programs run at a time (as run.execute_workers)
    # as run.execute_isolation: "full" refuses to run generated code unless the sandbox has every isolation
    # layer (before anything is generated); "weak" runs with what this machine has, recorded as weak in
    # quality.json and on the card
    execute_isolation: str = "full"
    heldout_max_tokens_per_lang: int = 0  # cap on held-out tokens per language (0 = all)
    threads: int = 0  # torch threads for evaluation (0 = leave)
    draft_name: str = "draft"  # which exported model is the draft (for agreement)
    target_name: str = "target"  # which is the target


def sandbox_isolation(cfg: ExportConfig):
    """The sandbox's isolation for ``export.execute=true`` (``harness.sandbox.Isolation``), None
    when nothing is executed; below full isolation a ValueError (one line: what is missing, and
    ``export.execute_isolation=weak`` or ``export.execute=false``) unless ``execute_isolation=weak``."""
    if not (cfg.evaluate and cfg.execute):
        return None
    from harness.sandbox import IsolationError, require_isolation  # noqa: PLC0415

    try:
        return require_isolation(cfg.execute_isolation, setting="export.execute")
    except IsolationError as e:
        raise ValueError(f"{e}; or skip pass@1 with export.execute=false") from None


def zoo_dir_of(cfg: ExportConfig) -> Path:
    from harness.paths import ZOO_DIR  # noqa: PLC0415

    return Path(cfg.zoo_dir).expanduser() if cfg.zoo_dir else ZOO_DIR


def export_model(name: str, ckpt_dir: Path, paths: DataPaths, zoo_dir: Path, dtype: str = "float16", log=print) -> dict:
    """Write ``zoo_dir/name`` from the latest checkpoint in ``ckpt_dir``; returns training info."""
    import torch  # noqa: PLC0415
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    from harness.train.loop import load_checkpoint  # noqa: PLC0415

    ckpt = load_checkpoint(ckpt_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint for {name!r} in {ckpt_dir}")
    extra = ckpt.get("extra", {})
    config = LlamaConfig.from_dict(extra["llama_config"])
    model = LlamaForCausalLM(config)
    model.load_state_dict(ckpt["model"])
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    model.to(torch_dtype)
    model.config.dtype = dtype
    tok = load_tokenizer(paths.tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=128,
    )
    zoo_dir.mkdir(parents=True, exist_ok=True)
    tmp = zoo_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    (tmp / "model.safetensors").chmod(0o644)
    tok.save_pretrained(str(tmp))
    shutil.copy(paths.corpus / "corpus_manifest.json", tmp / "corpus_manifest.json")
    held = ckpt_dir / "heldout.json"
    data_state = ckpt.get("data", {})
    # an epoch: the corpus windows, or the records of a self-distilled set (draft_distill)
    n_windows = data_state.get("n_records") or max(1, (extra.get("train_stream_tokens", 1) - 1) // max(1, extra.get("seq_len", 1)))
    info = {
        "name": name,
        "parameters": extra.get("n_params"),
        "architecture": extra.get("model"),
        "step": ckpt["step"],
        "planned_steps": ckpt["planned_steps"],
        "schedule": ckpt.get("schedule", "steps"),
        "schedule_complete": bool(ckpt.get("finished", bool(ckpt["planned_steps"]) and ckpt["step"] >= ckpt["planned_steps"])),
        "training_tokens": ckpt["tokens"],
        "epochs": round(data_state.get("epoch", 0) + data_state.get("cursor", 0) / n_windows, 3),
        "wall_time_min": round(ckpt["elapsed_s"] / 60, 1),
        "batch_size": extra.get("batch_size"),
        "seq_len": extra.get("seq_len"),
        "loop_config": ckpt.get("loop_config"),
        "loss_ema_at_export": ckpt.get("loss_ema"),
        "runs": ckpt.get("runs", []),
        "loss_history": ckpt.get("history", [])[:: max(1, len(ckpt.get("history", [])) // 50)],
        "function_share": extra.get("function_share", 0.0),
        "initialized_from": extra.get("init"),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "exported_dtype": dtype,
        "training_precision": "float32 (CPU)",
    }
    if held.exists():
        info["heldout_at_end_of_training"] = read_json(held)
    if "unlikelihood" in extra:  # the target_unlikelihood stage: its recipe and how the rollouts' repetition moved
        from harness.train.unlikelihood import rollout_summary  # noqa: PLC0415

        info["unlikelihood"] = {**extra["unlikelihood"], "rollouts": rollout_summary(extra.get("unlikelihood_steps", []))}
    if "distillation" in extra:  # the draft_distill stage: its recipe (harness/train/distill.py)
        info["distillation"] = extra["distillation"]
    write_json(tmp / "training.json", info)
    final = zoo_dir / name
    replace_dir(tmp, final)
    log(f"[zoo] exported {name}: step {info['step']}/{info['planned_steps']}, {info['training_tokens']:,} tokens, "
        f"{info['wall_time_min']} min -> {final}")
    return info


def evaluate_zoo(zoo_dir: Path, cfg: ExportConfig, paths: DataPaths, log=print, reference: tuple[str, ...] = ()) -> dict[str, dict]:
    """Quality figures for every exported model in ``cfg.models``; writes quality.json files.
    ``reference``: models loaded read-only for the draft/target agreement (e.g. the shipped
    target when only a new draft is evaluated): only their greedy HumanEval completions are
    computed, and nothing of theirs is written.

    Per model: held-out loss/ppl per language; greedy HumanEval completions (``humaneval``: raw,
    up to ``max_new_tokens`` or ``</s>``) and the same completions under the default stop rules
    of ``harness run`` (``humaneval_default_stops``: cut at ``</s>`` or a Codex stop string, with
    the share that ended before the token limit and, unless ``execute=false``, the sandboxed
    ``pass@1`` with its isolation level and judged / skipped counts); draft/target agreement.
    A sandbox below full isolation is refused before anything is generated unless
    ``execute_isolation=weak``."""
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: PLC0415

    from harness.train.lm import heldout_report  # noqa: PLC0415
    from harness.zoo import quality as Q  # noqa: PLC0415

    iso = sandbox_isolation(cfg)  # refuse weak isolation before any work
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    problems = Q.load_humaneval()
    if cfg.humaneval_limit > 0:
        problems = problems[: cfg.humaneval_limit]
    prompts = [p["prompt"] for p in problems]
    models, results, completions = {}, {}, {}
    for name in [*cfg.models, *(r for r in reference if r not in cfg.models)]:
        d = zoo_dir / name
        if not (d / "config.json").exists():
            continue
        tok = AutoTokenizer.from_pretrained(str(d))
        model = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        model.eval()
        models[name] = model
        if name not in cfg.models:  # a reference: its completions only, for the agreement
            completions[name] = Q.greedy_completions(model, tok, prompts, cfg.max_new_tokens)
            continue
        t0 = time.time()
        held = heldout_report(model, paths.tokens, max_tokens_per_lang=cfg.heldout_max_tokens_per_lang)
        log(f"[zoo] {name}: held-out loss {held.get('loss')} (ppl {held.get('ppl')}) in {time.time() - t0:.0f} s")
        t0 = time.time()
        comps = Q.greedy_completions(model, tok, prompts, cfg.max_new_tokens, log=log)
        rep = Q.completion_report(tok, problems, comps)
        gen_s = time.time() - t0
        log(f"[zoo] {name}: HumanEval parse rate {rep['parse_rate']} (with code {rep['parse_rate_with_code']}), repeated 4-grams "
            f"{rep['repeated_4gram_share_mean']} ({gen_s:.0f} s)")
        completions[name] = comps
        stops = Q.stop_rule_report(tok, problems, comps, cfg.max_new_tokens)  # as `harness run` would have stopped
        log(f"[zoo] {name}: with the default stop rules {stops['ended_before_limit']}/{stops['problems']} completions "
            f"end before the token limit ({stops['ended_with_eos']} with </s>, {stops['ended_with_stop_string']} with a "
            f"stop string); parse rate {stops['parse_rate']}, repeated 4-grams {stops['repeated_4gram_share_mean']}")
        verdicts = [None] * len(problems)
        if iso is not None:
            t0 = time.time()
            executed = Q.sandboxed_pass_at_1(problems, stops["texts"], iso, cfg.execute_workers, name)
            verdicts = [r["status"] for r in executed.pop("results")]
            stops["pass@1"] = executed | {"seconds": round(time.time() - t0, 1)}
            log(f"[zoo] {name}: sandboxed pass@1 {executed['pass@1']} ({executed['passed']}/{executed['judged']} judged, "
                f"{executed['skipped']} skipped; {executed['isolation']} isolation)")
        with open(d / "humaneval_completions.jsonl", "w", encoding="utf-8") as f:
            for i, pb in enumerate(problems):
                f.write(json.dumps({"task_id": pb["task_id"], "completion": rep["texts"][i], "parses": rep["parsed"][i],
                                    "completion_default_stops": stops["texts"][i], "stop_reason": stops["reasons"][i],
                                    "execution": verdicts[i]}) + "\n")
        results[name] = {
            "model": name,
            "heldout": held,
            "humaneval": {k: v for k, v in rep.items() if k not in ("texts", "parsed")}
            | {"max_new_tokens": cfg.max_new_tokens, "decoding": "greedy", "seconds": round(gen_s, 1)},
            "humaneval_default_stops": {k: v for k, v in stops.items() if k not in ("texts", "parsed", "reasons")},
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if cfg.healed_prompts:
            # Token-boundary check: with GPT-2's byte-level regex "\n" merges with the next line's
            # indentation, so a prompt ending in a bare "\n" pushes the model to an unindented
            # line; the zoo's tokenizer isolates line breaks, so both figures should be close.
            healed = [p[:-1] if p.endswith("\n") else p for p in prompts]
            t0 = time.time()
            hcomps = Q.greedy_completions(model, tok, healed, cfg.max_new_tokens)
            hrep = Q.completion_report(tok, [{**pb, "prompt": h} for pb, h in zip(problems, healed)], hcomps)
            results[name]["humaneval_prompt_without_final_newline"] = {
                k: v for k, v in hrep.items() if k not in ("texts", "parsed")} | {"seconds": round(time.time() - t0, 1)}
            log(f"[zoo] {name}: without the final newline: parse rate {hrep['parse_rate']} "
                f"(with code {hrep['parse_rate_with_code']})")
        results[name]["_sample"] = {"task_id": problems[0]["task_id"], "prompt_tail": prompts[0][-200:],
                                    "completion": rep["texts"][0]}
    if cfg.draft_name in models and cfg.target_name in models:
        tok = AutoTokenizer.from_pretrained(str(zoo_dir / cfg.target_name))
        agr = Q.greedy_agreement(models[cfg.target_name], models[cfg.draft_name], tok, prompts,
                                 completions[cfg.target_name])
        agr["along"] = f"{cfg.target_name} greedy continuations of the HumanEval prompts (teacher-forced)"
        for name in (cfg.draft_name, cfg.target_name):
            if name in results:  # not a read-only reference
                results[name]["draft_target_agreement"] = agr
        log(f"[zoo] draft/target greedy agreement {agr['agreement']}")
    for name, r in results.items():
        write_json(zoo_dir / name / "quality.json", {k: v for k, v in r.items() if not k.startswith("_")})
    return results


def _fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _continuation_lines(info: dict) -> list[str]:
    """Card paragraph of a model continued from earlier weights on the function-level mix."""
    init = info.get("initialized_from")
    if not init:
        return []
    before = init.get("training_tokens")
    rate = (before / init["elapsed_s"]) if before and init.get("elapsed_s") else None
    share = info.get("function_share") or 0.0
    lines = [
        f"**Continued training (zoo v3):** these weights started from `{init['source']}` ({init['kind']}"
        + (f", {_fmt_int(before)} tokens of from-scratch training" if before else "")
        + f") and were trained on: {share:.0%} of every batch's rows are function-level samples (one whole "
        "function or method with its comment / docstring header, then `</s>`; Python ones start like a "
        f"HumanEval prompt: the imports they use, two blank lines, the `def`), {1 - share:.0%} the file-level "
        "stream as replay. The figures above count this continuation only"
        + (f"; with the from-scratch part the model has seen {_fmt_int(before + info['training_tokens'])} tokens."
           if before else "."),
    ]
    if rate:
        lines += [
            "",
            f"Why a continuation and not a larger model trained from scratch: the from-scratch part ran at "
            f"{rate:,.0f} tokens/s on this CPU; ~20 tokens per parameter for a ~9M-parameter target "
            f"(180M tokens at a lower rate per token) would take over {180e6 / rate / 3600:.0f} hours, "
            "far beyond the zoo's 2-core budget, so the 3.4M shape was kept and given the function-level "
            "data it lacked (tokens/s of both shapes: README, *Training*).",
        ]
    return lines + [""]


def _distillation_lines(info: dict) -> list[str]:
    """Card paragraph of a draft distilled from the target (``draft_distill``)."""
    dist, init = info["distillation"], info.get("initialized_from") or {}
    data = dist.get("data", {})
    pw = dist.get("prompt_weight", 0.0)
    counted = ("the continuation tokens only (the prompts are corpus text the draft was already trained on, and "
               "their next tokens are not the target's)" if not pw else
               f"the continuation tokens, and the prompt tokens with weight {pw} each")
    sha = (dist.get("target_weights_sha256") or "")[:12]
    earlier = (f"; itself distilled before: {init['step']:,} steps of {init['distillation']}"
               if init.get("distillation") and init.get("step") else "")  # fmt: skip
    kind = dist.get("loss", "ce")
    if kind == "ce":
        loss = ("Loss: next-token cross-entropy on the target's outputs (sequence-level knowledge distillation, Kim & "
                "Rush 2016; DistillSpec's fixed teacher-generated data), no target forward per step, counting "
                f"{counted}. ")
    else:
        what = ("cross-entropy against the target's argmax (its greedy choice: the token greedy speculation "
                "accepts)" if kind == "top1" else "forward KL from the target's next-token distribution to the draft's")
        loss = (f"Loss: {what} at every counted position, the target run on each batch (token-level distillation, "
                f"DistillSpec's white-box setting), counting {counted}. ")
    grouped = ", records of similar length batched together" if dist.get("group_by_length") else ""
    return [
        f"**Distilled from the target (zoo v3, `{'draft_top1' if kind == 'top1' else 'draft_distill'}`):** these weights started from `{init.get('source', '?')}` "
        f"({init.get('kind', '?')}{earlier}) and were fine-tuned on the target's self-distilled data: {_fmt_int(data.get('rows'))} "
        f"records of a corpus prompt and `{dist.get('target')}`'s own continuation of it (greedy and sampled; "
        f"{_fmt_int(data.get('tokens'))} tokens, {_fmt_int(data.get('continuation_tokens'))} of them generated by the "
        f"target, weights sha256 {sha}...), `{data.get('path')}`. {loss}"
        f"{info['step']:,} steps of {info.get('batch_size')} records (one per row, up to {info.get('seq_len')} tokens{grouped}, "
        f"{_fmt_int(info['training_tokens'])} trained positions, {info['epochs']} passes over the records), "
        f"{info['wall_time_min']} minutes. The figures below are this distilled draft's.",
        "",
    ]


def _unlikelihood_lines(info: dict) -> list[str]:
    """Card paragraph of a sequence-level unlikelihood fine-tune (``target_unlikelihood``)."""
    ul, init = info["unlikelihood"], info.get("initialized_from") or {}
    r = ul.get("rollouts", {})
    share = info.get("function_share") or 0.0
    return [
        f"**Unlikelihood fine-tune (zoo v3, `target_unlikelihood`):** these weights started from "
        f"`{init.get('source', '?')}` ({init.get('kind', '?')}) and were fine-tuned against their own greedy loops "
        "(sequence-level unlikelihood, Welleck et al. 2019, *Neural Text Generation with Unlikelihood Training*). "
        f"Every optimiser step the current weights continued {ul['rollout_prompts']} training-split prompts "
        f"(function heads and file stretches) greedily, up to {ul['rollout_new_tokens']} tokens; every generated "
        f"token that completes a {ul['ngram']}-gram already present earlier in prompt + continuation got the loss "
        f"-log(1 - p(token)) (summed, divided by the generated tokens), added with weight {ul['ul_weight']} to the "
        f"next-token loss on a corpus batch ({share:.0%} of its rows function samples ending in `</s>`, the rest "
        "file-level text) so that the model keeps the data. "
        f"Share of rollout tokens completing a repeated {ul['ngram']}-gram: {r.get('marked_share_first')} over the "
        f"first {r.get('window')} steps, {r.get('marked_share_last')} over the last {r.get('window')} "
        f"({r.get('steps')} steps logged)."
        + (f" The weights it started from had {init['step']:,} steps, {_fmt_int(init['training_tokens'])} tokens and "
           f"{init['elapsed_s'] / 60:.0f} minutes of their own training (the `target_functions` continuation of the "
           "from-scratch target: see the repository README, *Training*), not counted above."
           if init.get("training_tokens") and init.get("elapsed_s") else ""),
        "",
    ]


def _default_stop_lines(st: dict | None) -> list[str]:
    """Card paragraph: the completions under ``harness run``'s default HumanEval stop rules -- how
    many ended before the token limit -- and their sandboxed pass@1 (with its isolation)."""
    if not st:
        return ["Ending share and functional pass@1: not measured for this export (`harness zoo eval` measures them)."]
    stops = ", ".join(f"`{s.encode('unicode_escape').decode()}`" for s in st["stop"])
    lines = [
        f"With the default stop rules of `harness run` on HumanEval ({stops}): **{st['ended_before_limit_share'] * 100:.1f}%** "
        f"of completions ({st['ended_before_limit']} of {st['problems']}) end before the {st['max_new_tokens']}-token "
        f"limit, {st['ended_with_eos']} with `</s>` and {st['ended_with_stop_string']} at a stop string; so cut, "
        f"{st['parse_rate'] * 100:.1f}% parse, mean repeated 4-gram share {st['repeated_4gram_share_mean']}, "
        f"mean {st['mean_new_tokens']} new tokens.",
        "",
    ]
    ex = st.get("pass@1")
    if not ex:
        return lines + ["Functional pass@1: not measured (`export.execute=false`)."]
    value = "n/a (nothing judged)" if ex["pass@1"] is None else f"{ex['pass@1']:.3f}"
    lines.append(
        f"Functional **pass@1 {value}** ({ex['passed']} of {ex['judged']} judged completions pass the problem's tests, "
        f"{ex['skipped']} skipped; greedy, one completion per problem, cut at the end of the function body, run in "
        f"the sandbox of `harness run` with `run.execute=true`; {ex['isolation']} isolation).")
    if ex["isolation"] != "full":
        lines.append(f"**WEAK isolation**: the generated code ran without every sandbox layer ({ex['isolation_layers']}; "
                     "accepted with `export.execute_isolation=weak`).")
    return lines


TRAIN_SPEED = REPO_ROOT / "results" / "train-speed.json"  # scripts/measure_train_speed.py --out


def _size_lines() -> list[str]:
    """Why the target has its size: the measured training rate of it and of a larger shape."""
    if not TRAIN_SPEED.exists():
        return []
    m = read_json(TRAIN_SPEED)
    rows = m.get("shapes", [])
    cells = "; ".join(f"{r['shape']} ({_fmt_int(r['params'])} parameters): {_fmt_int(r['tokens_per_s'])} training "
                      f"tokens/s, {r['tokens_per_param_in_budget']} tokens/param in {r['budget_min']:g} minutes, "
                      f"20 tokens/param in {20 * r['params'] / r['tokens_per_s'] / 3600:.0f} hours"
                      for r in rows)  # fmt: skip
    return [
        "## Size",
        "",
        f"Measured with compiled training on {rows[0]['threads'] if rows else '?'} threads of an otherwise idle "
        f"{m.get('cpu')} ({m.get('measured_at')}, `scripts/measure_train_speed.py`, `results/train-speed.json`): "
        f"{cells}. A larger target is taken only if it reaches ~20 tokens/param in the training time available; "
        "the larger shape would need days of this machine (the shipped target itself was trained to ~20 "
        "tokens/param over several sessions), so the zoo keeps the smaller one.",
        "",
    ]


def write_card(model_dir: Path, log=print) -> None:
    """README.md of one exported model from its training.json, quality.json and manifest."""
    info = read_json(model_dir / "training.json")
    manifest = read_json(model_dir / "corpus_manifest.json")
    q = read_json(model_dir / "quality.json") if (model_dir / "quality.json").exists() else None
    arch = info.get("architecture") or {}
    name = info["name"]
    status = ("the final checkpoint: the learning-rate schedule ran to its end" if info.get("schedule_complete")
              else f"an intermediate checkpoint at step {info['step']} (about {info['planned_steps']} planned; "
                   "training was still running or was stopped early)")
    lines = [
        f"# zoo/{name}",
        "",
        f"A tiny `LlamaForCausalLM` code model ({_fmt_int(info.get('parameters'))} parameters) trained from scratch on CPU "
        "for the decoding-acceleration benchmarks of this repository. It is a test vehicle for lossless "
        "decoding methods, not a useful code model.",
        "",
        f"**How long it was trained:** {info['wall_time_min']} minutes of wall-clock time (fp32, CPU, "
        f"{info['loop_config'].get('threads') or 'default'} torch thread(s) on a shared 2-core machine), {info['step']:,} optimiser steps of {info.get('batch_size')} x {info.get('seq_len')} tokens, "
        f"{_fmt_int(info['training_tokens'])} training tokens ({info['epochs']} "
        f"{'passes over the self-distilled records' if info.get('distillation') else 'epochs of the corpus'}). This export is {status}.",
        "",
        *(_distillation_lines(info) if info.get("distillation")
          else _unlikelihood_lines(info) if info.get("unlikelihood") else _continuation_lines(info)),
        "## Model",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| parameters | {_fmt_int(info.get('parameters'))} |",
        f"| hidden / layers / heads / MLP | {arch.get('hidden_size')} / {arch.get('num_hidden_layers')} / "
        f"{arch.get('num_attention_heads')} / {arch.get('intermediate_size')} |",
        f"| vocabulary | {manifest.get('tokenizer', {}).get('vocab_size')} (byte-level BPE, shared by the zoo) |",
        f"| tied embeddings | {arch.get('tie_word_embeddings')} |",
        f"| positions | RoPE, max {arch.get('max_position_embeddings')} (trained on {info.get('seq_len')}-token windows) |",
        f"| weights on disk | {info.get('exported_dtype')} safetensors |",
        "| special tokens | `<s>` (BOS, added when encoding), `</s>` (EOS), `<pad>`, `<mask>` (reserved for SPACE) |",
        "",
        *(_size_lines() if name == "target" else []),
        "## Training",
        "",
        f"AdamW (betas {info['loop_config'].get('beta1')}, {info['loop_config'].get('beta2')}, weight decay "
        f"{info['loop_config'].get('weight_decay')}), peak lr {info['loop_config'].get('lr')}, "
        f"{info['loop_config'].get('warmup_steps')} warm-up steps then cosine to "
        f"{info['loop_config'].get('min_lr_ratio')} x peak, gradient clip "
        f"{info['loop_config'].get('grad_clip')}, seed {info['loop_config'].get('seed')}. "
        + (f"The cosine ran over the wall-clock budget of {info['loop_config'].get('max_minutes')} minutes "
           "(`train.max_minutes`, `train.schedule=time`): on a shared CPU the step rate varies, so the schedule "
           "follows elapsed training time, not a step count."
           if info.get("schedule") == "time" else
           f"The cosine ran over {info['planned_steps']} planned steps (`train.schedule=steps`)."),
        f"Training loss (EMA) at export: {round(info.get('loss_ema_at_export') or float('nan'), 4)}.",
        "",
    ]
    runs = info.get("runs") or []
    if len(runs) > 1:
        lines += ["The training was stopped and resumed from its checkpoint; the segments:", "",
                  "| started (UTC) | at step | at minute | schedule | budget (min) | note |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in runs:
            lines.append(f"| {r.get('started_at', '')} | {r.get('step')} | {round(r.get('elapsed_s', 0) / 60, 1)} | "
                         f"{r.get('schedule')} | {r.get('max_minutes')} | {r.get('note', '')} |")
        lines.append("")
    if q:
        h = q["heldout"]
        he = q["humaneval"]
        lines += [
            "## Quality (computed on the exported weights)",
            "",
            f"Held-out loss **{h.get('loss')}**, perplexity **{h.get('ppl')}** over {_fmt_int(h.get('tokens'))} tokens "
            "of held-out files (whole files never seen in training).",
            "",
            "| language | held-out loss | perplexity | tokens |",
            "| --- | --- | --- | --- |",
        ]
        for lang, r in h.get("per_language", {}).items():
            lines.append(f"| {lang} | {r['loss']} | {r['ppl']} | {_fmt_int(r['tokens'])} |")
        lines += [
            "",
            f"HumanEval ({he['problems']} prompts, greedy, {he['max_new_tokens']} new tokens): "
            f"**{he['parse_rate'] * 100:.1f}%** of completions parse as Python (completion cut at the first "
            "non-empty unindented line, then `ast.parse(prompt + completion)`; a completion cut to nothing "
            "parses trivially), "
            f"**{he.get('parse_rate_with_code', float('nan')) * 100:.1f}%** parse and add at least one "
            "non-comment line to the body; mean share of repeated token "
            f"4-grams within a completion **{he['repeated_4gram_share_mean']}**; {he['stopped_at_eos']} completions "
            f"ended with `</s>`; mean {he['mean_new_tokens']} new tokens.",
            "",
            *_default_stop_lines(q.get("humaneval_default_stops")),
        ]
        hh = q.get("humaneval_prompt_without_final_newline")
        if hh:
            lines += [
                "",
                "Prompt-boundary check: the tokenizer keeps a line break apart from the indentation after it, "
                "so a prompt ending in a bare newline (every HumanEval prompt) tokenizes as the same prefix the "
                "model saw in training, and the body starts with its own indentation token. With the final "
                "newline dropped from each prompt instead (the model then writes the newline and indentation "
                f"itself): **{hh['parse_rate'] * 100:.1f}%** parse, **{hh['parse_rate_with_code'] * 100:.1f}%** "
                f"parse with at least one statement; repeated 4-gram share {hh['repeated_4gram_share_mean']}.",
            ]
        if "draft_target_agreement" in q:
            a = q["draft_target_agreement"]
            lines += [
                "",
                f"Draft-vs-target greedy agreement: **{a['agreement']}** of {_fmt_int(a['positions'])} positions "
                f"(argmax of the draft == argmax of the target, teacher-forced along the target's greedy "
                f"HumanEval continuations); mean agreeing run from the start of a continuation "
                f"{a['mean_initial_agreeing_run']} tokens.",
            ]
            if a.get("chain_acceptance"):
                cells = ", ".join(f"{x:.3f}" for x in a["chain_acceptance"])
                lines += [
                    "",
                    f"Per-position acceptance of a greedy chain draft (depth 1..{len(a['chain_acceptance'])}: share of "
                    f"roots in those continuations where the draft's first d greedy tokens all equal the target's): "
                    f"{cells}; mean accepted tokens per target forward at gamma {len(a['chain_acceptance'])} "
                    f"(bonus included) **{a['mean_accepted']}**.",
                ]
        lines += ["", "Figures also in `quality.json`; completions in `humaneval_completions.jsonl`.", ""]
    else:
        lines += ["## Quality", "", "Not evaluated in this export (`export.evaluate=false`).", ""]
    dec = manifest.get("decontamination", {})
    lines += [
        "## Corpus",
        "",
        "Real source code found on the build machine, deduplicated (exact and whitespace-normalised sha256), "
        "capped per language for balance, split into train / held-out by whole file. Full list of files with "
        "hashes in `corpus_manifest.json`.",
        "",
        "| language | source | files (train / held-out) | bytes | train tokens | held-out tokens | decontam. checked / dropped |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    tc = manifest.get("token_counts", {})
    for lang, L in manifest.get("languages", {}).items():
        src = manifest.get("sources", {}).get(lang, {}).get("root") or "not present"
        t = tc.get(lang, {})
        dl = dec.get("per_language", {}).get(lang, {})
        lines.append(f"| {lang} | `{src}` | {L['train_files']} / {L['heldout_files']} | {_fmt_int(L['bytes'])} | "
                     f"{_fmt_int(t.get('train_tokens', 0))} | {_fmt_int(t.get('heldout_tokens', 0))} | "
                     f"{dl.get('files_checked', 0)} / {dl.get('files_dropped', 0)} |")
    lines += [
        "",
        f"Decontamination: {dec.get('method')}; against {', '.join(dec.get('benchmark_files', []))} "
        f"({dec.get('benchmark_tasks')} tasks). Dropped files are listed in the manifest.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoTokenizer, LlamaForCausalLM",
        f'tok = AutoTokenizer.from_pretrained("zoo/{name}")',
        f'model = LlamaForCausalLM.from_pretrained("zoo/{name}")',
        'ids = tok("def add(a, b):\\n", return_tensors="pt").input_ids  # starts with <s>',
        "print(tok.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))",
        "```",
        "",
        "Rebuild: `harness zoo build` (corpus, tokenizer, training, export); resume training: "
        f"`harness train lm model={name}` (same overrides); export: `harness zoo export`.",
        "",
    ]
    (model_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def _older_base(info: dict | None, zoo_dir: Path) -> str:
    """Index words for a component (heads, fine-tune) exported before the model it was trained on
    was last exported: it belongs to earlier weights of that model ("" otherwise)."""
    base = (info or {}).get("base_model", "")
    base_info = zoo_dir / Path(base).name / "training.json" if base.startswith("zoo/") else None
    if not info or not info.get("exported_at") or base_info is None or not base_info.exists():
        return ""
    base_at = read_json(base_info).get("exported_at", "")
    if base_at and info["exported_at"] < base_at:
        return f" (**trained on an earlier `{base}`**, exported {info['exported_at'][:10]}: not retrained since)"
    return ""


def write_zoo_index(zoo_dir: Path) -> None:
    """zoo/README.md: one line per model directory (cards of other components are linked too)."""
    rows = []
    for d in sorted(p for p in zoo_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        info = read_json(d / "training.json") if (d / "training.json").exists() else None
        q = read_json(d / "quality.json") if (d / "quality.json").exists() else {}
        if info and "heads" in info:  # Medusa heads
            h = info["heads"]
            desc = (f"Medusa heads ({h['num_heads']} heads, {h['num_layers']} ResBlock each) for `{info['base_model']}`, "
                    f"{_fmt_int(info.get('parameters'))} params, {_fmt_int(info['training_tokens'])} training tokens, "
                    f"{info['wall_time_min']} min")
        elif info and "head_config" in info:  # EAGLE head
            hc = info["head_config"]
            desc = (f"EAGLE-{info['version']} draft head (hidden {hc.get('hidden_size')}) for `{info.get('base_model', 'zoo/target')}`, "
                    f"{_fmt_int(info.get('parameters'))} params, {_fmt_int(info.get('training_tokens'))} training tokens, "
                    f"{info.get('wall_time_min')} min")
        elif info and "transfer" in info:  # Hidden Transfer / FIRP maps
            t, acc = info["transfer"], info.get("heldout_acceptance", {})
            desc = (f"{info['preset']} maps ({t['k']} rows at layer {t['layer']}) for `{info['base_model']}`, "
                    f"{_fmt_int(info.get('parameters'))} params, {info['wall_time_min']} min; held-out chain "
                    f"acceptance {acc.get('chain_acceptance')}")
        elif info and "drafter" in info:  # Chimera drafter
            chain = info.get("heldout_acceptance", {}).get("chain_acceptance") or []
            desc = (f"Chimera drafter ({info['drafter']['num_heads']} heads) for `{info['base_model']}`, "
                    f"{_fmt_int(info.get('parameters'))} params, {_fmt_int(info['training_tokens'])} training tokens, "
                    f"{info['wall_time_min']} min; held-out chain acceptance {' / '.join(f'{x:.2f}' for x in chain)}")
        elif info and "projector" in info:  # LLM-to-SLM projector
            p = info["projector"]
            desc = (f"LLM-to-SLM projector `{p['large_model']}` -> `{p['small_model']}` (lossy method), "
                    f"{_fmt_int(info.get('parameters'))} params, {_fmt_int(info['training_tokens'])} training tokens, "
                    f"{info['wall_time_min']} min")
        elif info and info.get("method") == "coral":  # COrAL fine-tune
            acc = q.get("acceptance")
            desc = (f"COrAL fine-tune (k = {info['k']}, blocks of {2 * info['k'] + 1}, mask id {info['mask_token_id']}) "
                    f"of {info['base_model']}, {_fmt_int(info['training_tokens'])} training tokens, "
                    f"{info['wall_time_min']} min; held-out acceptance per draft {acc}")
        elif info and "k" in info:  # SPACE fine-tune
            ppl = q.get("space", {}).get("heldout", {}).get("ppl", "n/a")
            source = (info.get("data") or {}).get("source", "corpus")
            desc = (f"SPACE fine-tune (k = {info['k']}, mask id {info['mask_token_id']}) of {info['base_model']}, "
                    f"{_fmt_int(info['training_tokens'])} training tokens ({source} data), {info['wall_time_min']} min; "
                    f"held-out ppl {ppl}")
        elif info:
            ppl = q.get("heldout", {}).get("ppl", "n/a")
            desc = (f"Llama, {_fmt_int(info.get('parameters'))} params, {_fmt_int(info['training_tokens'])} training tokens, "
                    f"{info['wall_time_min']} min; held-out ppl {ppl}")
        elif (d / "README.md").exists():
            first = (d / "README.md").read_text(encoding="utf-8").splitlines()
            desc = next((line for line in first[1:] if line.strip()), "").replace("**", "")[:120]
        else:
            desc = ""
        rows.append(f"| [`{d.name}`]({d.name}/README.md) | {desc}{_older_base(info, zoo_dir)} | {size / 1e6:.1f} MB |")
    total = sum(f.stat().st_size for f in zoo_dir.rglob("*") if f.is_file())
    text = "\n".join([
        "# Model zoo",
        "",
        "Small models that run anywhere (CPU), built from scratch on this machine's own source code by "
        "`harness zoo build` (see each card). Draft and target share one byte-level BPE tokenizer "
        "(4,096 tokens; `<s>`, `</s>`, `<pad>`, `<mask>`).",
        "",
        "| model | what | size |",
        "| --- | --- | --- |",
        *rows,
        "",
        f"Total: {total / 1e6:.1f} MB.",
        "",
        "## Rebuild",
        "",
        "- `harness zoo build` reproduces the whole zoo from scratch: corpus from the machine's own "
        "source code -> tokenizer (+ function-level samples) -> draft and target training -> the target "
        "continued on the file + function-level mix (`target_functions`) -> its unlikelihood fine-tune against "
        "its own greedy loops (`target_unlikelihood`; `export.sources` picks which is exported as `target`) -> export -> "
        "quality -> cards -> the target's self-distillation data (`selfdistill`) -> the draft fine-tuned on it "
        "(`draft_distill`, then `draft_top1` against the target's argmax, each re-exported as `draft`), then the target's Medusa heads, SPACE and COrAL fine-tunes, EAGLE heads and Hidden Transfer / FIRP maps; `stages=[...]` runs some of them, `clean=true` drops "
        "cached data and checkpoints first. Every stage resumes from its last checkpoint when re-run. "
        "Intermediate files and checkpoints live in `$HARNESS_CACHE` (default `~/.cache/harness`).",
        "- `harness train lm model=target train.max_steps=8400 train.threads=2` trains (or resumes) one "
        "model; re-running the same command continues from its last checkpoint.",
        "- `harness zoo export` ships the latest checkpoints here (fp16) with quality figures and cards; "
        "`harness zoo eval` re-evaluates what is shipped.",
        "",
    ])
    (zoo_dir / "README.md").write_text(text, encoding="utf-8")


def export_zoo(cfg: ExportConfig, data: ZooDataConfig, train_root: str = "", log=print) -> dict:
    """Export the latest checkpoints of ``cfg.models``, evaluate them, write cards and index."""
    paths = data_paths(data)
    root = Path(train_root).expanduser() if train_root else paths.root / "train"
    zoo = zoo_dir_of(cfg)
    infos = {}
    for name in cfg.models:
        source = root / cfg.sources.get(name, name)
        if not (source / "checkpoint.pt").exists() and source != root / name:
            log(f"[zoo] {name}: no checkpoint in {source} yet, exporting {root / name}")
            source = root / name
        infos[name] = export_model(name, source, paths, zoo, cfg.dtype, log=log)
    if cfg.evaluate:
        evaluate_zoo(zoo, cfg, paths, log=log)
    else:
        for name in cfg.models:
            q = zoo / name / "quality.json"
            if q.exists():
                q.unlink()  # figures of an older export would be wrong for these weights
    for name in cfg.models:
        write_card(zoo / name, log=log)
    write_zoo_index(zoo)
    return infos
