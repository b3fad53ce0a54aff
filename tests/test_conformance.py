"""One contract for every method, generated from the registry (harness/registry.py METHODS):
a method registered later, in this tree or as a plugin, is held to it with no list to update.

On two targets, the shipped zoo (trained: drafts get accepted) and a random Qwen2 built from a
config (another family, with sliding-window layers), every registered method
  1. equals greedy autoregressive decoding token for token;
  2. ends exactly where autoregressive decoding does at an EOS, at ``max_new_tokens`` and at a
     stop string, each placed inside a block the method committed in one step (when it
     commits more than one token a step on that target);
  3. resumes: after ``reset()`` (where a resumed run's fresh object starts) it gives the same
     Generation as a fresh object, whatever it ran before;
and, on an 8-token model with peaked distributions (tests/sampling_law.py),
  4. keeps the target's exact distribution when it samples (a lossless sampling mode), or
     refuses a sampling config when it declares ``greedy_only``.
What a method needs besides the target (``Method.needs``) is built here, tiny, once per kind.
A toy method registered below (and a broken one, through the same checks) shows both sides.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from harness.config import MethodConfig, SamplingConfig
from harness.datastore import Datastore
from harness.engine import Engine
from harness.models import ZOO_CORAL, ZOO_DRAFT, ZOO_SPACE, ZOO_TARGET
from harness.registry import METHODS, Registry, RegistryError
from methods.acceptance import ChainVerifier
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from harness.stops import StopRule, StopStrings
from harness.drafters.chimera import ChimeraConfig, ChimeraDrafter
from harness.drafters.projector import Projector, ProjectorConfig
from harness.drafters.transfer import TransferConfig, TransferLayers
from harness.neighbours import build_keys
from methods.base import (BLOCK_FINETUNE, CHIMERA_DRAFTER, DATASTORE, DRAFT_MODEL, EAGLE_HEAD, KNN_DATASTORE,
                          MASK_FINETUNE, MEDUSA_HEADS, PROJECTOR, TRANSFER_MAPS, Generation, Method,
                          check_method)  # fmt: skip
from tasks.humaneval import HumanEval, HumanEvalConfig
from tests.conftest import tiny_model
from tests.sampling_law import (METHOD_RUNS, PVALUE_FLOOR, SAMPLE_PROMPT, SAMPLING, SMALL, V,
                                sampled_pvalue)  # fmt: skip
from tests.test_model_families import build, random_eagle_head, random_heads
from tests.test_space import UpstreamRule

GREEDY = SamplingConfig()
NEW_TOKENS = 24  # per generation: several verify steps, a few seconds per method on 2 cores


# ---- a toy method, registered here: the contract runs it with no other edit ------------------
@dataclass
class ToyConfig(MethodConfig):
    name: str = "toy-repeat-last"
    copies: int = 2  # draft tokens per step: the last committed token repeated


class ToyRepeatLast(Method):
    """Drafts the last committed token ``copies`` times and verifies it with the chain verifier."""

    config_class = ToyConfig
    verifier_class = ChainVerifier

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        chain = self.verifier_class(self.engine, self.sampling, stop, prompt_ids, seed)
        chain.prefill()
        while not chain.done:
            chain.verify([chain.seq[-1]] * min(self.cfg.copies, chain.room()))
        return chain.result()


METHODS.add(ToyConfig.name, ToyRepeatLast)  # taken out again when this module's tests end


@pytest.fixture(scope="module", autouse=True)
def _unregister_the_toy():
    yield
    METHODS.remove(ToyConfig.name)


# ---- targets and what methods need on them ----------------------------------------------------
def token_text(ids: list[int]) -> str:
    """A decode for stop strings on any model: ``<id>`` per token, so a string matches whole tokens."""
    return "".join(f"<{t}>" for t in ids)


@dataclass
class Given:
    """What a target gives a method for one of its needs."""

    keywords: dict = field(default_factory=dict)  # constructor keywords (draft=, heads=, head=, datastore=)
    settings: dict = field(default_factory=dict)  # method-config settings (SPACE's k and mask id)


@dataclass
class Target:
    """A target model, its prompts, and the tiny things methods need on it."""

    engine: Engine
    prompts: list[list[int]]
    needs: dict[str, Callable[[type], Given]]  # need -> (method class) -> what it is given
    # need -> the target fine-tuned for it (SPACE's, COrAL's); a need not here runs on the target itself
    finetuned: dict[str, Engine] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # methods built once per (name, sampling mode)

    def engine_for(self, cls: type) -> Engine:
        return next((self.finetuned[n] for n in cls.needs if n in self.finetuned), self.engine)

    def method(self, name: str, sampling: SamplingConfig = GREEDY, fresh: bool = False) -> Method:
        """The registered method ``name`` on this target with its defaults and what it needs."""
        key = (name, sampling.do_sample)
        if fresh or key not in self.cache:
            cls = METHODS.get(name)
            settings = dict(cls.lossless_sampling) if sampling.do_sample else {}
            keywords = {}  # constructor keywords
            for need in cls.needs:
                given = self.needs[need](cls)
                keywords.update(given.keywords)
                settings.update(given.settings)
            method = cls(cls.config_class(**settings), self.engine_for(cls), sampling, **keywords)
            if fresh:
                return method
            self.cache[key] = method
        return self.cache[key]


def seeded(make: Callable, *args):
    """``make(*args)`` after seeding torch: the same random weights every time."""
    torch.manual_seed(0)
    return make(*args)


def perturbed(make: Callable[[], torch.nn.Module], std: float = 0.3) -> torch.nn.Module:
    """``make()`` moved off its start (identity maps, zero heads) by noise, all seeded: the same
    drafts, sometimes wrong, every time."""
    torch.manual_seed(0)
    module = make()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module.eval()


def knn_store(engine: Engine, corpus: list[int]) -> Given:
    return Given({"datastore": Datastore.from_tokens(corpus), "keys": build_keys(engine, np.array(corpus), log=lambda _s: None)})


def random_needs(engine: Engine, draft: Engine, corpus: list[int], mask_id: int) -> dict[str, Callable[[type], Given]]:
    """Tiny random things of every kind for a random target."""
    hidden, vocab = engine.config.hidden_size, engine.config.vocab_size
    return {
        TRANSFER_MAPS: lambda cls: Given({"transfer": perturbed(lambda: TransferLayers(TransferConfig(
            layer=1, k=3, attend_rows=cls.attend_rows, hidden_size=hidden)))}),
        CHIMERA_DRAFTER: lambda cls: Given({"drafter": perturbed(lambda: ChimeraDrafter(ChimeraConfig(
            hidden_size=hidden, vocab_size=vocab, num_heads=4, attention_heads=2)))}),
        KNN_DATASTORE: lambda cls: knn_store(engine, corpus),
        PROJECTOR: lambda cls: Given({"projector": perturbed(lambda: Projector(ProjectorConfig(
            large_hidden=hidden, small_hidden=draft.config.hidden_size, inner=16)))}),
        DRAFT_MODEL: lambda cls: Given({"draft": draft}),
        MEDUSA_HEADS: lambda cls: Given({"heads": seeded(random_heads, engine)}),
        EAGLE_HEAD: lambda cls: Given({"head": random_eagle_head(engine, cls.head_version, engine.config.vocab_size // 2)}),
        MASK_FINETUNE: lambda cls: Given(settings={"k": 2, "mask_id": mask_id}),
        BLOCK_FINETUNE: lambda cls: Given(settings={"k": 2, "mask_id": mask_id}),
        DATASTORE: lambda cls: Given({"datastore": Datastore.from_tokens(corpus)}),
    }


def greedy(engine: Engine, prompt: list[int], stop: StopRule) -> Generation:
    return Autoregressive(AutoregressiveConfig(), engine, GREEDY).generate(prompt, stop)


@functools.lru_cache(maxsize=1)
def zoo() -> Target:
    """The shipped zoo: the target, its draft, its trained heads (the methods' defaults load
    them), its SPACE and COrAL fine-tunes, and a datastore of other HumanEval prompts."""
    torch.set_num_threads(1)
    engine = Engine.load(ZOO_TARGET)
    texts = [s.turns[0] for s in HumanEval(HumanEvalConfig(limit=6)).samples()]
    ids = [engine.tokenizer(t).input_ids for t in texts]
    prompts, corpus = [p[-40:] for p in ids[:2]], [t for p in ids[2:] for t in p]
    draft = Engine.load(ZOO_DRAFT)
    needs = {
        DRAFT_MODEL: lambda cls: Given({"draft": draft}),
        MEDUSA_HEADS: lambda cls: Given(),  # the default: zoo/target-medusa
        EAGLE_HEAD: lambda cls: Given(),  # the defaults: zoo/target-eagle, zoo/target-eagle3
        MASK_FINETUNE: lambda cls: Given(),  # zoo/target-space knows its k and mask id
        BLOCK_FINETUNE: lambda cls: Given(),  # zoo/target-coral knows its k and mask id
        DATASTORE: lambda cls: Given({"datastore": Datastore.from_tokens(corpus)}),
        TRANSFER_MAPS: lambda cls: Given(),  # the defaults: zoo/target-hidden-transfer, zoo/target-firp
        CHIMERA_DRAFTER: lambda cls: Given(),  # the default: zoo/target-chimera
        KNN_DATASTORE: lambda cls: knn_store(engine, corpus),
        PROJECTOR: lambda cls: Given(),  # the default: zoo/target-llm-to-slm
    }
    finetuned = {MASK_FINETUNE: Engine.load(ZOO_SPACE), BLOCK_FINETUNE: Engine.load(ZOO_CORAL)}
    return Target(engine, prompts, needs, finetuned=finetuned)


@functools.lru_cache(maxsize=1)
def qwen2() -> Target:
    """A random Qwen2 with sliding-window layers; the target is its own draft (always right, so
    blocks are long) and the datastore holds its greedy continuations."""
    engine = build("qwen2", 0)
    prompts = [[0, 5, 9, 13, 5, 9, 13, 5], [0, 17, 42, 8, 33, 21]]
    corpus = [t for p in prompts for t in p + greedy(engine, p, StopRule(NEW_TOKENS)).tokens]
    return Target(engine, prompts, random_needs(engine, engine, corpus, mask_id=3))


TARGETS = {"zoo": zoo, "qwen2": qwen2}


# ---- the contract -------------------------------------------------------------------------------
def same(gen: Generation, ref: Generation) -> bool:
    return gen.tokens == ref.tokens and gen.stop_reason == ref.stop_reason


@dataclass
class Cut:
    """Where a stop is put: output token ``at``, inside the block that one step committed from
    token ``start`` on (``start == at``: a plain position)."""

    at: int
    start: int


def cut_point(gen: Generation) -> Optional[Cut]:
    """The first output token that is not the last of its step's block and whose token has not
    occurred before (an EOS there ends generation there); else the first new token after the
    first; None when every token repeats an earlier one."""
    tokens, start = gen.tokens, 0
    for n in gen.accepted_per_step:
        for i in range(start, start + n - 1):
            if tokens[i] not in tokens[:i]:
                return Cut(i, start)
        start += n
    at = next((i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]), None)
    return None if at is None else Cut(at, at)


def check_lossy_contract(method: Method, prompts: list[list[int]]) -> list[str]:
    """A method lossy by design is never compared token for token: every Generation it returns
    says ``lossy`` and ends by the stop rules (at ``max_new_tokens`` at the latest)."""
    problems = []
    for i, prompt in enumerate(prompts):
        for limit in (1, NEW_TOKENS):
            gen = method.generate(prompt, StopRule(limit, frozenset(method.engine.eos_ids)))
            if not gen.lossy or len(gen.tokens) > limit or (len(gen.tokens) < limit and gen.stop_reason != "eos"):
                problems.append(f"prompt {i}, limit {limit}: lossy={gen.lossy}, {len(gen.tokens)} tokens ({gen.stop_reason})")
    return problems


def check_contract(target: Target, name: str) -> list[str]:
    """What ``name`` gets wrong on ``target`` (empty: it keeps the contract)."""
    problems = []
    method = target.method(name)
    if method.lossy_when == "always":
        return check_lossy_contract(method, target.prompts)
    engine = method.engine
    eos = frozenset(engine.eos_ids)
    # 1. token-exact against greedy autoregressive decoding, every prompt
    for i, prompt in enumerate(target.prompts):
        stop = StopRule(NEW_TOKENS, eos)
        if not same(method.generate(prompt, stop), greedy(engine, prompt, stop)):
            problems.append(f"prompt {i}: not token-exact")
    # 2. stops inside a committed block (else at a plain position); reset() first, so every run
    #    makes the same proposals until the stop
    prompt = target.prompts[0]
    method.reset()
    free = method.generate(prompt, StopRule(NEW_TOKENS))
    cut = cut_point(free)
    if cut is not None:
        text = token_text(free.tokens[max(0, cut.at - 1) : cut.at + 1])
        rules = {
            "eos": StopRule(NEW_TOKENS, frozenset({free.tokens[cut.at]})),
            "stop string": StopRule(NEW_TOKENS, strings=StopStrings([text], token_text)),
            "max_new_tokens": StopRule(cut.at + 1),  # fewer tokens allowed: proposals may be shorter
        }
        for kind, stop in rules.items():
            method.reset()
            gen, ref = method.generate(prompt, stop), greedy(engine, prompt, stop)
            if not same(gen, ref) or len(gen.tokens) != cut.at + 1:
                problems.append(f"{kind} at token {cut.at}: {gen.tokens} ({gen.stop_reason}), reference {ref.tokens}")
            elif kind != "max_new_tokens" and free.accepted_per_step and gen.accepted_per_step[-1] != cut.at + 1 - cut.start:
                problems.append(f"{kind} at token {cut.at}: the last step committed {gen.accepted_per_step[-1]} tokens, "
                                f"not the {cut.at + 1 - cut.start} of its block up to the stop")  # fmt: skip
    # 3. resumes: after reset(), the same Generation as a fresh object
    stop = StopRule(NEW_TOKENS, eos)
    fresh = target.method(name, fresh=True).generate(target.prompts[1], stop)
    method.generate(prompt, stop)
    method.reset()
    again = method.generate(target.prompts[1], stop)
    for figure in ("tokens", "accepted_per_step", "target_forwards", "proposed_per_position", "accepted_per_position"):
        if getattr(again, figure) != getattr(fresh, figure):
            problems.append(f"after reset(): {figure} {getattr(again, figure)}, a fresh object {getattr(fresh, figure)}")
    return problems


@functools.lru_cache(maxsize=1)
def law_target() -> Target:
    """The sampling law's 8-token model (three layers: layer-skipping drafts need some), a
    disagreeing draft, and tiny random heads and store."""
    engine, draft = (Engine.from_model(tiny_model(V, seed=s, **{**SMALL, "num_hidden_layers": 3}), None) for s in (0, 1))
    return Target(engine, [SAMPLE_PROMPT], random_needs(engine, draft, SAMPLE_PROMPT * 3, mask_id=7))


def sampling_pvalue(name: str) -> float:
    """p-value of ``name``'s samples against the exact law of the target's first tokens."""
    method = law_target().method(name, SAMPLING)
    return sampled_pvalue(method, method.engine, METHOD_RUNS)[0]


# ---- the tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_keeps_the_contract(name, target):
    assert check_contract(TARGETS[target](), name) == []


@pytest.mark.parametrize("name", METHODS.names())
def test_every_sampling_method_keeps_the_target_distribution(name):
    cls = METHODS.get(name)
    if cls.lossy_when == "always":  # its samples are its own: marked lossy, never held to the target's law
        method = law_target().method(name, SAMPLING)
        assert method.generate(SAMPLE_PROMPT, StopRule(3)).lossy
        return
    if cls.greedy_only:
        with pytest.raises(ValueError, match="greedy"):
            law_target().method(name, SAMPLING).generate(SAMPLE_PROMPT, StopRule(3))
        return
    assert sampling_pvalue(name) > PVALUE_FLOOR


# ---- the contract can fail ----------------------------------------------------------------------
class RepeatWithoutVerifying(ToyRepeatLast):
    """Broken: commits its draft unverified (only its first step is right)."""

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        chain = ChainVerifier(self.engine, self.sampling, stop, prompt_ids, seed)
        chain.prefill()
        while not chain.done:
            chain._commit([chain.seq[-1]] * (self.cfg.copies + 1))
        return chain.result()


class ToyWithBrokenSampling(ToyRepeatLast):
    """Broken: SPACE upstream's rule (after a rejection, the token comes from all of p)."""

    verifier_class = UpstreamRule


def test_broken_methods_fail_the_contract(monkeypatch):
    for broken in (RepeatWithoutVerifying, ToyWithBrokenSampling):
        monkeypatch.setattr(METHODS, "_targets", {**METHODS._targets, broken.__name__: broken})
    assert check_contract(qwen2(), "RepeatWithoutVerifying") != []
    assert sampling_pvalue("ToyWithBrokenSampling") < PVALUE_FLOOR


def test_the_toy_registered_here_is_among_the_cases():
    assert ToyConfig.name in METHODS.names()


# ---- the registry's refusals --------------------------------------------------------------------
def test_registry_refuses_a_taken_name_and_a_class_that_is_not_a_method():
    reg = Registry("method", "harness.test-methods", check="methods.base:check_method")
    reg.add("toy", ToyRepeatLast)
    with pytest.raises(RegistryError, match=r"^method 'toy' is already registered .* under another name$"):
        reg.add("toy", RepeatWithoutVerifying)
    with pytest.raises(RegistryError, match="method 'autoregressive' is already registered"):
        METHODS.add("autoregressive", ToyRepeatLast)

    class NoGenerate(Method):
        config_class = ToyConfig

    class NoConfig(ToyRepeatLast):
        config_class = dict

    class UnknownNeed(ToyRepeatLast):
        needs = ("a crystal ball",)

    refusals = {
        "not-a-method": (object, "is not a subclass of methods.base.Method"),
        "no-generate": (NoGenerate, r"\(NoGenerate\) does not implement generate"),
        "no-config": (NoConfig, r"\(NoConfig\) has config_class .*, not a MethodConfig dataclass"),
        "unknown-need": (UnknownNeed, r"\(UnknownNeed\) needs \['a crystal ball'\], not among"),
    }
    for name, (cls, message) in refusals.items():
        with pytest.raises(TypeError, match=f"^method '{name}' .*{message}"):
            reg.add(name, cls)
        with pytest.raises(TypeError, match=message):
            check_method(name, cls)
    reg.add("lazy-not-a-method", "json:dumps")  # a lazy entry is checked when first resolved
    with pytest.raises(TypeError, match="method 'lazy-not-a-method' is registered as .* not a subclass"):
        reg.get("lazy-not-a-method")
