"""The method interface and the small pieces every method shares (the stop rules are in
harness/stops.py).

A method is constructed once per run with its config and the target ``Engine`` and
then asked to ``generate`` one prompt at a time. It never times itself (the runner
does) and returns a ``Generation``: the new token ids with the stop rules applied, and
the counts that describe how it got there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.engine import DraftClock, Engine
from harness.kvcache import KVCache
from harness.stops import StopRule


@dataclass
class Generation:
    tokens: list[int]  # new token ids, stop rules applied (EOS kept, nothing past it)
    target_forwards: int = 0  # forwards of the target model, prefill included
    draft_forwards: int = 0  # forwards of a draft model (0 if none)
    accepted_per_step: list[int] = field(default_factory=list)  # tokens committed per target forward
    proposed_per_position: list[int] = field(default_factory=list)  # draft tokens proposed at position i
    accepted_per_position: list[int] = field(default_factory=list)  # ...and accepted at position i
    lossy: bool = False  # True for a mode that does not preserve the target distribution
    extra: dict = field(default_factory=dict)  # method-specific figures (tree size, gamma...)
    stop_reason: Optional[str] = None  # what ended it: eos | stop:<string> | max_new_tokens (Committer.reason)


@dataclass
class LoopEnd:
    """What a method's ``loop`` ends with: the result and the state its steps leave behind, which
    tests check (``generate`` returns the ``generation`` alone)."""

    generation: Generation
    cache: KVCache  # the target cache: prompt + committed tokens but the last
    draft_cache: Optional[KVCache] = None  # the draft model's cache, for a method with one (a prefix of prompt + tokens)
    proposed_per_step: list[int] = field(default_factory=list)  # draft tokens proposed per verify step (chain methods)


# What a method needs besides the target model (``Method.needs``). Each is handed to the
# constructor under the keyword named here (or, the fine-tune, read from the target and the
# method config), so a test can build a tiny one of each kind and a catalogue can say what to get.
DRAFT_MODEL = "draft"  # a smaller model sharing the target's tokenizer: keyword draft= (an Engine)
MEDUSA_HEADS = "heads"  # trained Medusa heads: keyword heads= (harness.drafters.medusa.MedusaHeads)
EAGLE_HEAD = "head"  # a trained EAGLE head of the class's ``head_version``: keyword head=
MASK_FINETUNE = "mask-finetune"  # the target fine-tuned to guess at mask tokens (SPACE; config k, mask_id)
DATASTORE = "datastore"  # a token datastore to copy drafts from: keyword datastore= (harness.datastore)
TRANSFER_MAPS = "transfer-maps"  # trained Hidden Transfer / FIRP maps: keyword transfer= (harness.drafters.transfer)
CHIMERA_DRAFTER = "chimera-drafter"  # a trained Chimera drafter: keyword drafter= (harness.drafters.chimera)
KNN_DATASTORE = "knn-datastore"  # a datastore with hidden-state keys: keywords datastore=, keys= (harness.neighbours)
PROJECTOR = "projector"  # a trained LLM-to-SLM projector: keyword projector= (harness.drafters.projector)
BLOCK_FINETUNE = "block-finetune"  # the target fine-tuned to fill and refine a block (COrAL; config k, mask_id)
NEEDS = (DRAFT_MODEL, MEDUSA_HEADS, EAGLE_HEAD, MASK_FINETUNE, DATASTORE, TRANSFER_MAPS, CHIMERA_DRAFTER, KNN_DATASTORE,
         PROJECTOR, BLOCK_FINETUNE)
NEEDS_TEXT = {  # how `harness list` says each
    DRAFT_MODEL: "a draft model",
    MEDUSA_HEADS: "trained Medusa heads",
    EAGLE_HEAD: "a trained EAGLE head",
    MASK_FINETUNE: "a SPACE fine-tune of the target (--model zoo-space)",
    DATASTORE: "a datastore (harness datastore build)",
    TRANSFER_MAPS: "trained transfer maps",
    CHIMERA_DRAFTER: "a trained Chimera drafter",
    KNN_DATASTORE: "a datastore with hidden-state keys (harness datastore build keys=...)",
    PROJECTOR: "a trained projector",
    BLOCK_FINETUNE: "a COrAL fine-tune of the target (--model zoo-coral)",
}


class Method:
    """Base class. Subclasses set ``config_class`` and implement ``generate``
    (``check_method`` says what a registered class must have). Every registered method is
    held to one contract, tests/test_conformance.py: token-exact, stop rules, reset, and the
    sampling law, built from what ``needs`` declares.

    A method whose tests read the state its steps end in (the target cache after compaction,
    the draft cache, the proposal lengths) runs its steps in ``loop``, which returns a ``LoopEnd``:
    that state beside the result; ``generate`` returns the ``Generation`` alone."""

    config_class: type[MethodConfig] = MethodConfig
    # what it needs besides the target (kinds from NEEDS, described by NEEDS_TEXT); () = nothing
    needs: tuple[str, ...] = ()
    # True: greedy decoding only (a sampling config is refused); False: sampling keeps the
    # target's distribution exactly, or the result says ``lossy``
    greedy_only: bool = False
    # method-config settings under which sampling is lossless, where the defaults are not
    # (Medusa's default acceptance is greedy-only)
    lossless_sampling: dict = {}
    # the settings under which its output is NOT the target's (its Generations are marked lossy):
    # "" = none (lossless in every mode), "always" = by design; shown by `harness list`
    lossy_when: str = ""
    # config fields shown on its one line in `harness list` (`harness list methods` shows every field)
    main_settings: tuple[str, ...] = ()
    # True: ``generate`` also takes ``reference_ids``, the sample's reference text tokenised
    # (None when the sample has none); the runner passes it to these methods only
    uses_reference: bool = False
    # True: every sample must have a reference (the runner refuses the run before it starts)
    requires_reference: bool = False
    # the clock of a draft module the method runs itself (an EAGLE, Medusa or Chimera head), set by
    # that method: its forwards are timed as the step's draft forwards; None: no such module
    draft_clock: Optional[DraftClock] = None

    def __init__(self, cfg: MethodConfig, engine: Engine, sampling: SamplingConfig):
        self.cfg = cfg
        self.engine = engine
        self.sampling = sampling

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        """(``uses_reference`` methods: also ``reference_ids: Optional[list[int]] = None``.)"""
        raise NotImplementedError

    def draft_engines(self) -> list[Engine]:
        """Engines other than the target that this method runs (a draft model), for timing."""
        return []

    def draft_timers(self) -> list[Engine | DraftClock]:
        """What the runner times as draft forwards: the draft engines, and the ``DraftClock`` of
        a method that runs its own draft module (an EAGLE or Medusa head). Each has
        ``start_timing()`` and ``stop_timing() -> [(new tokens, seconds)]``."""
        return [*self.draft_engines(), *([self.draft_clock] if self.draft_clock is not None else [])]

    def reset(self) -> None:
        """Forget what earlier ``generate`` calls taught this object (state kept across the
        samples of a run, e.g. suffix decoding's global trie). The runner calls it after the
        untimed warm-up, so no timed sample drafts from the warm-up's output. Default: nothing kept."""

    def headroom(self) -> int:
        """Positions past the last one of a full-length output that a step may use (a tree's
        deeper nodes, a chunk's masks); 0 for chain methods, which propose only what fits."""
        return 0

    def check_context(self, prompt_tokens: int, stop: StopRule) -> None:
        """Refuse a generation whose positions could pass the model's context (the runner checks
        every sample before the run; this guards direct calls)."""
        need = prompt_tokens + stop.max_new_tokens + self.headroom()
        if need > self.engine.max_length:
            raise ValueError(
                f"prompt of {prompt_tokens} tokens + max_new_tokens {stop.max_new_tokens} + {self.headroom()} "
                f"positions for {self.cfg.name}'s steps exceed the model's context of {self.engine.max_length}; "
                "lower max_new_tokens"
            )


def check_method(name: str, cls: object) -> None:
    """Refuse (TypeError, one line naming the method) a class registered as a method that
    does not implement the interface: a ``Method`` subclass with its own ``generate``, a
    ``MethodConfig`` dataclass as ``config_class`` and known ``needs``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"method '{name}' is registered as {cls!r}, which is not a subclass of methods.base.Method")
    if cls.generate is Method.generate:
        raise TypeError(f"method '{name}' ({cls.__name__}) does not implement generate(prompt_ids, stop, seed)")
    if not (isinstance(cls.config_class, type) and issubclass(cls.config_class, MethodConfig)):
        raise TypeError(f"method '{name}' ({cls.__name__}) has config_class {cls.config_class!r}, not a MethodConfig dataclass")
    unknown = [n for n in cls.needs if n not in NEEDS]
    if unknown:
        raise TypeError(f"method '{name}' ({cls.__name__}) needs {unknown}, not among {list(NEEDS)}")


def filter_logits(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``[..., vocab]`` logits (a copy)."""
    out = logits / max(s.temperature, 1e-6)
    if s.top_k and s.top_k < out.shape[-1]:
        kth = torch.topk(out, s.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= s.top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def probabilities(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """The sampling distribution for ``logits`` under ``s`` (float32)."""
    return torch.softmax(filter_logits(logits.float(), s), dim=-1)


def next_token(logits: torch.Tensor, s: SamplingConfig, gen: Optional[torch.Generator]) -> int:
    """Argmax when greedy, else a sample from the filtered distribution."""
    if not s.do_sample:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, s), 1, generator=gen))


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
