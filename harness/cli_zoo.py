"""``harness zoo prepare|build|export|eval [key=value ...]``: the model zoo.

- ``prepare``: corpus -> tokenizer -> token data (in the cache; skipped if present).
- ``build``: everything from scratch: prepare, train draft, train target (each resumable,
  one after the other, with their plans), continue the target on the file + function-level
  mix (``target_functions``, zoo v3), fine-tune that with sequence-level unlikelihood against
  its own greedy loops (``target_unlikelihood``), export them with quality figures and cards, generate
  the target's self-distillation data (``selfdistill``), fine-tune the draft on it
  (``draft_distill``: next-token CE on its outputs; ``draft_top1``: then CE against its argmax, the target run
  on each batch; each re-exported as zoo/draft with new figures, zoo/target untouched), then train and export the
  target's Medusa heads (on the self-distilled data; ``medusa_greedy``: then on its greedy records only), its SPACE and
  COrAL fine-tunes (``space``, ``coral``) and its EAGLE-1/2 and EAGLE-3 heads (``eagle``,
  ``eagle3``, on the self-distilled data), its Hidden Transfer and FIRP maps (``hidden_transfer``,
  ``firp``), Chimera's drafter (``chimera``) and the LLM-to-SLM projector into the draft
  (``llm_to_slm``), on the same data. ``stages=[...]``
  runs a subset (a finished stage is skipped on a re-run: its checkpoint says so);
  ``clean=true`` first deletes the cached data and checkpoints.
- ``export``: export the latest checkpoints (fp16 safetensors + tokenizer + manifest) to
  ``zoo/``, evaluate them (``export.evaluate=false`` to skip) and write the cards.
- ``eval``: re-evaluate the exported models and rewrite their cards.

``harness zoo <cmd> --cfg`` prints the composed configuration.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.cli_train import FINETUNES, HEAD_TRAINERS, export_finetune
from harness.progress import Progress
from harness.train.lm import DRAFT, TARGET, LMTrainConfig, ModelConfig
from harness.train.chimera import ChimeraTrainConfig
from harness.train.coral import CoralTrainConfig
from harness.train.llm_to_slm import LlmToSlmTrainConfig
from harness.train.medusa import MedusaTrainConfig
from harness.train.distill import DraftDistillConfig
from harness.train.eagle import EagleTrainConfig
from harness.train.hidden_transfer import TransferTrainConfig
from harness.train.space import SpaceTrainConfig
from harness.train.unlikelihood import UnlikelihoodTrainConfig
from harness.zoo.build import ExportConfig, ZooDataConfig
from harness.zoo.selfdistill import SelfDistillConfig

# stages that train a head or drafter on the frozen target: stage -> (trainer in cli_train.HEAD_TRAINERS,
# checkpoint directory under the train root)
HEAD_STAGES = {"eagle": ("eagle", "eagle"), "eagle3": ("eagle", "eagle3"),
               "hidden_transfer": ("hidden-transfer", "hidden-transfer"), "firp": ("hidden-transfer", "firp"),
               "chimera": ("chimera", "chimera"), "llm_to_slm": ("llm-to-slm", "llm-to-slm")}  # fmt: skip
STAGES = ("draft", "target", "target_functions", "target_unlikelihood", "export", "selfdistill", "draft_distill", "draft_top1",
          "medusa", "medusa_greedy", "space", "coral", "eagle", "eagle3", "hidden_transfer", "firp", "chimera",
          "llm_to_slm")
FUNCTIONS_CHECKPOINT = "target-functions"  # <train_root>/<this>: the target_functions stage's checkpoint
UNLIKELIHOOD_CHECKPOINT = "target-unlikelihood"  # <train_root>/<this>: the target_unlikelihood stage's checkpoint
DISTILL_CHECKPOINT = "draft-distill"  # <train_root>/<this>: the draft_distill stage's checkpoint
TOP1_CHECKPOINT = "draft-top1"  # <train_root>/<this>: the draft_top1 stage's checkpoint (zoo/draft ships it)

USAGE = "usage: harness zoo {prepare|build|export|eval} [key=value ...] [--quiet]   (--cfg shows all keys)"


@dataclass
class ZooCommand:
    """Top-level config of ``harness zoo``."""

    data: ZooDataConfig = field(default_factory=ZooDataConfig)  # corpus / tokenizer / token data
    draft: ModelConfig = field(default_factory=lambda: DRAFT)  # draft architecture
    target: ModelConfig = field(default_factory=lambda: TARGET)  # target architecture
    # ~20 training tokens per parameter (8,192 tokens per step): 0.95M x 20 and 3.44M x 20
    draft_train: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(max_steps=2400, lr=3e-3, compile=True))  # draft plan
    target_train: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(max_steps=8400, compile=True))  # target plan
    # zoo v3: the finished target continued on a file-level + function-level mix (checkpoint
    # <train_root>/target-functions, exported as zoo/target); init_from "" = the target stage's checkpoint.
    # function_share=0.5: half of every batch's rows are whole functions ending in </s>, half the
    # file-level stream as replay; 900 steps x 8,192 tokens (7.4M tokens, ~2.5 h on one loaded thread;
    # the shipped run was planned for 2,400, cut to 1,200 at step 490 and to 900 at step 552: the cosine follows the plan)
    target_functions_train: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(
        max_steps=900, lr=1e-3, warmup_steps=50, seed=1, function_share=0.5, compile=True))
    # the continued target fine-tuned against its own greedy loops (sequence-level unlikelihood,
    # harness/train/unlikelihood.py; checkpoint <train_root>/target-unlikelihood); init_from "" =
    # the target_functions checkpoint; zoo/target ships it when export.sources maps target to it
    target_unlikelihood: UnlikelihoodTrainConfig = field(default_factory=UnlikelihoodTrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)  # export / evaluation settings
    # the exported target's own continuations of corpus prompts (greedy and sampled), for distilled drafters
    selfdistill: SelfDistillConfig = field(default_factory=SelfDistillConfig)
    # the draft fine-tuned on that data (sequence-level KD; checkpoint <train_root>/draft-distill, init_from "" =
    # the draft stage's checkpoint), exported as zoo/draft with its quality and agreement against the shipped target
    draft_distill: DraftDistillConfig = field(default_factory=DraftDistillConfig)
    # its second phase: CE against the target's argmax (the target run on each batch), 45 minutes on one thread
    # (checkpoint <train_root>/draft-top1, init_from "" = the draft_distill checkpoint); chosen over KL by
    # 6-minute pilots (harness/train/distill.py)
    draft_top1: DraftDistillConfig = field(default_factory=lambda: DraftDistillConfig(
        loss="top1", lr=2e-4, max_steps=0, max_minutes=45, group_by_length=True))
    # heads on the exported target (the shipped zoo: Medusa 40 minutes beside draft_distill, one thread each)
    medusa: MedusaTrainConfig = field(default_factory=lambda: MedusaTrainConfig(max_minutes=40))
    # their second phase: on the greedy self-distilled records only, where the tokens a head must foresee are the
    # target's greedy ones (checkpoint <train_root>/medusa-greedy, init_from "" = the medusa checkpoint), 40 minutes
    # beside draft_top1; exported over zoo/target-medusa. Chosen by 6-minute pilots (harness/train/medusa.py)
    medusa_greedy: MedusaTrainConfig = field(default_factory=lambda: MedusaTrainConfig(
        greedy_only=True, lr=3e-4, max_minutes=40, group_by_length=True))
    # SAR fine-tune of the exported target; every block's masks carry a loss (the AR loss is always there)
    space: SpaceTrainConfig = field(default_factory=lambda: SpaceTrainConfig(mask_prob=1.0, max_minutes=60))
    # COrAL's order-agnostic block fine-tune of the exported target (42 minutes on one loaded thread)
    coral: CoralTrainConfig = field(default_factory=lambda: CoralTrainConfig(max_minutes=42))
    # EAGLE heads on the exported target, trained on its self-distilled data (corpus windows if there is none)
    eagle: EagleTrainConfig = field(default_factory=lambda: EagleTrainConfig(version=1, max_minutes=30))
    eagle3: EagleTrainConfig = field(default_factory=lambda: EagleTrainConfig(version=3, max_minutes=25))
    # Hidden Transfer's and FIRP's maps on the exported target (frozen), on its self-distilled data, one thread
    hidden_transfer: TransferTrainConfig = field(default_factory=lambda: TransferTrainConfig(preset="hidden-transfer"))
    firp: TransferTrainConfig = field(default_factory=lambda: TransferTrainConfig(preset="firp"))
    # Chimera's drafter on the exported target, trained on its self-distilled data (corpus windows if there is none)
    chimera: ChimeraTrainConfig = field(default_factory=lambda: ChimeraTrainConfig(max_minutes=35))
    # LLM-to-SLM's projector from the exported target into the exported draft, on the target's self-distilled data
    llm_to_slm: LlmToSlmTrainConfig = field(default_factory=lambda: LlmToSlmTrainConfig(max_minutes=30))
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # build only: which stages run, in this order
    train_root: str = ""  # checkpoint root ("" = <cache>/train; models in <train_root>/<name>)
    clean: bool = False  # build only: delete cached data and these checkpoints first


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore  # noqa: PLC0415

    ConfigStore.instance().store(name="zoo", node=ZooCommand)


def main(argv: list[str]) -> int:
    from harness.cli_train import dispatch  # noqa: PLC0415

    runners = {"prepare": _prepare, "build": _build, "export": _export, "eval": _eval}
    return dispatch(argv, USAGE, runners, lambda _what: "zoo", "zoo command", register_configs)


def _prepare(cmd: ZooCommand) -> int:
    from harness.zoo.build import prepare_data  # noqa: PLC0415

    p = prepare_data(cmd.data)
    print(f"[zoo] data ready under {p.root / 'zoo-data'}")
    return 0


def _build(cmd: ZooCommand) -> int:
    from harness.zoo.build import data_paths, sandbox_isolation  # noqa: PLC0415

    unknown = [s for s in cmd.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown zoo stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    if {"export", "draft_distill", "draft_top1"} & set(cmd.stages):
        sandbox_isolation(cmd.export)  # export.execute below full isolation: refused before hours of training
    paths = data_paths(cmd.data)
    root = Path(cmd.train_root).expanduser() if cmd.train_root else paths.root / "train"
    if cmd.clean:
        for d in (paths.corpus, paths.tokenizer, paths.tokens, root / cmd.draft.name, root / cmd.target.name,
                  root / cmd.export.sources.get(cmd.target.name, cmd.target.name),
                  root / FUNCTIONS_CHECKPOINT, root / UNLIKELIHOOD_CHECKPOINT, root / DISTILL_CHECKPOINT, root / TOP1_CHECKPOINT,
                  root / "medusa", root / "medusa-greedy", root / "space", root / "coral", root / "eagle", root / "eagle3",
                  root / "hidden-transfer", root / "firp", paths.root / "zoo-data" / "selfdistill"):  # fmt: skip
            if d.exists():
                shutil.rmtree(d)
                print(f"[zoo] removed {d}")
    with Progress(1 + len(cmd.stages), "zoo build", "stage") as bar:
        return _build_stages(cmd, paths, root, bar)


def _build_stages(cmd: ZooCommand, paths, root: Path, bar: Progress) -> int:
    """The stages ``cmd.stages`` names, in the order they depend on each other (each a ``bar`` stage)."""
    from harness.train.lm import make_job, run_lm_training  # noqa: PLC0415
    from harness.train.medusa import run_medusa_training  # noqa: PLC0415
    from harness.zoo.build import check_token_data, export_zoo, prepare_data, write_zoo_index, zoo_dir_of  # noqa: PLC0415

    bar.start("data")
    prepare_data(cmd.data)
    fn_target = replace(cmd.target, name=FUNCTIONS_CHECKPOINT)
    cmd.target_functions_train.init_from = cmd.target_functions_train.init_from or str(root / cmd.target.name)
    for stage, model, train_cfg in (("draft", cmd.draft, cmd.draft_train), ("target", cmd.target, cmd.target_train),
                                    ("target_functions", fn_target, cmd.target_functions_train)):
        if stage in cmd.stages:
            bar.start(stage)
            if stage == "target_functions":
                _restart_if_init_changed(root / model.name, train_cfg.init_from)
            job = make_job(model, train_cfg, paths, str(root / model.name))
            _res, summary = run_lm_training(job)
            print(f"[zoo] trained {model.name}: {summary}")
            if not _res.finished:
                print(f"[zoo] {model.name} stopped before its plan ended: rerun to continue")
                return 1
    if "target_unlikelihood" in cmd.stages:
        bar.start("target_unlikelihood")
        from harness.train.unlikelihood import run_unlikelihood_training  # noqa: PLC0415

        ul = cmd.target_unlikelihood
        ul.init_from = ul.init_from or str(root / FUNCTIONS_CHECKPOINT)
        _restart_if_init_changed(root / UNLIKELIHOOD_CHECKPOINT, ul.init_from)
        res, summary = run_unlikelihood_training(ul, paths, str(root / UNLIKELIHOOD_CHECKPOINT))
        print(f"[zoo] trained {UNLIKELIHOOD_CHECKPOINT}: {summary}")
        if not res.finished:
            print(f"[zoo] {UNLIKELIHOOD_CHECKPOINT} stopped before its plan ended: rerun to continue")
            return 1
    if "export" in cmd.stages:
        bar.start("export")
        cmd.export.models = [cmd.draft.name, cmd.target.name]
        cmd.export.draft_name, cmd.export.target_name = cmd.draft.name, cmd.target.name
        export_zoo(cmd.export, cmd.data, str(root))
    zoo = zoo_dir_of(cmd.export)
    if {"draft_distill", "draft_top1", "medusa", "medusa_greedy", "space", "coral", "eagle", "eagle3", "chimera", "llm_to_slm"} & set(cmd.stages) and (zoo / cmd.target.name).exists():
        check_token_data(paths, zoo / cmd.target.name)  # their held-out figures read the cached token data
    if "selfdistill" in cmd.stages:
        bar.start("selfdistill")
        from harness.zoo.corpus import load_corpus  # noqa: PLC0415
        from harness.zoo.selfdistill import generate_selfdistill  # noqa: PLC0415

        if cmd.export.zoo_dir:  # a zoo elsewhere: distil its target
            cmd.selfdistill.model = str(zoo / cmd.target.name)
        cmd.selfdistill.out_dir = cmd.selfdistill.out_dir or str(paths.root / "zoo-data" / "selfdistill" / cmd.target.name)
        st = generate_selfdistill(cmd.selfdistill, load_corpus(paths.corpus)[0])
        print(f"[zoo] self-distillation data: {st}")
    phases = (("draft_distill", cmd.draft_distill, DISTILL_CHECKPOINT, root / cmd.draft.name),
              ("draft_top1", cmd.draft_top1, TOP1_CHECKPOINT, root / DISTILL_CHECKPOINT))
    for stage, job, checkpoint, start in phases:
        if stage not in cmd.stages:
            continue
        bar.start(stage)
        if not _distill_draft(cmd, job, checkpoint, start, paths, root, zoo):
            return 1
    # the heads and fine-tunes read this build's token data and self-distilled records (its data.cache_dir)
    for job, export_name in ((cmd.medusa, "target-medusa"), (cmd.medusa_greedy, "target-medusa"), (cmd.space, "target-space"),
                             (cmd.coral, "target-coral"),                             (cmd.eagle, "target-eagle"), (cmd.eagle3, "target-eagle3"),
                             (cmd.hidden_transfer, "target-hidden-transfer"), (cmd.firp, "target-firp"),
                             (cmd.chimera, "target-chimera"), (cmd.llm_to_slm, "target-llm-to-slm")):  # fmt: skip
        job.data_dir = job.data_dir or str(paths.tokens)
        job.selfdistill_dir = job.selfdistill_dir or cmd.selfdistill.out_dir or str(
            paths.root / "zoo-data" / "selfdistill" / cmd.target.name)
        if cmd.export.zoo_dir:  # a zoo elsewhere (tests, experiments): train on and write into it
            job.base, job.export_dir = str(zoo / cmd.target.name), str(zoo / export_name)
    if "medusa" in cmd.stages:
        bar.start("medusa")
        cmd.medusa.out_dir = cmd.medusa.out_dir or str(root / "medusa")
        _restart_if_base_changed(Path(cmd.medusa.out_dir), cmd.medusa.base)
        _res, summary = run_medusa_training(cmd.medusa)  # exports to medusa.export_dir at the end
        print(f"[zoo] trained medusa heads: {summary}")
    if "medusa_greedy" in cmd.stages:
        bar.start("medusa_greedy")
        job = cmd.medusa_greedy
        job.out_dir = job.out_dir or str(root / "medusa-greedy")
        job.init_from = job.init_from or str(root / "medusa")
        _restart_if_base_changed(Path(job.out_dir), job.base)
        _restart_if_init_changed(Path(job.out_dir), job.init_from)
        _res, summary = run_medusa_training(job)  # exports over medusa_greedy.export_dir at the end
        print(f"[zoo] trained medusa heads, second phase: {summary}")
    for stage, (module_name, function) in FINETUNES.items():  # fine-tunes of the whole target, then their export
        if stage not in cmd.stages:
            continue
        bar.start(stage)
        job, module = getattr(cmd, stage), importlib.import_module(module_name)
        job.out_dir = job.out_dir or str(root / stage)
        _restart_if_base_changed(Path(job.out_dir), job.base)
        res, summary = getattr(module, function)(job)
        print(f"[zoo] trained {stage}: {summary}")
        if res.finished:
            print(f"[zoo] exported {export_finetune(stage, module, job)}")
    for stage, (trainer, checkpoint) in HEAD_STAGES.items():  # heads and drafters on the frozen target
        if stage not in cmd.stages:
            continue
        bar.start(stage)
        job = getattr(cmd, stage)
        job.out_dir = job.out_dir or str(root / checkpoint)
        if stage == "llm_to_slm" and cmd.export.zoo_dir:
            job.small = str(zoo / cmd.draft.name)  # this build's draft, not the shipped one
        _restart_if_base_changed(Path(job.out_dir), job.base)
        module, function = HEAD_TRAINERS[trainer]
        _res, summary = getattr(importlib.import_module(module), function)(job)  # exports at the end
        print(f"[zoo] trained {stage}: {summary}")
    bar.done()
    if zoo.exists():
        write_zoo_index(zoo)
    return 0


def _distill_draft(cmd: ZooCommand, job: DraftDistillConfig, checkpoint: str, start: Path, paths, root: Path, zoo: Path) -> bool:
    """A ``draft_distill`` / ``draft_top1`` stage: fine-tune the draft (``job.init_from``, else
    ``start``) on the target's self-distilled records into ``<train_root>/<checkpoint>``
    (restarted when its start or the data changed), then export it as zoo/draft, evaluate it
    with the shipped target loaded read-only for the agreement (zoo/target is not written) and
    rewrite its card. False when training stopped before its plan ended."""
    from harness.paths import resolve_repo_path  # noqa: PLC0415
    from harness.train.distill import data_fingerprint, run_draft_distill  # noqa: PLC0415
    from harness.zoo.build import evaluate_zoo, export_model, write_card  # noqa: PLC0415

    job.init_from = job.init_from or str(start)
    job.out_dir = job.out_dir or str(root / checkpoint)
    job.target = str(zoo / cmd.target.name)
    job.selfdistill_dir = job.selfdistill_dir or cmd.selfdistill.out_dir or str(
        paths.root / "zoo-data" / "selfdistill" / cmd.target.name)
    fingerprint = f"{_init_fingerprint(resolve_repo_path(job.init_from))} data={data_fingerprint(job)}"
    if job.loss != "ce":  # (a CE run's stamp keeps its earlier form, so its checkpoint still resumes)
        fingerprint += f" loss={job.loss}"
    _restart_if_changed(Path(job.out_dir), f"{job.init_from} or the self-distilled data", fingerprint, "init.stamp")
    res, summary = run_draft_distill(job, name=checkpoint)
    print(f"[zoo] trained {checkpoint}: {summary}")
    if not res.finished:
        print(f"[zoo] {checkpoint} stopped before its plan ended: rerun to continue")
        return False
    export_model(cmd.draft.name, Path(job.out_dir), paths, zoo, cmd.export.dtype)
    init_manifest = resolve_repo_path(job.init_from) / "corpus_manifest.json"
    if init_manifest.exists():  # started from an exported model: its card names the corpus it was trained on
        shutil.copy2(init_manifest, zoo / cmd.draft.name / "corpus_manifest.json")
    quality = zoo / cmd.draft.name / "quality.json"
    if cmd.export.evaluate:
        only_draft = replace(cmd.export, models=[cmd.draft.name], draft_name=cmd.draft.name, target_name=cmd.target.name)
        evaluate_zoo(zoo, only_draft, paths, reference=(cmd.target.name,))
    elif quality.exists():
        quality.unlink()  # figures of the draft before distillation would be wrong for these weights
    write_card(zoo / cmd.draft.name)
    return True


def _restart_if_base_changed(out_dir: Path, base: str) -> None:
    """Heads and fine-tunes belong to one base: when the base's weights changed since the
    checkpoint in ``out_dir`` was started, that checkpoint is deleted and training restarts."""
    import hashlib

    from harness.paths import resolve_repo_path  # noqa: PLC0415

    weights = resolve_repo_path(base) / "model.safetensors"
    if not weights.exists():
        return  # a hub id or another layout: the trainer reports what it cannot load
    _restart_if_changed(out_dir, base, hashlib.sha256(weights.read_bytes()).hexdigest(), "base.sha256")


def _init_fingerprint(source: Path) -> str:
    """What identifies the weights a continued training starts from: a checkpoint's step,
    tokens and elapsed time, or an exported model's sha256."""
    import hashlib
    import json

    if (source / "train_state.json").exists():
        st = json.loads((source / "train_state.json").read_text())
        return f"checkpoint step={st['step']} tokens={st['tokens']} elapsed_s={st['elapsed_s']}"
    for weights in ("model.safetensors", "medusa_lm_head.safetensors"):  # an exported model, or exported heads
        if (source / weights).exists():
            return "sha256=" + hashlib.sha256((source / weights).read_bytes()).hexdigest()
    raise FileNotFoundError(f"{source} holds no checkpoint or exported model to continue from "
                            "(run the stage it continues first, or set target_functions_train.init_from / "
                            "target_unlikelihood.init_from)")


def _restart_if_init_changed(out_dir: Path, init_from: str) -> None:
    """A continued training belongs to its initial weights: when they changed since the
    checkpoint in ``out_dir`` was started (the target was trained further), it restarts."""
    from harness.paths import resolve_repo_path  # noqa: PLC0415

    _restart_if_changed(out_dir, init_from, _init_fingerprint(resolve_repo_path(init_from)), "init.stamp")


def _restart_if_changed(out_dir: Path, source: str, fingerprint: str, stamp_name: str) -> None:
    """Delete ``out_dir`` (a checkpoint) when ``source``'s fingerprint differs from the one
    stamped there when it was started; then stamp the current one."""
    stamp = out_dir / stamp_name
    if out_dir.exists() and (not stamp.exists() or stamp.read_text().strip() != fingerprint):
        shutil.rmtree(out_dir)
        print(f"[zoo] {source} changed since {out_dir} was started: starting it again")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")


def _export(cmd: ZooCommand) -> int:
    from harness.zoo.build import export_zoo  # noqa: PLC0415

    export_zoo(cmd.export, cmd.data, cmd.train_root)
    return 0


def _eval(cmd: ZooCommand) -> int:
    from harness.zoo.build import data_paths, evaluate_zoo, write_card, write_zoo_index, zoo_dir_of  # noqa: PLC0415

    zoo = zoo_dir_of(cmd.export)
    missing = [m for m in cmd.export.models if not (zoo / m / "config.json").exists()]
    if missing:
        raise FileNotFoundError(f"not exported yet: {', '.join(missing)} (run harness zoo export)")
    evaluate_zoo(zoo, cmd.export, data_paths(cmd.data))
    for m in cmd.export.models:
        write_card(zoo / m)
    write_zoo_index(zoo)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
