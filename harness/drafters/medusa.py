"""Medusa heads (Cai et al. 2024): K small heads on the base model's last hidden state.

Head i is ``ResBlock`` x L followed by ``Linear(hidden, vocab, bias=False)`` and predicts
the token i+2 positions after the one that produced the hidden state (the base LM head
predicts the next one). ``ResBlock(x) = x + SiLU(Linear(hidden, hidden)(x))``; its inner
weight starts at zero and the output Linear starts as a copy of the base LM head, so an
untrained head behaves exactly like the base LM head.

On disk (ours and the released upstream format, read by the same loader)::

    medusa_lm_head.safetensors | medusa_lm_head.pt   keys {i}.{j}.linear.weight / .bias
                                                     (j < L) and {i}.{L}.weight
    config.json                                      medusa_num_heads, medusa_num_layers,
                                                     base_model_name_or_path (+ ours: sizes)

The head and layer counts are inferred from the state dict; any disagreement with
config.json or with the base model's hidden / vocabulary size is refused with a
``MedusaHeadsError`` (upstream loads with ``strict=False`` and silently drops heads).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

WEIGHTS_SAFETENSORS = "medusa_lm_head.safetensors"
WEIGHTS_PT = "medusa_lm_head.pt"
CONFIG_NAME = "config.json"


class MedusaHeadsError(ValueError):
    """Medusa heads that cannot be used as given; the message says what disagrees."""


@dataclass
class MedusaHeadsConfig:
    num_heads: int = 3  # K: head i predicts the token i+2 ahead
    num_layers: int = 1  # L: ResBlocks per head before its output Linear
    hidden_size: int = 0  # base model's hidden size
    vocab_size: int = 0  # base model's vocabulary (rows of its LM head)
    base_model_name_or_path: str = ""  # informational: the base the heads were trained on


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``, W zero-initialised (the block starts as the identity)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.ModuleList):
    """The K heads. ``state_dict`` keys are upstream's (``{i}.{j}.linear.weight``, ...).

    ``heads(hidden [..., H]) -> logits [K, ..., V]``; ``heads[i](hidden)`` runs one head.
    """

    def __init__(self, cfg: MedusaHeadsConfig):
        if cfg.num_heads < 1 or cfg.num_layers < 0 or cfg.hidden_size < 1 or cfg.vocab_size < 1:
            raise MedusaHeadsError(f"invalid Medusa heads config {asdict(cfg)}")
        super().__init__(
            nn.Sequential(
                *[ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)],
                nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False),
            )
            for _ in range(cfg.num_heads)
        )
        self.config = cfg

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(hidden) for head in self])

    @torch.no_grad()
    def init_from_lm_head(self, weight: torch.Tensor) -> None:
        """Copy the base LM head ``[V, H]`` into every head's output Linear."""
        for head in self:
            head[-1].weight.copy_(weight)


# ---------------------------------------------------------------------------- loading


def infer_shape(state: dict[str, torch.Tensor]) -> MedusaHeadsConfig:
    """Head count, layer count and sizes from a state dict; refuses anything irregular."""
    pattern = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
    per_head: dict[int, dict[int, set[str]]] = {}
    for key in state:
        m = pattern.match(key)
        if not m:
            raise MedusaHeadsError(f"unexpected key '{key}' in Medusa heads (want {{i}}.{{j}}.linear.weight|bias, {{i}}.{{L}}.weight)")
        per_head.setdefault(int(m[1]), {}).setdefault(int(m[2]), set()).add(m[3])
    if not per_head:
        raise MedusaHeadsError("the Medusa heads file holds no weights")
    k = len(per_head)
    if sorted(per_head) != list(range(k)):
        raise MedusaHeadsError(f"Medusa head indices must be 0..{k - 1}, found {sorted(per_head)}")
    layouts = set()
    for i, blocks in per_head.items():
        n = len(blocks)
        want = {j: {"linear.weight", "linear.bias"} for j in range(n - 1)} | {n - 1: {"weight"}}
        if blocks != want:
            raise MedusaHeadsError(f"Medusa head {i} is not ResBlock x L + Linear: found {dict(sorted(blocks.items()))}")
        layouts.add(n - 1)
    if len(layouts) != 1:
        raise MedusaHeadsError(f"Medusa heads have different layer counts {sorted(layouts)}")
    layers = layouts.pop()
    vocab, hidden = state[f"0.{layers}.weight"].shape
    for i in range(k):
        for j in range(layers):
            if state[f"{i}.{j}.linear.weight"].shape != (hidden, hidden) or state[f"{i}.{j}.linear.bias"].shape != (hidden,):
                raise MedusaHeadsError(f"Medusa head {i} block {j} is not {hidden}x{hidden}")
        if state[f"{i}.{layers}.weight"].shape != (vocab, hidden):
            raise MedusaHeadsError(f"Medusa head {i} output is {list(state[f'{i}.{layers}.weight'].shape)}, "
                                   f"head 0's is {[vocab, hidden]}")  # fmt: skip
    return MedusaHeadsConfig(num_heads=k, num_layers=layers, hidden_size=hidden, vocab_size=vocab)


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in (WEIGHTS_SAFETENSORS, WEIGHTS_PT):
        if (path / name).is_file():
            return path / name
    if not path.exists():
        raise FileNotFoundError(f"no Medusa heads at '{path}' (train them: harness train medusa, or set method.medusa.heads=...)")
    raise FileNotFoundError(f"'{path}' holds neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_PT}")


def read_state(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise MedusaHeadsError(f"{file} does not hold a state dict")
    prefix = "medusa_head."  # whole-model (Medusa-2 style) dumps prefix the head keys
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_heads(
    path: str | os.PathLike,
    hidden_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> MedusaHeads:
    """Medusa heads from a directory (or a weights file with config.json beside it).

    ``hidden_size`` / ``vocab_size``: the base model's; a mismatch is refused.
    """
    path = Path(path)
    file = _weights_file(path)
    state = read_state(file)
    cfg = infer_shape(state)
    where = str(file)
    config_file = file.parent / CONFIG_NAME
    if config_file.is_file():
        meta = json.loads(config_file.read_text(encoding="utf-8"))
        for key, found in (("medusa_num_heads", cfg.num_heads), ("medusa_num_layers", cfg.num_layers),
                           ("hidden_size", cfg.hidden_size), ("vocab_size", cfg.vocab_size)):  # fmt: skip
            if key in meta and int(meta[key]) != found:
                raise MedusaHeadsError(f"{config_file} says {key}={meta[key]} but {file.name} holds {found}")
        cfg.base_model_name_or_path = str(meta.get("base_model_name_or_path") or "")
    if hidden_size is not None and hidden_size != cfg.hidden_size:
        raise MedusaHeadsError(f"Medusa heads at {where} take hidden size {cfg.hidden_size}, the base model has {hidden_size}")
    if vocab_size is not None and vocab_size != cfg.vocab_size:
        raise MedusaHeadsError(f"Medusa heads at {where} predict {cfg.vocab_size} tokens, the base model has {vocab_size}")
    heads = MedusaHeads(cfg)
    heads.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    heads.to(device=device, dtype=dtype or torch.float32)
    heads.eval()
    heads.requires_grad_(False)
    return heads


def save_heads(heads: MedusaHeads, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float16,
               extra: Optional[dict] = None) -> Path:  # fmt: skip
    """Write ``medusa_lm_head.safetensors`` (in ``dtype``) and config.json into ``out_dir``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = heads.config
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in heads.state_dict().items()}
    save_file(state, str(out / WEIGHTS_SAFETENSORS), metadata={"format": "pt"})
    meta = {
        "medusa_num_heads": cfg.num_heads,
        "medusa_num_layers": cfg.num_layers,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "torch_dtype": str(dtype).replace("torch.", ""),
        **(extra or {}),
    }
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out
