"""Medusa (Cai et al. 2024): tree verification of candidates from extra decoding heads.

State between steps: the committed tokens ``x[0:n]``, a KV cache holding ``x[0:n-1]``
and the hidden state that produced ``x[n-1]`` (the root of the next tree).

One step:
  1. the heads read that hidden state; one top-k over all heads gives each tree node its
     token (depth d, rank r -> the r-th best token of head d-1; not conditioned on the path);
  2. one target forward over all tree nodes with the tree attention mask (each node sees
     the prefix, the root and its ancestors) at positions n-1+depth;
  3. acceptance picks the longest root-to-leaf prefix the target agrees with and one more
     token from the last accepted node (greedy: its argmax, the bonus);
  4. commit (stop rules inside a path cut it), compact the cache to prefix + accepted
     nodes (only those entries move) and keep the last accepted node's hidden state.

Acceptance: ``greedy`` (lossless; always used when not sampling), ``rejection`` (sampling,
lossless: at each node the children are tried in rank order with the one-hot-draft rule,
so the output is distributed exactly as sampling the target), ``typical`` (upstream's
sampling mode, NOT distribution preserving: every Generation it makes is marked lossy).

Trees are ``choices``: tuples of top-k ranks per depth as upstream, e.g. (0,), (1,), (0,0).
The shipped ones (``TREES``) are at most 3 deep so they fit heads with K >= 3.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine, KVCache
from harness.paths import resolve_repo_path
from methods.base import Committer, Generation, Method, StopRule, make_generator, next_token, probabilities

Choices = tuple[tuple[int, ...], ...]

TREES: dict[str, list[tuple[int, ...]]] = {
    # top-1 of each of 3 heads: 4 nodes
    "chain": [(0,), (0, 0), (0, 0, 0)],
    # 13 nodes
    "small": [(0,), (1,), (2,), (3,),
              (0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
              (0, 0, 0), (0, 0, 1), (0, 1, 0)],
    # 37 nodes
    "large": [(0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,),
              (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 0), (1, 1), (1, 2), (1, 3),
              (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (4, 0), (5, 0),
              (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 0), (0, 1, 1), (0, 2, 0),
              (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0)],
}  # fmt: skip

ACCEPTANCE = ("greedy", "typical", "rejection")


@dataclass
class MedusaConfig(MethodConfig):
    name: str = "medusa"
    heads: str = "zoo/target-medusa"  # directory (or weights file) of the heads; ours or upstream's format
    # chain | small | large (see methods.medusa.TREES; compared on the tuning split by make tables:
    # results/medusa-trees.md); ignored when `choices` is set
    tree: str = "small"
    choices: Optional[list[list[int]]] = None  # explicit tree, e.g. [[0],[1],[0,0]]
    acceptance: str = "greedy"  # sampling rule: greedy | rejection (lossless) | typical (lossy); greedy decoding always uses greedy
    posterior_threshold: float = 0.09  # typical: epsilon (hard cap of the acceptance threshold)
    posterior_alpha: float = 0.3  # typical: threshold = min(epsilon, alpha * exp(-entropy))


class TreeError(ValueError):
    """A candidate tree that cannot be used (bad choices or deeper than the heads)."""


@dataclass(frozen=True)
class TreeBuffers:
    """Everything a step needs about one tree, built once (nodes in (depth, ranks) order)."""

    choices: Choices  # sorted choices; node i+1 is choices[i], node 0 is the root
    size: int  # T = nodes including the root
    depth: torch.Tensor  # [T] depth of each node (root 0): position = n-1 + depth
    mask: torch.Tensor  # [T, T] bool, mask[a, b]: node a may attend to node b (b is a or an ancestor)
    retrieve: torch.Tensor  # [P, D+1] node ids of each root-to-leaf path, padded with -1
    safe_retrieve: torch.Tensor  # retrieve with the padding pointing at the root (to gather with)
    valid: torch.Tensor  # [P, D] bool: the path has a node at depth j+1
    gather: torch.Tensor  # [T-1] index of node 1.. in the flattened [K, top_k] head top-k
    top_k: int  # ranks needed per head (max rank + 1)
    max_depth: int  # D
    paths: list[list[int]]  # retrieve without padding (host copy)
    children: list[list[int]]  # child nodes of each node, in rank order


def tree_choices(cfg: MedusaConfig) -> Choices:
    if cfg.choices:
        return tuple(tuple(int(r) for r in c) for c in cfg.choices)
    if cfg.tree not in TREES:
        raise TreeError(f"unknown Medusa tree '{cfg.tree}'; use one of {', '.join(TREES)} or set method.medusa.choices")
    return tuple(TREES[cfg.tree])


@functools.lru_cache(maxsize=32)
def build_tree(choices: Choices, device: str = "cpu") -> TreeBuffers:
    """Tree mask, depths, retrieve paths and top-k gather indices for ``choices``."""
    if not choices:
        raise TreeError("a Medusa tree needs at least one choice")
    seen = set()
    for c in choices:
        if not c or any(r < 0 for r in c):
            raise TreeError(f"bad tree choice {c}: a non-empty tuple of ranks >= 0")
        if c in seen:
            raise TreeError(f"tree choice {c} appears twice")
        seen.add(c)
    for c in choices:
        if len(c) > 1 and c[:-1] not in seen:
            raise TreeError(f"tree choice {c} has no parent {c[:-1]} in the tree")
    nodes = sorted(choices, key=lambda c: (len(c), c))
    index = {c: i + 1 for i, c in enumerate(nodes)}
    size = len(nodes) + 1
    top_k = max(max(c) for c in nodes) + 1
    max_depth = max(len(c) for c in nodes)
    parent = [-1] + [index[c[:-1]] if len(c) > 1 else 0 for c in nodes]
    mask = torch.eye(size, dtype=torch.bool)
    for i in range(1, size):
        a = parent[i]
        while a >= 0:
            mask[i, a] = True
            a = parent[a]
    children: list[list[int]] = [[] for _ in range(size)]
    for i in range(1, size):
        children[parent[i]].append(i)  # nodes are sorted, so siblings come in rank order
    leaves = sorted((c for c in nodes if not children[index[c]]))  # depth-first order
    paths = []
    for leaf in leaves:
        paths.append([0] + [index[leaf[:d]] for d in range(1, len(leaf) + 1)])
    retrieve = torch.full((len(paths), max_depth + 1), -1, dtype=torch.long)
    for p, path in enumerate(paths):
        retrieve[p, : len(path)] = torch.tensor(path)
    depth = torch.tensor([0] + [len(c) for c in nodes])
    gather = torch.tensor([(len(c) - 1) * top_k + c[-1] for c in nodes])
    dev = torch.device(device)
    return TreeBuffers(tuple(nodes), size, depth.to(dev), mask.to(dev), retrieve.to(dev),
                       retrieve.clamp_min(0).to(dev), (retrieve[:, 1:] >= 0).to(dev), gather.to(dev),
                       top_k, max_depth, paths, children)  # fmt: skip


class Medusa(Method):
    config_class = MedusaConfig

    def __init__(self, cfg: MedusaConfig, engine: Engine, sampling: SamplingConfig, heads: Optional[torch.nn.Module] = None):
        super().__init__(cfg, engine, sampling)
        if cfg.acceptance not in ACCEPTANCE:
            raise ValueError(f"unknown Medusa acceptance '{cfg.acceptance}'; use one of {', '.join(ACCEPTANCE)}")
        if sampling.do_sample and cfg.acceptance == "greedy":
            raise ValueError("method.medusa.acceptance=greedy cannot sample; use rejection (lossless) or typical (lossy)")
        if heads is None:
            from methods.medusa_heads import load_heads  # noqa: PLC0415

            lm_head = engine.model.get_output_embeddings().weight
            heads = load_heads(resolve_repo_path(cfg.heads), hidden_size=lm_head.shape[1], vocab_size=lm_head.shape[0])
        # compiled too when the engine is (model.compile=true): one graph, the input is always [1, hidden]
        self.heads = engine.compile_module(heads.to(device=engine.device, dtype=engine.dtype).eval())
        self.tree = build_tree(tree_choices(cfg), str(engine.device))
        if self.tree.max_depth > heads.num_heads:
            raise TreeError(f"the tree is {self.tree.max_depth} deep but there are only {heads.num_heads} Medusa heads")
        self.mode = cfg.acceptance if sampling.do_sample else "greedy"

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        return self.decode(prompt_ids, stop, seed)[0]

    def headroom(self) -> int:
        """A step's nodes sit up to the tree's depth past the last committed token: the deepest
        ones of the last step reach depth - 1 positions past a full-length output."""
        return self.tree.max_depth - 1

    @torch.inference_mode()
    def decode(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> tuple[Generation, KVCache]:
        """The loop; also returns the cache, which then holds prompt + tokens but the last."""
        self.check_context(len(prompt_ids), stop)
        engine, tree, out = self.engine, self.tree, Committer(stop)
        gen = make_generator(seed, engine.device) if self.sampling.do_sample else None
        cache = engine.new_cache()
        per_step: list[int] = []
        accepted_at = [0] * tree.max_depth
        # 1. prefill: the prompt's last row gives the root token and the heads' input
        first = engine.forward(prompt_ids, cache, hidden=True, last_only=True)
        root = next_token(first.logits[-1], self.sampling, gen)
        hidden = first.hidden[-1:]
        per_step.append(out.add([root]))
        while not out.done:
            # 2. node tokens: the root, then the heads' top-k at the last committed position
            tokens = self.candidates(root, hidden)
            # 3. one target forward over the whole tree; the cache now holds prefix + tree
            past = len(cache)
            mask = torch.cat((torch.ones(tree.size, past, dtype=torch.bool, device=tree.mask.device), tree.mask), dim=1)
            res = engine.forward(tokens, cache, positions=tree.depth + past, mask=mask, hidden=True)
            # 4. accepted nodes (root first) and the tokens they commit (one per node)
            nodes, new = self.evaluate(tokens, res.logits, gen)
            committed = out.add(new)  # a stop inside the path cuts it
            per_step.append(committed)
            for d in range(min(committed, len(new) - 1)):
                accepted_at[d] += 1
            # 5. keep prefix + the nodes before each committed token; the last token is the next root
            nodes = nodes[:committed]
            cache.keep(torch.cat((torch.arange(past), torch.tensor(nodes) + past)))
            root, hidden = new[committed - 1], res.hidden[nodes[-1] : nodes[-1] + 1]
        steps = len(per_step) - 1
        result = Generation(
            tokens=out.tokens,
            target_forwards=len(per_step),
            accepted_per_step=per_step,
            proposed_per_position=[steps] * tree.max_depth if steps else [],
            accepted_per_position=accepted_at if steps else [],
            lossy=self.cfg.acceptance == "typical",
            extra={"tree": self.tree_name, "tree_size": tree.size, "tree_depth": tree.max_depth,
                   "acceptance": self.mode},  # fmt: skip
            stop_reason=out.reason,
        )
        return result, cache

    @property
    def tree_name(self) -> str:
        return "custom" if self.cfg.choices else self.cfg.tree

    # ---- the phases of a step --------------------------------------------------------
    def candidates(self, root: int, hidden: torch.Tensor) -> torch.Tensor:
        """Token of every tree node: [root, then heads' top-k picked by (depth, rank)]."""
        tree = self.tree
        logits = self.heads(hidden)[:, -1]  # [K, V]
        top = torch.topk(logits[: tree.max_depth], tree.top_k, dim=-1).indices.flatten()
        return torch.cat((top.new_tensor([root]), top[tree.gather]))

    def evaluate(self, tokens: torch.Tensor, logits: torch.Tensor, gen) -> tuple[list[int], list[int]]:
        if self.mode == "greedy":
            return self.greedy(tokens, logits)
        if self.mode == "rejection":
            return self.rejection(tokens, probabilities(logits, self.sampling), gen)
        return self.typical(tokens, logits, gen)

    def greedy(self, tokens: torch.Tensor, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """Longest path whose tokens are the target's argmax, plus the bonus (one host sync)."""
        tree = self.tree
        best = logits.argmax(dim=-1)  # [T] the target's choice after each node
        paths = tree.safe_retrieve
        match = (tokens[paths[:, 1:]] == best[paths[:, :-1]]) & tree.valid
        lengths = match.cumprod(dim=1).sum(dim=1)  # [P] accepted nodes per path
        length, p = lengths.max(dim=0)
        host = torch.cat((p.view(1), length.view(1), best[paths[p]])).tolist()
        p, length = host[0], host[1]
        return tree.paths[p][: length + 1], host[2 : length + 3]

    def rejection(self, tokens: torch.Tensor, p: torch.Tensor, gen) -> tuple[list[int], list[int]]:
        """Walk down the tree: at each node try its children in rank order, accepting child c
        with probability q(c) / sum(q), where q is p with the rejected siblings removed;
        if all are rejected (or at a leaf) sample from q. Exactly p's distribution."""
        ids = tokens.tolist()
        node, nodes, new = 0, [0], []
        while True:
            q = p[node].clone()
            accepted = None
            for child in self.tree.children[node]:
                t = ids[child]
                mass = float(q.sum())
                if mass <= 0:
                    break
                u = float(torch.rand(1, generator=gen, device=q.device))
                if u * mass < float(q[t]):
                    accepted = child
                    break
                q[t] = 0
            if accepted is None:
                new.append(self.residual_token(q, p[node], gen))
                return nodes, new
            nodes.append(accepted)
            new.append(ids[accepted])
            node = accepted

    @staticmethod
    def residual_token(q: torch.Tensor, p_node: torch.Tensor, gen) -> int:
        """The token after every child of a node was rejected: drawn from q (p without the
        rejected children), or from p itself when nothing is left of q."""
        weights = q if float(q.sum()) > 0 else p_node
        return int(torch.multinomial(weights, 1, generator=gen))

    def typical(self, tokens: torch.Tensor, logits: torch.Tensor, gen) -> tuple[list[int], list[int]]:
        """Upstream's typical acceptance (lossy): accept a node when its probability under
        its parent exceeds min(eps, alpha * exp(-entropy)); longest path, ties broken by
        likelihood; the last token is sampled from the last accepted node."""
        cfg, tree = self.cfg, self.tree
        p = probabilities(logits, self.sampling)  # [T, V]
        entropy = -(p * torch.log(p.clamp_min(1e-20))).sum(dim=-1)
        threshold = torch.clamp(cfg.posterior_alpha * torch.exp(-entropy), max=cfg.posterior_threshold)
        paths = tree.safe_retrieve
        cand = p[paths[:, :-1], tokens[paths[:, 1:]]]  # [P, D] probability of each path node
        ok = (cand > threshold[paths[:, :-1]]) & tree.valid
        run = ok.cumprod(dim=1)
        lengths = run.sum(dim=1)
        score = (torch.log(cand.clamp_min(1e-20)) * run).sum(dim=1)
        score = torch.where(lengths == lengths.max(), score, torch.full_like(score, float("-inf")))
        best = int(score.argmax())
        length = int(lengths[best])
        nodes = tree.paths[best][: length + 1]
        new = tokens[nodes[1:]].tolist() if length else []
        new.append(int(torch.multinomial(p[nodes[-1]], 1, generator=gen)))
        return nodes, new

