"""Hidden Transfer (Wu et al. 2024, "Parallel Decoding via Hidden Transfer for Lossless Large
Language Model Acceleration") and its follow-up FIRP (Wu et al. 2024, "Faster LLM inference via
future intermediate representation prediction"): one implementation, two presets.

Trained linear maps (``harness.drafters.transfer``, the target frozen) turn a token's hidden state
entering decoder layer t into k pseudo hidden states for the next k positions. Those rows run
through layers t.. beside the real tokens, in the same target forward, and the LM head reads draft
tokens off them. So every verify forward also drafts the next step's tree.

State between steps: the committed tokens ``x[0:n]``, the target cache holding ``x[0:n-1]`` (the
``TreeVerifier`` invariant) and the pseudo rows' logits of the token that predicted ``x[n-1]``.

One step:
  1. the tree's node tokens: the root ``x[n-1]``, then for the node of choice (r_1..r_d) the r_d-th
     best token of pseudo row d (row 1 guesses the token after the root; Medusa's tree choices);
  2. one target forward over the tree (``TreeVerifier.verify``: tree mask, positions n-1+depth,
     acceptance, commit, cache compaction) with k pseudo rows for EVERY node injected at layer t:
     node u's row j sits at position pos(u)+j and sees the prefix, u's ancestors, u and (FIRP)
     u's rows 1..j-1. The rows never enter the committed cache;
  3. the last accepted node predicted the bonus token: its pseudo rows give the next tree.
The prefill does the same for the prompt's last token.

Presets (the only difference; the trained maps say which one they are, ``attend_rows``):
  hidden-transfer  each pseudo row sees the context and itself;
  firp             the rows of one token also attend to each other (causally): the predicted
                   states are refined together by the upper layers.

Acceptance is the verifier's: greedy = the longest root path the target agrees with plus one
target token; sampling = the one-hot multi-candidate rule (the node tokens are deterministic):
both lossless. The prefill's and each step's forward carry T * k extra rows (T tree nodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.drafters.transfer import TransferError, TransferLayers, load_transfer, pseudo_rows
from harness.engine import Engine, LayerSkip
from harness.paths import resolve_repo_path
from harness.stops import StopRule
from methods.base import TRANSFER_MAPS, Generation, Method
from methods.medusa import build_tree, node_tokens, tree_choices
from methods.tree import DraftTree, TreeError, TreeVerifier


@dataclass
class HiddenTransferConfig(MethodConfig):
    name: str = "hidden-transfer"
    transfer: str = "zoo/target-hidden-transfer"  # trained transfer layers (a directory; harness train hidden-transfer)
    tree: str = "chain"  # a Medusa tree (methods.medusa.TREES: chain | small | large); ignored when `choices` is set
    choices: Optional[list[list[int]]] = None  # explicit tree: ranks per depth, e.g. [[0],[1],[0,0]]


@dataclass
class FirpConfig(HiddenTransferConfig):
    name: str = "firp"
    transfer: str = "zoo/target-firp"  # transfer layers trained with attend_rows=true


class HiddenTransfer(Method):
    """Hidden Transfer: trained maps turn a middle layer's state into pseudo states of the next tokens, drafted in the verify forward itself."""

    config_class = HiddenTransferConfig
    needs = (TRANSFER_MAPS,)
    main_settings = ("transfer", "tree")
    verifier_class = TreeVerifier  # the shared tree step (a test swaps in a broken one as its negative control)
    attend_rows = False  # the preset: pseudo rows of one token see each other (FIRP) or not

    def __init__(self, cfg: HiddenTransferConfig, engine: Engine, sampling: SamplingConfig,
                 transfer: Optional[TransferLayers] = None):  # fmt: skip
        super().__init__(cfg, engine, sampling)
        text = engine.config.get_text_config()
        if transfer is None:
            transfer = load_transfer(resolve_repo_path(cfg.transfer), text.hidden_size, text.num_hidden_layers)
        if transfer.config.attend_rows != self.attend_rows:
            raise TransferError(f"{cfg.name} needs transfer layers trained with attend_rows={self.attend_rows}; "
                                f"{cfg.transfer} has {transfer.config.attend_rows} (run the other method, or train "
                                f"its own: harness train hidden-transfer preset={cfg.name})")  # fmt: skip
        engine.check_layerwise(LayerSkip(), transfer.config.layer)
        self.transfer = transfer.to(device=engine.device, dtype=engine.dtype).eval()
        self.k = transfer.config.k
        self.tree = build_tree(tree_choices(cfg), str(engine.device))
        if self.tree.max_depth > self.k:
            raise TreeError(f"the tree is {self.tree.max_depth} deep but the transfer layers make only {self.k} "
                            f"pseudo rows: pick a tree at most {self.k} deep (method.{cfg.name}.tree / choices)")  # fmt: skip

    def headroom(self) -> int:
        """The last step's deepest pseudo rows sit depth + k positions past its root."""
        return self.tree.max_depth + self.k - 1

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        self.check_context(len(prompt_ids), stop)
        engine, k = self.engine, self.k
        verifier = self.verifier_class(engine, self.sampling, stop, prompt_ids, seed)
        # 1. prefill: the prompt's last row gives the first token, its pseudo rows the first tree
        sees = torch.ones(1, len(prompt_ids), dtype=torch.bool, device=engine.device)
        rows = verifier.prefill(pseudo_rows(self.transfer, sees, torch.tensor([len(prompt_ids) - 1]), slice(-1, None)))
        guesses = rows.injected
        shape = self.tree.shape
        while not verifier.done:
            # 2. node tokens from the pseudo rows of the token that predicted the root
            tree = DraftTree(node_tokens(self.tree, verifier.seq[-1], guesses), shape.parents)
            # 3. one forward: verify the tree, and k pseudo rows for every node
            past = len(verifier.cache)
            sees = torch.cat((torch.ones(shape.size, past, dtype=torch.bool, device=shape.mask.device), shape.mask), 1)
            step = verifier.verify(tree, inject=pseudo_rows(self.transfer, sees, shape.depth + past, slice(None)))
            # 4. the last accepted node predicted the bonus token: its rows guess the tokens after it
            last = step.nodes[-1]
            guesses = step.output.injected[last * k : (last + 1) * k]
        extra = {"tree": "custom" if self.cfg.choices else self.cfg.tree, "tree_size": self.tree.size,
                 "layer": self.transfer.config.layer, "k": k, "attend_rows": self.transfer.config.attend_rows,
                 "rows_per_step": self.tree.size * (k + 1)}  # fmt: skip
        return verifier.result(extra=extra)


class Firp(HiddenTransfer):
    """FIRP: Hidden Transfer's pseudo states of future tokens also attend to each other in the upper layers."""

    config_class = FirpConfig
    attend_rows = True
