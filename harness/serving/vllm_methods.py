"""Each harness method as vLLM's own implementation: the ``speculative_config`` vLLM is given.

Same weights and the same settings where both sides have them: the zoo draft with the
harness's gamma, n-gram lookup with prompt-lookup's n-gram range and proposal length, the
zoo's EAGLE-1/EAGLE-3 heads and Medusa heads, suffix decoding with the harness's tree
limits. What vLLM has no counterpart for, or a setting vLLM cannot express, is refused in
one line before any engine starts. docs/vllm.md says where the two still differ (trees).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from harness.config import MethodConfig, ModelConfig
from harness.paths import resolve_repo_path
from harness.registry import MODELS
from harness.serving.vllm_process import VllmError

MAPPED = ("autoregressive", "speculative", "prompt-lookup", "eagle", "eagle3", "medusa", "suffix")


@dataclass
class VllmMethod:
    name: str  # the harness method it stands for
    speculative_config: Optional[dict[str, Any]]  # vLLM's speculative_config; None = plain decoding
    fresh_engine_per_round: bool = False  # state kept across requests (suffix's cache of outputs): an engine per round


def model_path(path: str) -> str:
    """A local directory as an absolute path (vLLM runs from elsewhere), a hub id as it is."""
    local = resolve_repo_path(path)
    return str(local.resolve()) if local.exists() else path


def draft_path(cfg: MethodConfig, target: ModelConfig) -> str:
    name = getattr(cfg, "draft", None) or target.draft
    if not name:
        raise VllmError(f"no draft model for target '{target.name}'; set method.speculative.draft=<preset or path>")
    return model_path(MODELS.get(name).path if name in MODELS.names() else name)


def heads_path(path: str, name: str) -> str:
    local = resolve_repo_path(path)
    if not (local / "config.json").exists():
        raise VllmError(f"vLLM loads {name} heads from a directory with config.json; {path} has none "
                        f"(set method.{name}.{'heads' if name == 'medusa' else 'head'}=<such a directory>)")  # fmt: skip
    return str(local.resolve())


def vllm_method(name: str, cfg: MethodConfig, target: ModelConfig, head_tokens: int, eagle_dir: Path) -> VllmMethod:
    """vLLM's implementation of harness method ``name`` (config ``cfg``); VllmError if it has none.

    ``head_tokens``: tokens the EAGLE and Medusa heads draft per step (vLLM drafts a chain, the
    harness a tree: vllm.num_speculative_tokens). ``eagle_dir``: where the EAGLE-1 head is
    exported in the layout vLLM reads (harness/serving/eagle_export.py).
    """
    if name == "autoregressive":
        return VllmMethod(name, None)
    if name == "speculative":
        if cfg.schedule != "constant":
            raise VllmError(f"vLLM drafts a constant number of tokens; method.speculative.schedule={cfg.schedule} "
                            "has no counterpart there (use schedule=constant)")  # fmt: skip
        return VllmMethod(name, {"model": draft_path(cfg, target), "num_speculative_tokens": cfg.gamma})
    if name == "prompt-lookup":
        return VllmMethod(name, {"method": "ngram", "num_speculative_tokens": cfg.num_tokens,
                                 "prompt_lookup_max": cfg.max_ngram, "prompt_lookup_min": cfg.min_ngram})  # fmt: skip
    if name == "eagle":
        from harness.serving.eagle_export import export_eagle1

        head = export_eagle1(resolve_repo_path(cfg.head), eagle_dir)
        return VllmMethod(name, {"method": "eagle", "model": str(head), "num_speculative_tokens": head_tokens})
    if name == "eagle3":
        return VllmMethod(name, {"method": "eagle3", "model": heads_path(cfg.head, name),
                                 "num_speculative_tokens": head_tokens})  # fmt: skip
    if name == "medusa":
        return VllmMethod(name, {"method": "medusa", "model": heads_path(cfg.heads, name),
                                 "num_speculative_tokens": head_tokens})  # fmt: skip
    if name == "suffix":
        config = {"method": "suffix", "num_speculative_tokens": cfg.max_nodes,
                  "suffix_decoding_max_tree_depth": cfg.max_depth,
                  "suffix_decoding_max_spec_factor": cfg.max_spec_factor,
                  "suffix_decoding_min_token_prob": cfg.min_token_prob}  # fmt: skip
        return VllmMethod(name, config, fresh_engine_per_round=True)
    raise VllmError(f"{name} has no vLLM counterpart; with run.engine=vllm use {', '.join(MAPPED)}")
