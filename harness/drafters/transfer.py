"""Hidden-transfer layers (Wu et al. 2024, "Parallel Decoding via Hidden Transfer"; FIRP):
trained linear maps from one position's hidden state at a decoder layer to pseudo hidden states
of the next positions. Used by training (``harness.train.hidden_transfer``) and decoding
(``methods/hidden_transfer.py``).

Alignment: the hidden state ``h`` entering decoder layer ``layer`` at position p (it has read
tokens 0..p) becomes ``k`` rows, row j (1-based) at position p + j; after the remaining layers
and the LM head, row j predicts the token at p + j + 1 (the model's own row at p predicts p + 1).
Row j = ``transfer[j-1](h)``, each a Linear(H, H) with bias, initialised to the identity.

``attend_rows``: whether row j also sees rows 1..j-1 of the same position in the layers it passes
(FIRP's refinement among the predicted states), or only the context and itself.

On disk: ``transfer.safetensors`` (keys ``maps.{j}.weight`` / ``.bias``) and ``config.json``
(the fields of :class:`TransferConfig`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from harness.engine import Injection

WEIGHTS = "transfer.safetensors"
CONFIG = "config.json"


class TransferError(ValueError):
    """Transfer layers that cannot be used with this model; the message says what disagrees."""


@dataclass
class TransferConfig:
    layer: int = 3  # decoder layer (0-based) the pseudo rows join: the maps read the hidden state entering it
    k: int = 3  # pseudo rows per position (the tokens 2..k+1 ahead)
    attend_rows: bool = False  # rows of one position see each other (FIRP) or only the context and themselves
    hidden_size: int = 0  # the base model's hidden size
    base_model_name_or_path: str = ""  # informational: the base the maps were trained on


class TransferLayers(nn.Module):
    """``layers(h [N, H]) -> [N * k, H]``: the k pseudo rows of each of the N positions, row-major
    (position, then j)."""

    def __init__(self, cfg: TransferConfig):
        if cfg.k < 1 or cfg.layer < 1 or cfg.hidden_size < 1:
            raise TransferError(f"invalid transfer config {asdict(cfg)}: need k >= 1, layer >= 1, hidden_size >= 1")
        super().__init__()
        self.config = cfg
        self.maps = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(cfg.k))
        with torch.no_grad():
            for m in self.maps:
                m.weight.copy_(torch.eye(cfg.hidden_size))
                m.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([m(h) for m in self.maps], dim=1)  # [N, k, H]
        return rows.reshape(-1, h.shape[-1])


def save_transfer(layers: TransferLayers, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``transfer.safetensors`` (in ``dtype``) and config.json into ``out_dir``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in layers.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(asdict(layers.config), indent=2) + "\n")
    return out


def load_transfer(path: str | Path, hidden_size: int, num_layers: int) -> TransferLayers:
    """The transfer layers in ``path`` (a directory written by ``save_transfer``), checked against
    the base model's hidden size and layer count."""
    from safetensors.torch import load_file  # noqa: PLC0415

    src = Path(path)
    if not (src / WEIGHTS).exists() or not (src / CONFIG).exists():
        raise TransferError(f"no transfer layers in {src} (expected {WEIGHTS} and {CONFIG}): train them with "
                            "`harness train hidden-transfer` or point method.<name>.transfer at a directory that has them")  # fmt: skip
    cfg = TransferConfig(**json.loads((src / CONFIG).read_text()))
    if cfg.hidden_size != hidden_size:
        raise TransferError(f"the transfer layers in {src} map {cfg.hidden_size}-wide states, the model's are {hidden_size}")
    if not 1 <= cfg.layer < num_layers:
        raise TransferError(f"the transfer layers in {src} join at layer {cfg.layer}; the model has layers 0..{num_layers - 1}")
    layers = TransferLayers(cfg)
    state = load_file(str(src / WEIGHTS))
    layers.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return layers


def pseudo_rows(layers: TransferLayers, sees: torch.Tensor, positions: torch.Tensor,
                anchors: torch.Tensor | slice) -> Injection:  # fmt: skip
    """The ``Injection`` that gives each anchor its k pseudo rows, in one forward.

    sees: bool ``[N, past + new]``, what each anchor token may attend to (itself included); row j
        of an anchor sees the same, plus itself and (``attend_rows``) the anchor's rows 1..j-1.
    positions: ``[N]`` the anchors' position ids; row j sits at position + j.
    anchors: which of the forward's new tokens are the anchors (indices or a slice), in the
        order of ``sees``.
    """
    k, n = layers.config.k, sees.shape[0]
    device = sees.device
    block = torch.ones(k, k, dtype=torch.bool, device=device).tril() if layers.config.attend_rows \
        else torch.eye(k, dtype=torch.bool, device=device)  # fmt: skip
    own = torch.kron(torch.eye(n, dtype=torch.bool, device=device).int(), block.int()).bool()  # [N*k, N*k]
    mask = torch.cat((sees.repeat_interleave(k, dim=0), own), dim=1)
    offsets = torch.arange(1, k + 1, device=positions.device)
    return Injection(layer=layers.config.layer, make=lambda h: layers(h[anchors]),
                     positions=(positions.view(-1, 1) + offsets).flatten(), mask=mask)  # fmt: skip
