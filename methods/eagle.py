"""EAGLE (Li et al. 2024): a one-layer draft head over the target's own features drafts a
static token tree autoregressively; one target forward verifies it with the tree mask.

The head (``harness.drafters.eagle``) reads pairs (target feature of token j, token j+1) on its
own small KV cache. State between steps: the committed tokens ``seq``, the target's cache of
``seq[:-1]`` (``TreeVerifier``), the head's cache of the pairs it has run, and the pairs not run
yet (the target features of the last verify's accepted nodes with the tokens committed after
each). One step:

  1. the head runs the pending pairs; its last output (at the root, the last committed token)
     gives the root's children;
  2. level by level, the head runs the drafted nodes that have children, each reading its
     parent's output and its own token, attending to the committed pairs and its ancestors
     (the tree mask; position = root's + depth); its logits give the next level;
  3. the head's cache is rolled back to the committed pairs (draft entries are never kept);
  4. the shared tree step (methods/tree.py): one target forward, acceptance, commit, the
     accepted nodes' target features become the next pending pairs.

Trees (``tree``, ``choices``): tuples of ranks as Medusa's / upstream's, e.g. (0,), (1,), (0, 0):
the child of rank r of a node is its r-th most likely token under the head. Sampling
(``candidates``): ``topk`` keeps those deterministic candidates (the multi-candidate one-hot
rule); ``sampled`` draws each node's children i.i.d. from the head's distribution q (the
template fixes only how many) and verifies with SpecInfer's rule min(1, p/q). Both lossless.

``eagle2`` (dynamic tree) and ``eagle3`` (fused-feature head) build on ``HeadDrafter`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.drafters.eagle import DecodingHeadCache, EagleHead, EagleHeadError, load_head
from harness.engine import DraftClock, Engine, ForwardOutput
from harness.stops import StopRule
from methods.base import EAGLE_HEAD, Generation, Method, make_generator, probabilities
from methods.tree import DraftTree, TreeError, TreeVerifier

TREES: dict[str, list[tuple[int, ...]]] = {
    # 5 draft tokens in a line
    "chain": [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0)],
    # 14 nodes, 5 deep: the top-1 path with second choices near the root
    "small": [(0,), (1,), (2,),
              (0, 0), (0, 1), (1, 0),
              (0, 0, 0), (0, 0, 1), (0, 1, 0),
              (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0),
              (0, 0, 0, 0, 0)],
    # 30 nodes, 6 deep
    "medium": [(0,), (1,), (2,), (3,),
               (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
               (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (1, 0, 0),
               (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 1, 0), (0, 1, 0, 0),
               (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 1, 0), (0, 0, 1, 0, 0),
               (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 0, 1, 0), (0, 0, 0, 1, 0, 0)],
}  # fmt: skip

CANDIDATES = ("topk", "sampled")


@dataclass
class EagleConfig(MethodConfig):
    name: str = "eagle"
    head: str = "zoo/target-eagle"  # EAGLE-1/2 head: directory, weights file or hub id (ours or the released format)
    tree: str = "small"  # chain | small | medium (methods.eagle.TREES); ignored when `choices` is set
    choices: Optional[list[list[int]]] = None  # explicit tree, e.g. [[0],[1],[0,0]]
    # sampling only: topk = the template's ranked candidates (one-hot rule); sampled = children
    # drawn i.i.d. from the head's q (SpecInfer's rule). Greedy decoding always uses topk.
    candidates: str = "sampled"


class EagleVerifier(TreeVerifier):
    """The shared tree step, with a prefill that keeps every prompt row's features (the head
    reads the whole prompt), not only the last."""

    def prefill(self) -> ForwardOutput:
        res = self.engine.forward(self.seq, self.cache, hidden=self.hidden, last_only=True, hidden_all=True)
        self.first_token(res.logits[-1])
        return res


class HeadDrafter:
    """The head's side of one generation: its cache over the committed pairs, the pairs not run
    yet, and the nodes of the tree being drafted (their outputs, their slots in the cache).

    Node 0 is the root (the last committed token); its output is the head's output at the last
    committed pair. Every other node ``i`` is the pair (output of parent(i), token of i).
    """

    def __init__(self, head: EagleHead, engine: Engine, clock: Optional[DraftClock] = None):
        self.head = head
        self.engine = engine
        self.clock = clock or DraftClock(engine)  # times the head's forwards (and its logits) as draft forwards
        self.embed = engine.model.get_input_embeddings()
        self.lm_head = engine.model.get_output_embeddings()
        self.device = engine.device
        # the head's forward and cache: eager, or on the target's compiled path (model.compile=true)
        compiled = engine.compiled.draft_head(head, self.embed) if engine.compiled is not None else None
        self.run = compiled or head
        # rolled back by moving its length, not rebuilt
        self.cache = compiled.new_cache() if compiled is not None else DecodingHeadCache()
        self.pending: list[tuple[torch.Tensor, list[int]]] = []  # (features [k, F], next tokens [k])
        self.forwards = 0  # head forwards in this generation
        # the tree being drafted
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depth: list[int] = []
        self.out: dict[int, torch.Tensor] = {}  # node -> head output [h]
        self.clear_slots()  # the drafted nodes whose pairs are in the cache (none yet)

    # ---- committed pairs -----------------------------------------------------------------
    def add(self, features: torch.Tensor, tokens: list[int]) -> None:
        """Pairs (features[i], tokens[i]) to run before the next draft: the target features of
        the last verify's kept nodes (or the prompt) and the token committed after each."""
        if len(tokens) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} features for {len(tokens)} tokens")
        if tokens:
            self.pending.append((features, list(tokens)))

    def start(self, root: int) -> torch.Tensor:
        """Run the pending pairs; the tree restarts as the root alone. Returns the root's logits
        over the target vocabulary."""
        feats = torch.cat([f for f, _ in self.pending]).to(self.head.fc.weight.dtype)
        ids = [t for _, ts in self.pending for t in ts]
        if ids[-1] != root:
            raise RuntimeError("the pending pairs must end with the root token")
        past = len(self.cache)
        pos = torch.arange(past, past + len(ids), device=self.device)
        with self.clock.timed(len(ids)):
            out = self.run(feats[None], torch.tensor([ids], device=self.device), self.embed, pos, self.cache)[0]
            logits = self.logits(out[-1:])[0]
        self.forwards += 1
        self.pending = []
        self.tokens, self.parents, self.depth = [root], [-1], [0]
        self.clear_slots()
        self.out = {0: out[-1]}
        return logits

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.head.target_logits(out, self.lm_head).float()

    # ---- the tree ---------------------------------------------------------------------------
    def node(self, parent: int, token: int) -> int:
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.depth.append(self.depth[parent] + 1)
        return len(self.tokens) - 1

    def expand(self, nodes: list[int]) -> torch.Tensor:
        """Run the head on ``nodes`` (one forward): each reads its parent's output and its own
        token at position root + depth and sees the committed pairs, its drafted ancestors and
        itself. Returns their logits over the target vocabulary [len(nodes), V]."""
        committed = len(self.cache) - len(self.slots)
        feats = torch.stack([self.out[self.parents[n]] for n in nodes])[None]
        ids, pos = torch.tensor([[self.tokens[n] for n in nodes], [committed - 1 + self.depth[n] for n in nodes]],
                                device=self.device)  # one host-to-device copy  # fmt: skip
        ids = ids[None]
        mask = torch.ones(len(nodes), len(self.cache) + len(nodes), dtype=torch.bool, device=self.device)
        mask[:, committed:] = self.tree_rows(nodes)  # the committed pairs, then the drafted slots
        with self.clock.timed(len(nodes)):
            out = self.run(feats, ids, self.embed, pos, self.cache, mask)[0]
            logits = self.logits(out)
        self.forwards += 1
        for row, n in enumerate(nodes):
            self.out[n] = out[row]
        return logits

    def tree_rows(self, nodes: list[int]) -> torch.Tensor:
        """The tree part of ``nodes``' mask, [len(nodes), len(slots) + len(nodes)]: a node sees
        what its parent's pair saw (the parent's slot row, which ends with the parent itself) and
        itself; a child of the root sees no drafted slot. Also makes ``nodes`` the next slots.
        Built as Python lists and turned into one tensor: a few bools per row, where a tensor
        operation per row or per element would cost more than the whole list."""
        total = len(self.slots) + len(nodes)
        rows = []
        for n in nodes:
            parent = self.slot_of.get(self.parents[n])  # None: the root (a committed pair, not a slot)
            seen = self.slot_rows[parent] if parent is not None else []
            slot = len(self.slots)
            row = seen + [False] * (slot - len(seen)) + [True]  # ancestors' slots, then itself
            self.slot_of[n] = slot
            self.slots.append(n)
            self.slot_rows.append(row)
            rows.append(row + [False] * (total - len(row)))
        return torch.tensor(rows, dtype=torch.bool, device=self.device)

    def clear_slots(self) -> None:
        self.slots: list[int] = []  # nodes whose pair is in the cache after the committed pairs, in order
        self.slot_of: dict[int, int] = {}  # node -> its index in ``slots``
        self.slot_rows: list[list[bool]] = []  # per slot: the slots its pair saw (drafted ancestors, itself)

    def finish(self, q: Optional[torch.Tensor] = None) -> DraftTree:
        """The drafted tree; the head's cache goes back to the committed pairs."""
        self.release()
        return DraftTree(torch.tensor(self.tokens), tuple(self.parents), q)

    def release(self) -> None:
        """The head's cache back to the committed pairs (the drafted nodes' entries dropped)."""
        with self.engine.phase("cache"):
            self.cache.truncate(len(self.cache) - len(self.slots))
        self.clear_slots()


def template(choices: tuple[tuple[int, ...], ...]) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Nodes of a tree of rank ``choices`` in (depth, ranks) order (node i+1 = nodes[i]) and the
    parents (root -1). Refuses duplicates, missing parents and negative ranks."""
    if not choices:
        raise TreeError("an EAGLE tree needs at least one choice")
    seen = set(choices)
    if len(seen) != len(choices) or any(not c or min(c) < 0 for c in choices):
        raise TreeError("tree choices must be distinct non-empty tuples of ranks >= 0")
    for c in choices:
        if len(c) > 1 and c[:-1] not in seen:
            raise TreeError(f"tree choice {list(c)} has no parent {list(c[:-1])} in the tree")
    nodes = tuple(sorted(choices, key=lambda c: (len(c), c)))
    index = {c: i + 1 for i, c in enumerate(nodes)}
    return nodes, (-1,) + tuple(index[c[:-1]] if len(c) > 1 else 0 for c in nodes)


def load_method_head(path: str, engine: Engine, version: int, method: str) -> EagleHead:
    head, cfg = load_head(path, engine.config, dtype=engine.dtype, device=engine.device)
    if cfg.version != version:
        want = "an EAGLE-3" if version == 3 else "an EAGLE-1/2"
        other = "eagle3" if cfg.version == 3 else "eagle or eagle2"
        raise EagleHeadError(f"method {method} needs {want} head; '{path}' holds an EAGLE-{cfg.version} head "
                             f"(run {other} with it, or set method.{method}.head=...)")  # fmt: skip
    return head


class Eagle(Method):
    """EAGLE: a one-layer draft head over the target's features drafts a static token tree."""

    config_class = EagleConfig
    needs = (EAGLE_HEAD,)
    main_settings = ("tree",)
    verifier_class = EagleVerifier  # the shared tree step (a test swaps in a broken one as its negative control)
    head_version = 1  # the head this method reads (EAGLE-1/2 heads: the target's last hidden state)

    def __init__(self, cfg: EagleConfig, engine: Engine, sampling: SamplingConfig, head: Optional[EagleHead] = None):
        super().__init__(cfg, engine, sampling)
        self.check_settings()
        if head is None:
            head = load_method_head(cfg.head, engine, self.head_version, cfg.name)
        if head.config.version != self.head_version:
            raise ValueError(f"method {cfg.name} reads an EAGLE-{self.head_version} head, got EAGLE-{head.config.version}")
        self.head = head.to(device=engine.device, dtype=engine.dtype).eval()
        if engine.compiled is None:  # eager: the lean forward (the compiled path traces the plain one)
            self.head.for_decoding(engine.model.get_output_embeddings())
        # what the verifier returns per node: the last hidden state (v1) or the fused layers (v3)
        self.features: bool | tuple[int, ...] = True if head.config.version == 1 else head.config.fused_layers
        self.draft_clock = DraftClock(engine)  # the head's forwards are the step's draft forwards

    def check_settings(self) -> None:
        cfg = self.cfg
        if cfg.candidates not in CANDIDATES:
            raise ValueError(f"unknown method.eagle.candidates '{cfg.candidates}'; use one of {', '.join(CANDIDATES)}")
        choices = tuple(tuple(int(r) for r in c) for c in cfg.choices) if cfg.choices else None
        if choices is None and cfg.tree not in TREES:
            raise TreeError(f"unknown EAGLE tree '{cfg.tree}'; use one of {', '.join(TREES)} or set method.eagle.choices")
        self.choices, self.parents = template(choices or tuple(TREES[cfg.tree]))
        self.max_depth = max(len(c) for c in self.choices)
        self.inner_paths = {c[:-1] for c in self.choices if len(c) > 1}  # nodes with children

    def headroom(self) -> int:
        """The deepest node of the last step sits max_depth - 1 positions past a full-length output."""
        return self.max_depth - 1

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        self.check_context(len(prompt_ids), stop)
        verifier = self.verifier_class(self.engine, self.sampling, stop, prompt_ids, seed, hidden=self.features)
        drafter = HeadDrafter(self.head, self.engine, self.draft_clock)
        draw = make_generator(seed + 7919, self.engine.device) if self.sampling.do_sample else None  # the draft's own draws
        # 1. prefill: the prompt's features, paired with the tokens after them (prompt[1:] + the first token)
        drafter.add(verifier.prefill().hidden, verifier.seq[1:])
        while not verifier.done:
            # 2. the head drafts a tree as deep as the output still has room for
            with self.engine.phase("tree"):  # its head forwards inside count as "draft"
                tree = self.propose(drafter, verifier.seq[-1], min(self.max_depth, verifier.room()), draw)
            # 3. one target forward over the tree, acceptance, commit, cache compaction
            step = verifier.verify(tree)
            # 4. kept nodes' target features + the tokens committed after them: the next pairs
            drafter.add(step.hidden, step.tokens)
        steps = max(len(verifier.tree_sizes), 1)
        return verifier.result(draft_forwards=drafter.forwards, extra={**self.describe(), "head_forwards_per_step": drafter.forwards / steps})

    def describe(self) -> dict:
        return {"tree": "custom" if self.cfg.choices else self.cfg.tree, "tree_depth": self.max_depth,
                "candidates": self.cfg.candidates if self.sampling.do_sample else "topk"}  # fmt: skip

    # ---- the static tree ---------------------------------------------------------------------
    def propose(self, drafter: HeadDrafter, root: int, depth: int, draw: Optional[torch.Generator]) -> DraftTree:
        """The template's nodes up to ``depth``, level by level (module doc)."""
        logits = {0: drafter.start(root)}
        if depth < 1:
            return drafter.finish()
        sampled = self.sampling.do_sample and self.cfg.candidates == "sampled"
        q: dict[int, torch.Tensor] = {}
        node_of = {(): 0}  # choice path -> drafter node
        levels = [[c for c in self.choices if len(c) == d] for d in range(1, depth + 1)]
        for level in levels:
            by_parent: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
            for c in level:
                by_parent.setdefault(c[:-1], []).append(c)
            for path, kids in by_parent.items():
                parent = node_of[path]
                if sampled:  # children drawn i.i.d. from the head's q
                    q[parent] = probabilities(logits[parent], self.sampling)
                    picks = torch.multinomial(q[parent], len(kids), replacement=True, generator=draw).tolist()
                else:  # children = the head's ranked candidates
                    picks = torch.topk(logits[parent], max(c[-1] for c in kids) + 1).indices.tolist()
                    picks = [picks[c[-1]] for c in kids]
                for c, token in zip(kids, picks):
                    node_of[c] = drafter.node(parent, token)
            inner = [node_of[c] for c in level if len(c) < depth and c in self.inner_paths]
            if inner:
                rows = drafter.expand(inner)
                logits.update(zip(inner, rows))
        if not sampled:
            return drafter.finish()
        table = torch.zeros(len(drafter.tokens), logits[0].shape[-1], device=logits[0].device)
        for node, row in q.items():
            table[node] = row
        return drafter.finish(table)


__all__ = ["Eagle", "EagleConfig", "EagleVerifier", "HeadDrafter", "TREES", "template"]
