"""The zoo's EAGLE-1 head in the layout vLLM's EAGLE-1 drafter reads (``llama_eagle``), same function.

The harness's head (harness/drafters/eagle.py, the released EAGLE-1 format) is
``z = fc([embed(x) ; f]) + b`` followed by Llama decoder layers (layer 0 without its input
norm) and the target's LM head; its config says ``"bias": true`` for fc's bias. vLLM reads
that same config key differently: its Llama layers take ``bias`` as *attention* bias
(q/k/v/o projections with biases, which the checkpoint lacks, so they keep whatever they were
created with), and its EAGLE fc has no bias at all (``fc.bias`` is skipped without a word).
Loaded as it is, the head therefore drafts from a different function and vLLM accepts none
of its tokens, while the output stays exact.

The export computes the same function with what vLLM's layout has: fc without bias, and
fc's bias ``b`` moved into layer 0, which reads fc's output directly (no input norm):
``q = Wq (x + b) = Wq x + (Wq b)`` (likewise k, v) and the residual ``x + b`` gets its ``b``
back as o_proj's bias. The config then says ``"bias": false, "attention_bias": true`` (later
layers get zero biases). Weights are stored in float32, as the harness computes with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harness.serving.vllm_process import VllmError


def export_eagle1(head: Path, out: Path) -> Path:
    """Write ``head`` (a directory with config.json + model.safetensors) to ``out`` in vLLM's layout."""
    if not (head / "config.json").exists() or not (head / "model.safetensors").exists():
        raise VllmError(f"{head} is not an EAGLE-1 head directory (config.json + model.safetensors)")
    config = json.loads((head / "config.json").read_text())
    weights = {k: v.float() for k, v in load_file(str(head / "model.safetensors")).items()}
    bias = weights.pop("fc.bias", None)
    if bias is None:
        bias = torch.zeros(weights["fc.weight"].shape[0])
    for i in range(int(config["num_hidden_layers"])):
        fold = bias if i == 0 else torch.zeros_like(bias)
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = weights[f"layers.{i}.self_attn.{proj}.weight"]
            weights[f"layers.{i}.self_attn.{proj}.bias"] = w @ fold
        weights[f"layers.{i}.self_attn.o_proj.bias"] = fold.clone()
    out.mkdir(parents=True, exist_ok=True)  # float32: the folded biases are not rounded to the stored dtype
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    exported = {**config, "torch_dtype": "float32", "bias": False, "attention_bias": True,
                "harness": {**config.get("harness", {}), "format": "EAGLE-1 head exported for vLLM (fc bias "
                            "folded into layer 0's q/k/v/o biases)", "exported_from": str(head)}}  # fmt: skip
    (out / "config.json").write_text(json.dumps(exported, indent=1))
    return out
