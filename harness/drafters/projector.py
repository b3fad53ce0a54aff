"""LLM-to-SLM's projector (Bergner et al. 2024, "Think Big, Generate Quick"): a small MLP that
maps the large model's final hidden states of the prompt into the small model's embedding
space; the result is added to the small model's own prompt embeddings, position by position
(the two share the tokenizer). Used by training (``harness.train.llm_to_slm``) and decoding
(``methods/llm_to_slm.py``).

    e'_i = embed_small(x_i) + W_2 GELU(W_1 h_i)     for every prompt position i

``W_2`` starts at zero, so an untrained projector leaves the small model as it was.

On disk: ``projector.safetensors`` (fp16) and ``config.json`` (``ProjectorConfig``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from harness.engine import ModelLoadError

CONFIG_NAME, WEIGHTS_NAME = "config.json", "projector.safetensors"


class ProjectorError(ModelLoadError, ValueError):
    """A projector that does not fit the models it is used with (the message says what and the fix)."""


@dataclass
class ProjectorConfig:
    large_hidden: int = 0  # the large model's (target's) hidden size
    small_hidden: int = 0  # the small model's embedding size
    inner: int = 256  # the MLP's inner width
    large_model: str = ""  # informational: the large model it was trained with
    small_model: str = ""  # informational: the small model it conditions


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(nn.Linear(config.large_hidden, config.inner), nn.GELU(),
                                 nn.Linear(config.inner, config.small_hidden))  # fmt: skip
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


def save_projector(projector: Projector, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in projector.state_dict().items()}, str(d / WEIGHTS_NAME))
    (d / CONFIG_NAME).write_text(json.dumps(asdict(projector.config), indent=1) + "\n")


def load_projector(directory: str | Path, large_hidden: int, small_hidden: int) -> Projector:
    """A saved projector, refused (one line) when its sizes are not these models'."""
    from safetensors.torch import load_file  # noqa: PLC0415

    d = Path(directory)
    if not (d / CONFIG_NAME).exists() or not (d / WEIGHTS_NAME).exists():
        raise ProjectorError(f"no LLM-to-SLM projector in {d} ({CONFIG_NAME} + {WEIGHTS_NAME}); train one with "
                             "`harness train llm-to-slm` or point method.llm-to-slm.projector=<dir>")  # fmt: skip
    config = ProjectorConfig(**json.loads((d / CONFIG_NAME).read_text()))
    if (config.large_hidden, config.small_hidden) != (large_hidden, small_hidden):
        raise ProjectorError(f"the projector in {d} maps {config.large_hidden} -> {config.small_hidden}, these models "
                             f"need {large_hidden} -> {small_hidden}: train one for them")  # fmt: skip
    projector = Projector(config)
    projector.load_state_dict({k: v.float() for k, v in load_file(str(d / WEIGHTS_NAME)).items()})
    return projector.eval()
