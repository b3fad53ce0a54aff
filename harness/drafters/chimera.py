"""Chimera's draft network (Zeng et al. 2024): a small model on top of a frozen target that
guesses several future tokens at once from two views of the context. Used by training
(``harness.train.chimera``) and decoding (``methods/chimera.py``).

Alignment: after the target has chosen the token ``x_n`` (the root of the next tree) from its
hidden state ``h_{n-1}``, the drafter reads

- the trigram encoder: the target's (frozen) embeddings of the last ``ngram`` tokens
  ``x_{n-ngram+1}..x_n`` (the root included: the token just chosen, as EAGLE's head reads it),
  concatenated and projected: ``t = W_t [e_1; ...; e_ngram]`` (short-range context);
- the full-context encoder: one pre-norm attention + MLP block over the target's last hidden
  states ``h_0..h_{n-1}``, read at the last one: ``c = Block(h)_{n-1}`` (the whole context);

fuses them, ``z = W_f [t; c] + h_{n-1}`` (a residual from the target's own last state), and
head j (j = 0..K-1) predicts ``x_{n+1+j}``: ``logits_j = lm_head(ResBlock_j(z))`` with the
target's frozen LM head (residual decoding heads: ``ResBlock(x) = x + SiLU(W x + b)``).
Position n-1 of a training sequence is the same computation for every n at once (the block is
causal). Near the sequence start the trigram repeats the first token.

On disk: ``chimera.safetensors`` (this module's state dict, fp16) and ``config.json``
(``ChimeraConfig``).

Where this differs from the paper: the paper's full-context encoder is a transformer layer
over the target's hidden states with its own positions and the trigram encoder is a
convolution-like embedding of the last three tokens; here the block has no position
encoding (the hidden states carry the target's) and the trigram is one linear layer. The
paper trains with distillation from the target's distributions; here with cross-entropy on
the target's self-distilled tokens (which are its own choices).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.engine import ModelLoadError
from harness.drafters.medusa import ResBlock

CONFIG_NAME, WEIGHTS_NAME = "config.json", "chimera.safetensors"


class ChimeraError(ModelLoadError, ValueError):
    """A Chimera drafter that cannot be used with this target (the message says what and the fix)."""


@dataclass
class ChimeraConfig:
    hidden_size: int = 0  # the target's hidden size
    vocab_size: int = 0  # the target's vocabulary (rows of its LM head)
    num_heads: int = 4  # K: head j predicts the token j+1 after the root
    ngram: int = 3  # tokens the trigram encoder reads (the root and the ngram-1 before it)
    attention_heads: int = 4  # attention heads of the full-context encoder
    base_model_name_or_path: str = ""  # informational: the target it was trained on


class ContextEncoder(nn.Module):
    """One pre-norm block (attention, then an MLP) over the target's hidden states."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ChimeraError(f"hidden size {hidden} is not divisible by {heads} attention heads")
        self.heads = heads
        self.norm = nn.LayerNorm(hidden)
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.mlp_norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, heads, T, H / heads]"""
        b, t, h = x.shape
        return x.view(b, t, self.heads, h // self.heads).transpose(1, 2)

    def keys_values(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values of hidden states [B, T, H] (decoding extends them step by step)."""
        k, v = self.key_value(self.norm(hidden)).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool) -> torch.Tensor:
        """The block's output at ``hidden`` [B, Q, H] attending to ``keys``/``values`` (causal: query
        i sees keys 0..i; else every query sees every key)."""
        q = self.split(self.query(self.norm(hidden)))
        a = F.scaled_dot_product_attention(q, keys, values, is_causal=causal)
        x = hidden + self.out(a.transpose(1, 2).reshape(hidden.shape))
        return x + self.mlp(self.mlp_norm(x))


class ChimeraDrafter(nn.Module):
    def __init__(self, config: ChimeraConfig):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.trigram = nn.Linear(config.ngram * h, h)
        self.context = ContextEncoder(h, config.attention_heads)
        self.fuse = nn.Linear(2 * h, h)
        nn.init.zeros_(self.fuse.weight)  # starts as the target's own state: head j = lm_head(ResBlock(h))
        nn.init.zeros_(self.fuse.bias)
        self.heads = nn.ModuleList(ResBlock(h) for _ in range(config.num_heads))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def fused(self, ngram_embeds: torch.Tensor, last_hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """z [B, T, H] from the n-gram embeddings [B, T, ngram, H], the target's last state and the
        context encoder's output at it (both [B, T, H])."""
        t = self.trigram(ngram_embeds.flatten(-2))
        return self.fuse(torch.cat((t, context), dim=-1)) + last_hidden

    def head_states(self, z: torch.Tensor) -> torch.Tensor:
        """[K, ..., H]: the state each head hands to the LM head."""
        return torch.stack([head(z) for head in self.heads])

    def forward(self, ngram_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Training: head states [K, B, T, H] at every position of a sequence of target hidden
        states ``hidden`` [B, T, H] (causal context), with ``ngram_embeds`` [B, T, ngram, H]."""
        keys, values = self.context.keys_values(hidden)
        return self.head_states(self.fused(ngram_embeds, hidden, self.context(hidden, keys, values, causal=True)))


def ngram_ids(ids: torch.Tensor, ngram: int) -> torch.Tensor:
    """[B, T] token ids -> [B, T, ngram]: row t holds ids t-ngram+1..t (the first id repeated
    before the start)."""
    pad = ids[:, :1].expand(-1, ngram - 1)
    padded = torch.cat((pad, ids), dim=1)
    return padded.unfold(1, ngram, 1)


def save_drafter(drafter: ChimeraDrafter, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in drafter.state_dict().items()}, str(d / WEIGHTS_NAME))
    (d / CONFIG_NAME).write_text(json.dumps(asdict(drafter.config), indent=1) + "\n")


def load_drafter(directory: str | Path, hidden_size: Optional[int] = None, vocab_size: Optional[int] = None) -> ChimeraDrafter:
    """A saved drafter, refused (one line) when it does not fit the target's sizes."""
    from safetensors.torch import load_file  # noqa: PLC0415

    d = Path(directory)
    if not (d / CONFIG_NAME).exists() or not (d / WEIGHTS_NAME).exists():
        raise ChimeraError(f"no Chimera drafter in {d} ({CONFIG_NAME} + {WEIGHTS_NAME}); train one with "
                           "`harness train chimera` or point method.chimera.drafter=<dir>")  # fmt: skip
    config = ChimeraConfig(**json.loads((d / CONFIG_NAME).read_text()))
    for name, want in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
        if want is not None and getattr(config, name) != want:
            raise ChimeraError(f"the Chimera drafter in {d} has {name} {getattr(config, name)}, the target {want}: "
                               "train one for this target")  # fmt: skip
    drafter = ChimeraDrafter(config)
    state = {k: v.float() for k, v in load_file(str(d / WEIGHTS_NAME)).items()}
    missing = set(drafter.state_dict()) ^ set(state)
    if missing:
        raise ChimeraError(f"the Chimera drafter in {d} has missing or unknown weights: {sorted(missing)[:3]}")
    drafter.load_state_dict(state)
    return drafter.eval()


def parameter_count(drafter: nn.Module) -> int:
    return sum(p.numel() for p in drafter.parameters())

